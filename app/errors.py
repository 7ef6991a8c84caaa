"""Error handlers: every error becomes the same JSON shape, never a traceback.

The queue's own refusals (tasks.acceptance) are registered by app.api.attach_queue
with the handlers below, so this module needs nothing from tasks/.
"""

from __future__ import annotations

import logging
from typing import Any

import kombu.exceptions
import redis.exceptions
import sqlalchemy.exc
from flask import Flask
from flask import Response
from flask import current_app
from flask import jsonify
from flask import request
from marshmallow import ValidationError
from werkzeug.exceptions import HTTPException
from werkzeug.exceptions import InternalServerError
from werkzeug.exceptions import ServiceUnavailable
from werkzeug.exceptions import UnprocessableEntity

from app.schemas import MAX_LISTED_PROBLEMS

logger = logging.getLogger(__name__)

BROKER_ERRORS = (
    kombu.exceptions.OperationalError,
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    # Refused writes: maxmemory reached, or a replica that cannot take them.
    redis.exceptions.OutOfMemoryError,
    redis.exceptions.ReadOnlyError,
    ConnectionError,
)
DATABASE_ERRORS = (
    sqlalchemy.exc.OperationalError,
    sqlalchemy.exc.InterfaceError,
    sqlalchemy.exc.TimeoutError,
)


def _stringify_keys(value: Any) -> Any:
    # Batch errors are keyed by array index; JSON object keys must be strings.
    if isinstance(value, dict):
        return {str(key): _stringify_keys(item) for key, item in value.items()}
    return value


# Our words for errors raised without a description of our own (Werkzeug's stock
# texts speak of "the server" and "spelling"): one voice in every answer.
OWN_DESCRIPTIONS = {
    400: "the request could not be read",
    401: "a valid bearer token is required (Authorization: Bearer <token>)",
    403: "the token lacks the scope this operation needs",
    406: "only application/json answers are offered here",
    408: "the request took too long to arrive",
    409: "the request conflicts with what is stored",
    411: "send a Content-Length or a chunked body",
    413: "the body is too large",
    414: "the request line is too long",
    415: "unsupported content type",
    416: "the range asked for is not available",
    429: "too many requests; retry after the seconds in Retry-After",
    431: "the request's headers are too large",
    500: "internal error",
    501: "not implemented",
    503: "unavailable for now; retry after the seconds in Retry-After",
}


def own_description(exc: HTTPException) -> str:
    """The message for an error: its own description, or ours instead of Werkzeug's stock one."""
    stock = type(exc).description
    if exc.description and exc.description != stock:
        return exc.description
    if exc.code == 404:
        return f"no such endpoint: {request.method} {request.path} (the API is described at /docs)"
    if exc.code == 405:
        allowed = ", ".join(sorted(getattr(exc, "valid_methods", None) or ()))
        return f"{request.method} is not allowed on {request.path}; allowed: {allowed}"
    return OWN_DESCRIPTIONS.get(exc.code or 500, (exc.name or "error").lower())


def error_response(exc: HTTPException, message: str | None = None, errors: Any = None) -> Response:
    """Build the JSON error body for an HTTP exception, keeping its headers."""
    body: dict[str, Any] = {
        "code": exc.code,
        "status": exc.name,
        "message": message or own_description(exc),
    }
    if errors:
        body["errors"] = _stringify_keys(errors)
    response = jsonify(body)
    response.status_code = exc.code or 500
    for name, value in exc.get_headers():
        if name.lower() != "content-type":
            response.headers[name] = value
    return response


def _unavailable(what: str) -> Response:
    retry_after = current_app.config["RETRY_AFTER"]
    return error_response(
        ServiceUnavailable(retry_after=retry_after),
        message=f"{what} unavailable, retry in {retry_after} s",
    )


def _first_problems(messages: Any, room: int) -> tuple[Any, int, int]:
    """Keep the first `room` messages of a nested error dict; return it, kept and total."""
    if isinstance(messages, dict):
        kept: dict[Any, Any] = {}
        listed = total = 0
        for key, value in messages.items():
            part, part_listed, part_total = _first_problems(value, room - listed)
            total += part_total
            if part_listed:
                kept[key] = part
                listed += part_listed
        return kept, listed, total
    if isinstance(messages, list) and all(isinstance(item, str) for item in messages):
        shown = messages[: max(room, 0)]
        return shown, len(shown), len(messages)
    if isinstance(messages, list):
        return _first_problems(dict(enumerate(messages)), room)
    return (messages, 1, 1) if room > 0 else (None, 0, 1)


def handle_validation_error(exc: ValidationError) -> Response:
    """Answer invalid input with 422 and the messages per field (the first few of many)."""
    errors, listed, total = _first_problems(exc.messages, MAX_LISTED_PROBLEMS)
    message = "invalid input"
    if total > listed:
        message = f"invalid input: {total} problems, the first {listed} listed"
    return error_response(UnprocessableEntity(), message, errors)


def handle_http_exception(exc: HTTPException) -> Response:
    """Answer routing, parsing and size errors (404, 405, 400, 413, 415...) as JSON."""
    errors = None
    data = getattr(exc, "data", None) or {}
    messages = data.get("messages")
    if isinstance(messages, dict):
        # webargs nests errors under the request location; we read one location per view.
        errors = next(iter(messages.values())) if len(messages) == 1 else messages
    return error_response(exc, data.get("message"), errors)


def handle_broker_error(exc: Exception) -> Response:
    """Answer a broker outage with 503 and Retry-After."""
    logger.warning("broker unavailable: %s", exc)
    return _unavailable("broker")


def handle_backlog_full(exc: Exception) -> Response:
    """Answer with 503 and Retry-After while the broker's backlog is over its budget."""
    logger.warning("refusing to accept: %s", exc)
    retry_after = current_app.config["RETRY_AFTER"]
    return error_response(
        ServiceUnavailable(retry_after=retry_after),
        message=f"too much unstored work queued ({exc}); retry in {retry_after} s",
    )


def handle_key_reused(exc: Exception) -> Response:
    """Answer an idempotency key sent again with another body with 422."""
    return error_response(
        UnprocessableEntity(),
        "invalid input",
        {"Idempotency-Key": [f"key {exc} was already used with a different body"]},
    )


# SQLSTATE of a statement cancelled by statement_timeout (DB_STATEMENT_TIMEOUT).
QUERY_CANCELED = "57014"


def handle_database_error(exc: Exception) -> Response:
    """Answer a database outage, or a query over its time limit, with 503 and Retry-After."""
    if getattr(getattr(exc, "orig", None), "pgcode", None) == QUERY_CANCELED:
        logger.warning("query over the statement timeout: %s", str(exc).splitlines()[0])
        retry_after = current_app.config["RETRY_AFTER"]
        return error_response(
            ServiceUnavailable(retry_after=retry_after),
            message="the query took longer than the database allows (DB_STATEMENT_TIMEOUT);"
            " narrow it (a topic, a cursor) or retry when the server is less busy",
        )
    logger.warning("database unavailable: %s", str(exc).splitlines()[0])
    return _unavailable("database")


def handle_unexpected(exc: Exception) -> Response:
    """Log anything else with its traceback and answer a bare 500."""
    logger.error("unhandled error", exc_info=exc)
    return error_response(InternalServerError(), "internal error")


def register_error_handlers(app: Flask) -> None:
    """Register one JSON shape for every error."""
    app.register_error_handler(ValidationError, handle_validation_error)
    app.register_error_handler(HTTPException, handle_http_exception)
    for exc_type in BROKER_ERRORS:
        app.register_error_handler(exc_type, handle_broker_error)
    for db_exc_type in DATABASE_ERRORS:
        app.register_error_handler(db_exc_type, handle_database_error)
    app.register_error_handler(Exception, handle_unexpected)
