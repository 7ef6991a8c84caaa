"""HTTP API: publishing, reading events, counters and health, one blueprint per resource."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson
import redis
from flask import current_app
from flask import request
from flask_smorest import Blueprint
from marshmallow import ValidationError
from sqlalchemy import Engine
from sqlalchemy import text
from werkzeug.exceptions import BadRequest
from werkzeug.exceptions import ClientDisconnected
from werkzeug.exceptions import NotFound
from werkzeug.exceptions import RequestTimeout
from werkzeug.exceptions import UnsupportedMediaType

from app import publish
from app import store
from app.metrics import ACCEPTED
from app.schemas import AcceptedSchema
from app.schemas import DeadLetterSchema
from app.schemas import ErrorBodySchema
from app.schemas import EventPageSchema
from app.schemas import EventQuerySchema
from app.schemas import HealthSchema
from app.schemas import ReplayResultSchema
from app.schemas import StatsSchema
from app.schemas import load_events
from app.stats import collect_stats

events_blp = Blueprint("events", __name__, description="Publish events and read them back.")
stats_blp = Blueprint("stats", __name__, description="Exact counters.")
dead_letters_blp = Blueprint("dead_letters", __name__, description="Events the database refused.")
health_blp = Blueprint("health", __name__, description="Liveness and readiness.")

ERROR_DESCRIPTIONS = {
    400: "Malformed JSON.",
    401: "Missing or wrong bearer token.",
    404: "No such resource.",
    408: "The body stalled or ended early.",
    413: "Body too large.",
    415: "Content type is not application/json.",
    422: "Invalid fields, with messages per field (and per array index for batches).",
    429: "Too many requests; see Retry-After.",
    503: "Broker or database unreachable; see Retry-After.",
}


def documents_errors(*codes: int) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Document the error responses a view can give, all in the one error shape."""

    def decorate(view: Callable[..., Any]) -> Callable[..., Any]:
        for code in codes:
            view = events_blp.alt_response(
                code, schema=ErrorBodySchema, description=ERROR_DESCRIPTIONS[code]
            )(view)
        return view

    return decorate


def _engine() -> Engine:
    return current_app.extensions["engine"]


def _redis() -> redis.Redis:
    return current_app.extensions["redis"]


def _json_body() -> Any:
    if not request.is_json:
        raise UnsupportedMediaType("send the body as application/json")
    # gunicorn hands us its socket: bound each read, so a client that stalls
    # mid-body is cut off instead of holding this thread.
    sock = request.environ.get("gunicorn.socket")
    if sock is not None:
        sock.settimeout(current_app.config["BODY_READ_TIMEOUT"])
    try:
        body = request.get_data(cache=False)
    except (TimeoutError, ClientDisconnected):
        raise RequestTimeout("the body stalled or ended before Content-Length") from None
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"malformed JSON: {exc}") from None


PUBLISH_BODY = {
    "required": True,
    "content": {
        "application/json": {
            "schema": {
                "oneOf": [
                    {"$ref": "#/components/schemas/Event"},
                    {
                        "type": "array",
                        "items": {"$ref": "#/components/schemas/Event"},
                        "minItems": 1,
                        "maxItems": 1000,
                    },
                ]
            }
        }
    },
}


@events_blp.route("/publish", methods=["POST"])
@events_blp.route("/publish/batch", methods=["POST"], endpoint="publish_batch")
@events_blp.doc(requestBody=PUBLISH_BODY)
@events_blp.response(202, AcceptedSchema, description="The whole batch is on the queue.")
@documents_errors(400, 401, 408, 413, 415, 422, 429, 503)
def publish_events() -> dict[str, int]:
    """Accept one event or an array of up to 1,000, as one queued batch."""
    events = load_events(_json_body())
    if len(events) < current_app.config["GROUP_COMMIT_BELOW"]:
        current_app.extensions["group_commit"].submit(events)
    else:
        publish.enqueue(_redis(), events)
    ACCEPTED.inc(len(events))
    return {"accepted": len(events)}


@events_blp.route("/events", methods=["GET"])
@events_blp.arguments(EventQuerySchema, location="query", as_kwargs=True)
@events_blp.response(200, EventPageSchema)
@documents_errors(401, 422, 429, 503)
def list_events(limit: int, cursor: str | None = None, **filters: Any) -> dict[str, Any]:
    """Return stored events oldest first, one page at a time."""
    try:
        with _engine().connect() as conn:
            page, next_cursor = store.list_events(conn, limit=limit, cursor=cursor, **filters)
    except store.InvalidCursor as exc:
        raise ValidationError({"cursor": [str(exc)]}) from None
    return {"events": page, "next_cursor": next_cursor}


@stats_blp.route("/stats", methods=["GET"])
@stats_blp.response(200, StatsSchema)
@documents_errors(401, 429, 503)
def stats() -> dict[str, Any]:
    """Return exact counters of everything received, stored, dropped and queued."""
    return collect_stats(_engine(), _redis(), current_app.extensions["started_at"])


@dead_letters_blp.route("/dead-letters", methods=["GET"])
@dead_letters_blp.response(200, DeadLetterSchema(many=True))
@documents_errors(401, 429, 503)
def dead_letters() -> list[dict[str, Any]]:
    """Return the newest events the database refused, with the reason."""
    with _engine().connect() as conn:
        return store.list_dead_letters(conn)


@dead_letters_blp.route("/dead-letters/<int:letter_id>/replay", methods=["POST"])
@dead_letters_blp.response(200, ReplayResultSchema)
@documents_errors(401, 404, 422, 429, 503)
def replay_dead_letter(letter_id: int) -> dict[str, Any]:
    """Store a dead-lettered event again, after the cause was fixed."""
    try:
        with _engine().begin() as conn:
            result = store.replay_dead_letter(conn, letter_id)
    except store.ReplayRefused as exc:
        raise ValidationError({"event": [f"the database still refuses it: {exc}"]}) from None
    if result is None:
        raise NotFound(f"no dead letter {letter_id} waiting for replay")
    return {"id": letter_id, "result": result}


@health_blp.route("/health", methods=["GET"])
@health_blp.response(200, HealthSchema)
def health() -> dict[str, str]:
    """Say the process is alive."""
    return {"status": "ok"}


@health_blp.route("/ready", methods=["GET"])
@health_blp.response(200, HealthSchema)
@documents_errors(503)
def ready() -> tuple[dict[str, Any], int] | dict[str, Any]:
    """Check that the database and the broker answer."""
    checks = {"database": "ok", "broker": "ok"}
    try:
        with _engine().connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:  # Any failure means not ready; say which.
        checks["database"] = f"down: {type(exc).__name__}"
    try:
        _redis().ping()
    except Exception as exc:
        checks["broker"] = f"down: {type(exc).__name__}"
    if all(state == "ok" for state in checks.values()):
        return {"status": "ready", "checks": checks}
    retry_after = current_app.config["RETRY_AFTER"]
    return (
        {"status": "unavailable", "checks": checks},
        503,
        {"Retry-After": str(retry_after)},
    )


BLUEPRINTS = (events_blp, stats_blp, dead_letters_blp, health_blp)
