"""HTTP API: publishing, reading events, counters and health, one blueprint per resource.

The one module of app/ that imports tasks/: through tasks.acceptance, the queue's
entry point, it hands publish requests over and reads what the broker holds.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from collections.abc import Iterator
from typing import Any

import orjson
import redis
from flask import Flask
from flask import Response
from flask import current_app
from flask import g
from flask import request
from flask import stream_with_context
from flask_smorest import Blueprint
from marshmallow import RAISE
from marshmallow import ValidationError
from sqlalchemy import Connection
from sqlalchemy import Engine
from sqlalchemy import text
from structlog.contextvars import bind_contextvars
from werkzeug.exceptions import NotFound
from werkzeug.exceptions import ServiceUnavailable
from werkzeug.http import HTTP_STATUS_CODES

from app import broker_log
from app.auth import charge_events
from app.bodies import publish_body
from app.config import Settings
from app.cursors import InvalidCursor
from app.cursors import decode_cursor
from app.cursors import decode_topic_cursor
from app.cursors import encode_topic_cursor
from app.errors import handle_backlog_full
from app.errors import handle_broker_error
from app.errors import handle_key_reused
from app.followers import LogHead
from app.instruments import ACCEPTED
from app.instruments import REPLAYS
from app.schemas import BATCH_ID_PATTERN
from app.schemas import MAX_BATCH
from app.schemas import AcceptedSchema
from app.schemas import AcknowledgedSchema
from app.schemas import BatchIdSchema
from app.schemas import BatchSchema
from app.schemas import BrokerLossSchema
from app.schemas import DeadLetterSchema
from app.schemas import ErrorBodySchema
from app.schemas import EventPageSchema
from app.schemas import EventQuerySchema
from app.schemas import HealthSchema
from app.schemas import ReplayResultSchema
from app.schemas import StatsSchema
from app.schemas import TopicPageSchema
from app.schemas import TopicQuerySchema
from app.store import reading
from app.store.counters import topic_page
from app.store.dead_letters import ReplayRefused
from app.store.dead_letters import list_dead_letters
from app.store.dead_letters import replay_dead_letter as replay_letter
from tasks.acceptance import BacklogFull
from tasks.acceptance import BrokerUnavailable
from tasks.acceptance import Intake
from tasks.acceptance import KeyReused
from tasks.acceptance import Request
from tasks.acceptance import batch_status
from tasks.acceptance import collect_stats
from tasks.acceptance import fingerprint

events_blp = Blueprint("events", __name__, description="Publish events and read them back.")
stats_blp = Blueprint("stats", __name__, description="Exact counters.")
dead_letters_blp = Blueprint("dead_letters", __name__, description="Events the database refused.")
health_blp = Blueprint("health", __name__, description="Liveness and readiness.")
broker_blp = Blueprint("broker", __name__, description="Losses of broker data.")
batches_blp = Blueprint(
    "batches", __name__, description="What became of each accepted batch (the worker's ledger)."
)

IDEMPOTENCY_HEADER = "Idempotency-Key"
NDJSON = "application/x-ndjson"
MAX_IDEMPOTENCY_KEY = 200

ERROR_DESCRIPTIONS = {
    400: "Malformed JSON, an NDJSON line that is not JSON (named), or a body that is not"
    " valid gzip.",
    401: "Missing or wrong bearer token.",
    403: "The token lacks the scope this operation needs.",
    404: "No such resource.",
    408: "The body stalled or ended early.",
    413: "Body too large (decoded, for gzip), too many JSON values in it, or costing more"
    " than the whole rate budget (RATE_LIMIT): refused for good, send smaller requests.",
    415: "Content type is not application/json or application/x-ndjson, or Content-Encoding"
    " is not gzip or identity.",
    422: "Invalid fields, with messages per field (per array index for batches, per"
    ' `"line N"` for NDJSON).',
    429: "Too many requests; see Retry-After.",
    503: "Broker or database unreachable, or too many large bodies in progress; see Retry-After.",
}
# What each error's answer looks like, for the OpenAPI document's examples.
ERROR_EXAMPLES: dict[int, dict[str, Any]] = {
    400: {"message": "malformed JSON: unexpected character: line 1 column 2 (char 1)"},
    401: {"message": "send a valid token as 'Authorization: Bearer <token>'"},
    403: {"message": "this token lacks the 'admin' scope"},
    404: {"message": "no dead letter 42 waiting for replay"},
    408: {"message": "the body took longer than 10 s or ended before Content-Length"},
    413: {"message": "the body is over 2097152 bytes"},
    415: {
        "message": "send the body as application/json (an event or an array) or"
        " application/x-ndjson (an event per line)"
    },
    422: {"message": "invalid input", "errors": {"1": {"timestamp": ["Not a valid datetime."]}}},
    429: {"message": "budget of 50000 per 1.0 s spent"},
    503: {"message": "broker unavailable, retry in 2 s"},
}


def error_example(code: int) -> dict[str, Any]:
    """An answer with `code` in the one error shape, as the API gives it."""
    return {"code": code, "status": HTTP_STATUS_CODES[code], **ERROR_EXAMPLES[code]}


View = Callable[..., Any]


def documented_only(*decorators: Callable[[View], View]) -> Callable[[View], View]:
    """Apply flask-smorest decorators for the OpenAPI document alone.

    Each of them wraps the view in a function that runs on every request; these
    add the view's documentation but leave the view itself to run unwrapped
    (it then answers with a full Response).
    """

    def decorate(view: View) -> View:
        documented = view
        for decorator in reversed(decorators):
            documented = decorator(documented)
        view._apidoc = documented._apidoc  # type: ignore[attr-defined]
        return view

    return decorate


def operation(blueprint: Blueprint, operation_id: str) -> Callable[[View], View]:
    """Give a view a stable operationId in the OpenAPI document (for generated clients)."""
    return documented_only(blueprint.doc(operationId=operation_id))


def documents_errors(*codes: int) -> Callable[[View], View]:
    """Document the error responses a view can give, all in the one error shape."""
    return documented_only(
        *(
            events_blp.alt_response(
                code,
                schema=ErrorBodySchema,
                description=ERROR_DESCRIPTIONS[code],
                example=error_example(code),
            )
            for code in codes
        )
    )


def attach_queue(app: Flask, settings: Settings) -> None:
    """Give the app its intake (tasks.acceptance) and answer the queue's refusals as JSON."""
    app.extensions["intake"] = Intake(app.extensions["redis"], app.extensions["engine"], settings)
    # Registered here, where the queue's exceptions are known; the wording is app.errors'.
    app.register_error_handler(BacklogFull, handle_backlog_full)
    app.register_error_handler(KeyReused, handle_key_reused)
    app.register_error_handler(BrokerUnavailable, handle_broker_error)


def _engine() -> Engine:
    return current_app.extensions["engine"]


def _redis() -> redis.Redis:
    return current_app.extensions["redis"]


def _intake() -> Intake:
    return current_app.extensions["intake"]


def _idempotency_key() -> tuple[str, bool]:
    """Return the request's idempotency key and whether the client chose it."""
    key = request.headers.get(IDEMPOTENCY_HEADER)
    if key is None:
        return uuid.uuid4().hex, False
    if not 1 <= len(key) <= MAX_IDEMPOTENCY_KEY or not all(" " <= c <= "~" for c in key):
        raise ValidationError(
            {IDEMPOTENCY_HEADER: [f"1 to {MAX_IDEMPOTENCY_KEY} printable ASCII characters"]}
        )
    return key, True


PUBLISH_BODY = {
    "required": True,
    "description": "One event, or up to 1,000: a JSON object or array (`application/json`), or"
    " one JSON object per line (`application/x-ndjson`, also `application/jsonl`; blank lines"
    ' are skipped, and errors name the line: `{"line 750": {...}}`). With'
    " `Content-Encoding: gzip` the body may be compressed; MAX_BODY_BYTES bounds the decoded"
    " size as well. Events without `event_id` are refused unless their topic is in"
    " DERIVE_EVENT_ID_TOPICS, where the server derives it (docs/event-ids.md).",
    "content": {
        "application/json": {
            "schema": {
                "oneOf": [
                    {"$ref": "#/components/schemas/Event"},
                    {
                        "type": "array",
                        "items": {"$ref": "#/components/schemas/Event"},
                        "minItems": 1,
                        "maxItems": MAX_BATCH,
                    },
                ]
            }
        },
        NDJSON: {
            "schema": {
                "type": "string",
                "description": f"1 to {MAX_BATCH} lines, each an Event object as JSON.",
                "example": '{"topic":"orders","event_id":"o-1","timestamp":'
                '"2026-12-02T10:00:00Z","source":"checkout","payload":{"total":42}}\n',
            }
        },
    },
}


# The publish endpoints' documentation, applied to both views without wrappers.
PUBLISH_DOCS = documented_only(
    events_blp.doc(requestBody=PUBLISH_BODY),
    events_blp.doc(
        parameters=[
            {
                "name": IDEMPOTENCY_HEADER,
                "in": "header",
                "required": False,
                "schema": {"type": "string", "minLength": 1, "maxLength": MAX_IDEMPOTENCY_KEY},
                "description": "Send the same key with every retry of a request: within"
                " IDEMPOTENCY_TTL it is accepted and counted once and answered the same 202.",
            }
        ]
    ),
    events_blp.response(
        202, AcceptedSchema, description="The whole batch is durably on the queue, counted once."
    ),
    documents_errors(400, 401, 403, 408, 413, 415, 422, 429, 503),
)


@events_blp.route("/publish", methods=["POST"])
@PUBLISH_DOCS
@operation(events_blp, "publishEvents")
def publish_events() -> Response:
    """Accept one event or up to 1,000 (a JSON array or NDJSON lines), as one queued batch."""
    # The hot path: answered without flask-smorest's wrappers (documented above).
    key, remember = _idempotency_key()
    bodies = current_app.extensions["large_bodies"]
    with publish_body(bodies, current_app.extensions["derived_ids"]) as (raw, events):
        charge_events(len(events))
        accept = Request(
            events, g.get("client_id") or "-", key, fingerprint(raw), remember, size=len(raw)
        )
        receipt = _intake().submit(accept)
    headers = {IDEMPOTENCY_HEADER: key}
    if receipt.replayed:
        headers["Idempotent-Replayed"] = "true"
        REPLAYS.inc()
    else:
        ACCEPTED.inc(receipt.accepted)
    # The access line (app.logs) and the worker's line for this batch both carry it.
    bind_contextvars(batch_id=receipt.batch_id)
    answer = {"accepted": receipt.accepted, "batch_id": receipt.batch_id, "idempotency_key": key}
    return Response(orjson.dumps(answer), 202, headers, mimetype="application/json")


@events_blp.route("/publish/batch", methods=["POST"])
@PUBLISH_DOCS
@operation(events_blp, "publishBatch")
def publish_batch() -> Response:
    """The same as POST /publish (kept for clients of the original design)."""
    return publish_events()


@events_blp.route("/events", methods=["GET"])
@events_blp.arguments(EventQuerySchema, location="query", as_kwargs=True, unknown=RAISE)
@events_blp.response(
    200,
    EventPageSchema,
    description="A page of events. With `Accept: application/x-ndjson`: every matching event"
    " from the cursor on, one JSON object per line, each with its own `cursor` to resume from.",
)
@documents_errors(401, 403, 422, 429, 503)
@operation(events_blp, "listEvents")
def list_events(
    limit: int, wait: int, cursor: str | None = None, **filters: Any
) -> dict[str, Any] | Response:
    """Return stored events oldest first, one page at a time (or all of them as NDJSON)."""
    if request.accept_mimetypes.best_match(["application/json", NDJSON]) == NDJSON:
        return _export(cursor, filters)
    if not wait:
        with _engine().connect() as conn:
            page, next_cursor = _events_page(conn, limit, cursor, filters)
            gap = reading.retention_gap(conn, cursor)
        return _answer(page, next_cursor, gap)
    return _follow(limit, wait, cursor, filters)


def _answer(page: list[dict[str, Any]], next_cursor: str | None, gap: bool) -> dict[str, Any]:
    """A page of events; `retention_gap` only when retention dropped events after the cursor."""
    answer: dict[str, Any] = {"events": page, "next_cursor": next_cursor}
    if gap:
        answer["retention_gap"] = True
    return answer


def _follow(limit: int, wait: int, cursor: str | None, filters: dict[str, Any]) -> dict[str, Any]:
    """Return the events past the cursor, waiting up to `wait` seconds for the first ones.

    Each read stops at the log's head and the cursor moves up to it, so a filter
    no index serves costs one pass over the log, then only the rows stored since;
    between reads the request waits for the process's one LogHead, not on a timer.
    """
    page, next_cursor, upto = _follow_page(limit, cursor, filters)
    # Only the first read can skip dropped events: later ones start at a position
    # read from the log after the first.
    with current_app.extensions["stream_engine"].connect() as conn:
        gap = reading.retention_gap(conn, cursor)
    if page:
        return _answer(page, next_cursor, gap)
    followers: threading.BoundedSemaphore = current_app.extensions["followers"]
    if not followers.acquire(blocking=False):
        raise ServiceUnavailable(
            "too many clients are waiting for events on this server; retry shortly",
            retry_after=1,
        )
    try:
        head: LogHead = current_app.extensions["log_head"]
        deadline = time.monotonic() + wait
        while not page and head.wait_past(upto, deadline - time.monotonic()):
            page, next_cursor, upto = _follow_page(limit, next_cursor, filters)
    finally:
        followers.release()
    return _answer(page, next_cursor, gap)


def _follow_page(
    limit: int, cursor: str | None, filters: dict[str, Any]
) -> tuple[list[dict[str, Any]], str, int]:
    """Read a page no further than the log's head, on the followers' own connections."""
    with current_app.extensions["stream_engine"].connect() as conn:
        upto = reading.log_head(conn)
        page, next_cursor = _events_page(conn, limit, cursor, filters, upto=upto)
    assert next_cursor is not None  # never, with upto
    return page, next_cursor, upto


def _events_page(
    conn: Connection,
    limit: int,
    cursor: str | None,
    filters: dict[str, Any],
    *,
    upto: int | None = None,
) -> tuple[list[dict[str, Any]], str | None]:
    try:
        return reading.list_events(
            conn,
            limit=limit,
            cursor=cursor,
            max_bytes=current_app.config["EVENTS_PAGE_MAX_BYTES"],
            upto=upto,
            **filters,
        )
    except InvalidCursor as exc:
        raise ValidationError({"cursor": [str(exc)]}) from None


def _export(cursor: str | None, filters: dict[str, Any]) -> Response:
    if cursor is not None:
        try:
            decode_cursor(cursor)
        except InvalidCursor as exc:
            raise ValidationError({"cursor": [str(exc)]}) from None
    exports: threading.BoundedSemaphore = current_app.extensions["exports"]
    if not exports.acquire(blocking=False):
        raise ServiceUnavailable(
            "too many exports are streaming from this server; retry shortly", retry_after=1
        )
    try:
        pages = reading.iter_events(
            current_app.extensions["stream_engine"],
            cursor=cursor,
            page_bytes=current_app.config["EVENTS_PAGE_MAX_BYTES"],
            **filters,
        )

        def lines() -> Iterator[bytes]:
            # A page per short transaction: a client that stops reading holds no
            # connection. If the database goes away mid-stream the stream just
            # ends: resume from the cursor of the last line received.
            for page in pages:
                yield b"".join(orjson.dumps(event) + b"\n" for event in page)

        response = Response(stream_with_context(lines()), mimetype=NDJSON)
        # The server closes the response however the stream ends (client gone included).
        response.call_on_close(exports.release)
    except BaseException:
        exports.release()
        raise
    return response


# Query parameters each endpoint takes; any other gets 422 naming it.
QUERY_PARAMETERS = {
    "events.list_events": frozenset(EventQuerySchema().fields),
    "stats.topic_stats": frozenset(TopicQuerySchema().fields),
}


def reject_unknown_query_parameters() -> None:
    """Refuse misspelled or unknown query parameters instead of ignoring them."""
    if request.endpoint in (None, "docs_assets") or request.endpoint.startswith("api-docs."):
        return
    unknown = sorted(set(request.args) - QUERY_PARAMETERS.get(request.endpoint, frozenset()))
    if unknown:
        raise ValidationError({name: ["unknown query parameter"] for name in unknown})


_BATCH_ID = BatchIdSchema()


@batches_blp.route(
    "/batches/<batch_id>",
    methods=["GET"],
    parameters=[
        {
            "in": "path",
            "name": "batch_id",
            "description": "The `batch_id` a 202 from POST /publish answered.",
            "schema": {"type": "string", "pattern": BATCH_ID_PATTERN},
        }
    ],
)
@batches_blp.response(200, BatchSchema)
@documents_errors(401, 403, 404, 422, 429, 503)
@operation(batches_blp, "getBatch")
def get_batch(batch_id: str) -> dict[str, Any]:
    """Say what became of an accepted batch: queued, or stored with its counts."""
    _BATCH_ID.load({"batch_id": batch_id})
    status = batch_status(_engine(), _redis(), batch_id)
    if status is None:
        raise NotFound(f"no batch {batch_id}: never accepted here, or its ledger row was deleted")
    return status


@stats_blp.route("/stats", methods=["GET"])
@stats_blp.response(200, StatsSchema)
@documents_errors(401, 403, 429, 503)
@operation(stats_blp, "getStats")
def stats() -> dict[str, Any]:
    """Return exact counters of everything received, stored, dropped and queued."""
    return collect_stats(_engine(), _redis(), current_app.extensions["started_at"])


@stats_blp.route("/stats/topics", methods=["GET"])
@stats_blp.arguments(TopicQuerySchema, location="query", as_kwargs=True, unknown=RAISE)
@stats_blp.response(200, TopicPageSchema)
@documents_errors(401, 403, 422, 429, 503)
@operation(stats_blp, "listTopicStats")
def topic_stats(
    limit: int, oldest: bool, cursor: str | None = None, prefix: str | None = None
) -> dict[str, Any]:
    """Return per-topic counters, a page at a time, optionally only topics with a prefix."""
    try:
        after = decode_topic_cursor(cursor) if cursor is not None else None
    except InvalidCursor as exc:
        raise ValidationError({"cursor": [str(exc)]}) from None
    with _engine().connect() as conn:
        page, last = topic_page(conn, limit=limit, after=after, prefix=prefix, oldest=oldest)
    next_cursor = encode_topic_cursor(last) if last is not None else None
    return {"topics": page, "next_cursor": next_cursor}


@dead_letters_blp.route("/dead-letters", methods=["GET"])
@dead_letters_blp.response(200, DeadLetterSchema(many=True))
@documents_errors(401, 403, 429, 503)
@operation(dead_letters_blp, "listDeadLetters")
def dead_letters() -> list[dict[str, Any]]:
    """Return the newest events the database refused, with the reason."""
    with _engine().connect() as conn:
        return list_dead_letters(conn)


@dead_letters_blp.route("/dead-letters/<int:letter_id>/replay", methods=["POST"])
@dead_letters_blp.response(200, ReplayResultSchema)
@documents_errors(401, 403, 404, 422, 429, 503)
@operation(dead_letters_blp, "replayDeadLetter")
def replay_dead_letter(letter_id: int) -> dict[str, Any]:
    """Store a dead-lettered event again, after the cause was fixed."""
    try:
        with _engine().begin() as conn:
            result = replay_letter(conn, letter_id)
    except ReplayRefused as exc:
        raise ValidationError({"event": [f"the database still refuses it: {exc}"]}) from None
    if result is None:
        raise NotFound(f"no dead letter {letter_id} waiting for replay")
    return {"id": letter_id, "result": result}


@health_blp.route("/health", methods=["GET"])
@health_blp.doc(security=[])
@health_blp.response(200, HealthSchema)
@operation(health_blp, "health")
def health() -> dict[str, str]:
    """Say the process is alive."""
    return {"status": "ok"}


@health_blp.route("/ready", methods=["GET"])
@health_blp.doc(security=[])
@health_blp.response(200, HealthSchema)
@health_blp.alt_response(
    503,
    schema=HealthSchema,
    description="Not ready: a dependency is down, or a loss of broker data awaits"
    " acknowledgement; `checks` says which. See Retry-After.",
)
@operation(health_blp, "ready")
def ready() -> tuple[dict[str, Any], int, dict[str, str]] | dict[str, Any]:
    """Check the database and the broker, and that no loss of broker data awaits acknowledgement."""
    checks = {"database": "ok", "broker": "ok", "broker_data_loss": "none"}
    try:
        # Connections of its own: a process whose pool is busy reading is still ready.
        with current_app.extensions["probe_engine"].connect() as conn:
            conn.execute(text("SELECT 1"))
            losses = broker_log.loss_summary(conn)
        if losses["unacknowledged"]:
            checks["broker_data_loss"] = (
                f"{losses['unacknowledged']} unacknowledged (last {losses['last_detected_at']});"
                " see /stats, then POST /broker/data-loss/acknowledge"
            )
    except Exception as exc:  # Any failure means not ready; say which.
        checks["database"] = f"down: {type(exc).__name__}"
        checks["broker_data_loss"] = "unknown"
    try:
        _redis().ping()
        # Informational: what a 202 survives (docs/reliability.md).
        checks["broker_persistence"] = _intake().persistence()
        policy = _intake().memory().policy
        # allkeys-* may evict queued batches and idempotency records; none of our
        # keys has a TTL, so noeviction and volatile-* never touch them.
        checks["broker_eviction"] = (
            f"unsafe: maxmemory-policy {policy} may evict accepted batches; use noeviction"
            if policy.startswith("allkeys")
            else policy
        )
    except Exception as exc:
        checks["broker"] = f"down: {type(exc).__name__}"
    failing = [
        checks["database"] != "ok",
        checks["broker"] != "ok",
        checks["broker_data_loss"] != "none",
        checks.get("broker_eviction", "").startswith("unsafe"),
    ]
    if not any(failing):
        return {"status": "ready", "checks": checks}
    retry_after = current_app.config["RETRY_AFTER"]
    return (
        {"status": "unavailable", "checks": checks},
        503,
        {"Retry-After": str(retry_after)},
    )


@broker_blp.route("/broker/data-loss", methods=["GET"])
@broker_blp.response(200, BrokerLossSchema(many=True))
@documents_errors(401, 403, 429, 503)
@operation(broker_blp, "listBrokerDataLoss")
def broker_data_loss() -> list[dict[str, Any]]:
    """List every detected loss of broker data, newest first."""
    with _engine().connect() as conn:
        return broker_log.list_losses(conn)


@broker_blp.route("/broker/data-loss/acknowledge", methods=["POST"])
@broker_blp.response(200, AcknowledgedSchema)
@documents_errors(401, 403, 429, 503)
@operation(broker_blp, "acknowledgeBrokerDataLoss")
def acknowledge_broker_data_loss() -> dict[str, int]:
    """Acknowledge detected losses of broker data, so /ready reports ready again."""
    with _engine().begin() as conn:
        return {"acknowledged": broker_log.acknowledge_losses(conn)}


BLUEPRINTS = (events_blp, batches_blp, stats_blp, dead_letters_blp, health_blp, broker_blp)
