"""A Python log record as an aggregator event: its id, its time and a payload the API accepts.

The payload holds the message, level, logger, where it was logged (module,
function, line, path), process and thread, the formatted exception and stack
when there are any, and the record's extra fields under `extra`. It is kept
within what the API stores: strings without NUL, at most PAYLOAD_LIMIT bytes as
JSON (long messages and tracebacks are cut, keeping a traceback's end), and
extra values that JSON cannot hold are sent as their repr.

The event_id is a random UUID given to the record once, when it is first
turned into an event, and kept on it: every resend of that event carries the
same id, so the aggregator stores it once. It is not a hash of the content,
because two identical log lines (the same message twice in the same
millisecond) are two events, and a content hash would store only one.
"""

from __future__ import annotations

import logging
import uuid
from datetime import UTC
from datetime import datetime
from typing import Any

import orjson

# Where the record keeps its event id, so every handler and every resend uses the same one.
EVENT_ID_ATTRIBUTE = "aggregator_event_id"
# The API stores payloads up to 64 KiB as JSON; the rest is room for the other fields.
PAYLOAD_LIMIT = 60 * 1024
MESSAGE_LIMIT = 16 * 1024
TRACE_LIMIT = 24 * 1024
REPR_LIMIT = 1024
# Cut further when a record's extras and texts together are still too large.
SMALL_MESSAGE = 4 * 1024
SMALL_TRACE = 8 * 1024
# The API's limit on topic, source and event_id.
MAX_STRING = 255

# Attributes every LogRecord has; anything else on a record came from `extra=`.
STANDARD_ATTRIBUTES = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
    EVENT_ID_ATTRIBUTE,
}
_FORMATTER = logging.Formatter()


def event_id_of(record: logging.LogRecord) -> str:
    """Return the record's event id, giving it one (a random UUID) the first time."""
    existing = record.__dict__.get(EVENT_ID_ATTRIBUTE)
    if isinstance(existing, str):
        return existing
    event_id = uuid.uuid4().hex
    setattr(record, EVENT_ID_ATTRIBUTE, event_id)
    return event_id


def clean(text: str, limit: int, keep_end: bool = False) -> str:
    """Return `text` without NUL characters, cut to `limit` characters (its end, if asked)."""
    text = text.replace("\x00", "\ufffd")
    if len(text) <= limit:
        return text
    marker = f"[... {len(text) - limit} characters cut]"
    return marker + text[-limit:] if keep_end else text[:limit] + marker


def message_of(record: logging.LogRecord) -> str:
    """Return the record's message, or what it was given when its arguments do not fit."""
    try:
        return record.getMessage()
    except Exception as exc:  # e.g. log.info("%d", "x"): logging would print a traceback.
        return f"{record.msg!r} % {record.args!r} (not formatted: {type(exc).__name__}: {exc})"


def jsonable(value: Any) -> Any:
    """Return `value` if JSON can hold it (as the API reads it), else its repr, cut short."""
    try:
        text = orjson.dumps(value)
    except TypeError:
        return clean(repr(value), REPR_LIMIT)
    if b"\\u0000" in text:
        return orjson.loads(text.replace(b"\\u0000", b"\\ufffd"))
    return value


def extras_of(record: logging.LogRecord) -> dict[str, Any]:
    """Return the record's extra fields (given with `extra=`), each JSON or its repr."""
    return {
        clean(str(name), MAX_STRING): jsonable(value)
        for name, value in record.__dict__.items()
        if name not in STANDARD_ATTRIBUTES and not name.startswith("_")
    }


def payload_of(
    record: logging.LogRecord, formatter: logging.Formatter | None = None
) -> dict[str, Any]:
    """Return the record's payload, within PAYLOAD_LIMIT bytes as JSON."""
    formatter = formatter or _FORMATTER
    message = message_of(record)
    payload: dict[str, Any] = {
        "message": clean(message, MESSAGE_LIMIT),
        "level": record.levelname,
        "logger": record.name,
        "module": record.module,
        "function": record.funcName,
        "line": record.lineno,
        "path": record.pathname,
        "process": record.process,
        "thread": record.threadName,
    }
    traces: dict[str, str] = {}
    if record.exc_info:
        traces["exc_info"] = formatter.formatException(record.exc_info)
    elif record.exc_text:
        traces["exc_info"] = record.exc_text
    if record.stack_info:
        traces["stack_info"] = formatter.formatStack(record.stack_info)
    payload.update({name: clean(text, TRACE_LIMIT, keep_end=True) for name, text in traces.items()})
    extras = extras_of(record)
    if extras:
        payload["extra"] = extras
    if len(orjson.dumps(payload)) <= PAYLOAD_LIMIT:
        return payload
    # Too large: the extras go first, then the texts are cut shorter.
    if extras:
        payload["extra"] = {"_dropped": f"{len(extras)} fields, too large to send"}
    if len(orjson.dumps(payload)) > PAYLOAD_LIMIT:
        payload["message"] = clean(message, SMALL_MESSAGE)
        for name, text in traces.items():
            payload[name] = clean(text, SMALL_TRACE, keep_end=True)
    return payload


def event_of(
    record: logging.LogRecord,
    topic: str,
    source: str,
    formatter: logging.Formatter | None = None,
) -> dict[str, Any]:
    """Return the event for a log record, in the shape POST /publish takes."""
    return {
        "topic": topic,
        "event_id": event_id_of(record),
        "timestamp": datetime.fromtimestamp(record.created, UTC).isoformat(),
        "source": source,
        "payload": payload_of(record, formatter),
    }
