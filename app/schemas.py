"""marshmallow schemas for request bodies and query strings."""

from __future__ import annotations

import json
import math
from datetime import UTC
from datetime import datetime
from decimal import Decimal
from typing import Any

import orjson
from marshmallow import RAISE
from marshmallow import Schema
from marshmallow import ValidationError
from marshmallow import fields
from marshmallow import validate
from marshmallow import validates_schema

MAX_STRING = 255
MAX_PAYLOAD_BYTES = 64 * 1024
MAX_PAYLOAD_DEPTH = 32
MAX_BATCH = 1000
MAX_PAGE = 1000
# A page of /stats/topics?oldest=true pays one index descent per topic and partition of
# events (30 daily partitions: 3,000 for 100 topics), so it is smaller.
MAX_OLDEST_PAGE = 100
MAX_WAIT_SECONDS = 30
# What parsing a body may cost is bounded before it is parsed: by its size
# (MAX_BODY_BYTES, app.config) and by the number of JSON values in it, counted
# cheaply as its commas (those inside strings too, so this errs on the side of
# refusing). 1,000 events of 5 fields leave ~95 values per payload; parsing this
# many costs orjson ~20 ms at worst (short keys), time it holds the GIL.
MAX_BODY_VALUES = 100_000
# Bodies above this, or without a declared length, are large: each needs one of
# a process's slots (MAX_LARGE_BODIES, app.config) before it is read, and they
# are parsed and validated one at a time, off the event loop (app.bodies).
LARGE_BODY_BYTES = 64 * 1024
# Large bodies get at most this share of a process's time: after parsing one for
# t seconds, the next waits t * (1 - share) / share, so the process's other
# requests always get the rest (orjson keeps the GIL while it parses).
LARGE_BODY_SHARE = 0.5
# An answer lists at most this many problems and says how many more there are.
MAX_LISTED_PROBLEMS = 20
# Endpoints that take no body refuse one above this from its Content-Length.
MAX_OTHER_BODY_BYTES = 64 * 1024
# Batch ids: the API issues 32 hex digits; GET /batches/<id> takes any id a
# worker would store (tasks.ingest), of characters a URL carries unescaped.
MAX_BATCH_ID = 200
BATCH_ID_PATTERN = rf"^[A-Za-z0-9_-]{{1,{MAX_BATCH_ID}}}$"


def reject_unstorable(value: str) -> None:
    """Refuse strings PostgreSQL cannot store (NUL), so the worker never meets them."""
    if "\x00" in value:
        raise ValidationError("must not contain NUL (\\u0000) characters")


def _check_payload(value: Any, depth: int = 1) -> None:
    if depth > MAX_PAYLOAD_DEPTH:
        raise ValidationError(f"must not be nested deeper than {MAX_PAYLOAD_DEPTH} levels")
    if isinstance(value, str):
        reject_unstorable(value)
    elif isinstance(value, dict):
        for key, item in value.items():
            reject_unstorable(key)
            _check_payload(item, depth + 1)
    elif isinstance(value, list):
        for item in value:
            _check_payload(item, depth + 1)


# orjson reads an integer from -2**63 to 2**64-1 as an int and any other number as a double,
# which keeps 15 to 17 significant digits: beyond that a number would be stored changed (JSONB
# itself keeps any number exactly). Such numbers are refused, naming them. Only a number of 16
# or more digits (a dot may be among them) or a three-digit exponent can be one; a C-speed pass
# over the raw body rules both out for most bodies, and only the rest are read again with the
# standard library, which sees each number's text.


def _number_mask() -> bytes:
    # Digits and dots become "0", exponents "e", signs "-", what may end a number "|", the
    # rest "x": a number is then a run of "0", "e" and "-" that ends in "|" (a string's, in "x").
    table = bytearray(b"x" * 256)
    for char in b"0123456789.":
        table[char] = ord("0")
    table[ord("e")] = table[ord("E")] = ord("e")
    table[ord("-")] = table[ord("+")] = ord("-")
    for char in b",]} \t\r\n":
        table[char] = ord("|")
    return bytes(table)


_NUMBER_MASK = _number_mask()
_NUMBER_CHARS = frozenset(b"0e-")
_INT_RANGE = (-(2**63), 2**64 - 1)

JsonPath = list[str | int]


class _NumberText(str):
    """A JSON number's text, as the exact check reads it."""


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _ends_a_number(masked: bytes, start: int) -> bool:
    end = start
    while end < len(masked) and masked[end] in _NUMBER_CHARS:
        end += 1
    return end == len(masked) or masked[end] == ord("|")


def may_hold_inexact_numbers(raw: bytes) -> bool:
    """Tell, at C speed, whether a JSON text may hold a number that would be stored changed."""
    masked = raw.translate(_NUMBER_MASK)
    for needle in (b"0" * 16, b"e-000", b"e000"):
        at = masked.find(needle)
        while at != -1:
            # Digits in a string (ids, uuids, phone numbers) end at its quote, not at a "|".
            if _ends_a_number(masked, at):
                return True
            at = masked.find(needle, at + len(needle))
    return False


def _stored_exactly(text: str) -> bool:
    """Tell whether orjson's reading of this JSON number (and so what is stored) keeps its value."""
    if len(text) < 16 and "e" not in text and "E" not in text:
        return True  # At most 15 digits, no exponent: any double holds it.
    if not any(mark in text for mark in ".eE"):
        # Out of range with this many digits anyway, and int() of thousands is slow.
        return len(text.lstrip("-")) <= 20 and _INT_RANGE[0] <= int(text) <= _INT_RANGE[1]
    value = float(text)
    if not math.isfinite(value):
        return False
    # Most clients write a double's shortest form, as repr does: equal text, equal value.
    return repr(value) == text or Decimal(repr(value)) == Decimal(text)


def inexact_numbers(raw: bytes) -> list[tuple[JsonPath, str]]:
    """Return the path and text of every number in a JSON document that would be stored changed.

    Raises ValueError when the document is not JSON.
    """
    if not may_hold_inexact_numbers(raw):
        return []
    inexact: list[str] = []

    def number(text: str) -> Any:
        if _stored_exactly(text):
            return None
        inexact.append(text)
        return _NumberText(text)

    try:
        document = json.loads(
            raw, parse_int=number, parse_float=number, parse_constant=_refuse_constant
        )
    except RecursionError:
        raise ValueError("nested too deeply") from None
    if not inexact:
        return []
    # Rare: walk the document to name where each one is.
    found: list[tuple[JsonPath, str]] = []
    stack: list[tuple[JsonPath, Any]] = [([], document)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, _NumberText):
            found.append((path, str(value)))
        elif isinstance(value, dict):
            stack.extend(([*path, key], item) for key, item in value.items())
        elif isinstance(value, list):
            stack.extend(([*path, index], item) for index, item in enumerate(value))
    return sorted(found, key=lambda problem: [str(step) for step in problem[0]])


def dotted(path: JsonPath) -> str:
    """Name a place in a document the way errors do: `payload.a.b[1]`."""
    return "".join(f"[{step}]" if isinstance(step, int) else f".{step}" for step in path).lstrip(
        "."
    )


def number_complaint(text: str) -> str:
    shown = text if len(text) <= 40 else f"{text[:20]}... ({len(text)} characters)"
    return (
        f"{shown} would not be stored exactly: integers must lie in -2**63..2**64-1 and other"
        " numbers within a double's precision (about 15 significant digits); send it as a string"
    )


def refuse_inexact_numbers(raw: bytes) -> None:
    """Refuse (422) a publish body with numbers that would be stored changed, naming each."""
    problems = inexact_numbers(raw)
    if not problems:
        return
    errors: dict[Any, Any] = {}
    for path, text in problems:
        if path and isinstance(path[0], int):  # A batch: under the event's index.
            errors.setdefault(path[0], {})[dotted(path[1:])] = [number_complaint(text)]
        else:
            errors[dotted(path)] = [number_complaint(text)]
    raise ValidationError(errors)


NO_NUL_PATTERN = r"^[^\x00]*$"
# In the OpenAPI document too, so clients (and fuzzers) know NUL is refused.
NO_NUL = validate.Regexp(NO_NUL_PATTERN, error="must not contain NUL (\\u0000) characters")


class UtcDateTime(fields.AwareDateTime):
    """An ISO-8601 date-time with an offset, converted to UTC.

    PostgreSQL accepts offsets up to 15:59 only, Python up to 23:59; converting
    here makes every valid offset storable (timestamptz keeps UTC anyway).
    """

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> datetime:
        moment = super()._deserialize(value, attr, data, **kwargs)
        try:
            return moment.astimezone(UTC)
        except OverflowError:
            raise ValidationError("must be within years 1 to 9999 in UTC") from None


class Text(fields.String):
    """A required string of 1 to MAX_STRING characters without NUL.

    Checked in one step rather than by Length and Regexp validators (every
    published event has three; together they cost a batch of 500 ~1.4 ms), and
    documented with the same minLength, maxLength and pattern.
    """

    def __init__(self, **kwargs: Any) -> None:
        metadata = {"minLength": 1, "maxLength": MAX_STRING, "pattern": NO_NUL_PATTERN}
        super().__init__(
            required=True, metadata={**metadata, **kwargs.pop("metadata", {})}, **kwargs
        )

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> str:
        text = super()._deserialize(value, attr, data, **kwargs)
        if not 1 <= len(text) <= MAX_STRING:
            raise ValidationError(f"Length must be between 1 and {MAX_STRING}.")
        reject_unstorable(text)
        return text


class Payload(fields.Dict):
    """A JSON object of bounded size and depth, without NUL in any key or string."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> Any:
        payload = super()._deserialize(value, attr, data, **kwargs)
        try:
            text = orjson.dumps(payload)
        except TypeError:  # orjson writes 255 levels at most; parsing took up to 1,024.
            raise ValidationError(
                f"must not be nested deeper than {MAX_PAYLOAD_DEPTH} levels"
            ) from None
        if len(text) > MAX_PAYLOAD_BYTES:
            raise ValidationError(f"must be at most {MAX_PAYLOAD_BYTES} bytes as JSON")
        # Walked only when its JSON could hold a NUL (escaped as \u0000) or
        # more opening brackets than the depth allows: counting is C, walking
        # is Python, one step per value.
        if b"\\u0000" in text or text.count(b"{") + text.count(b"[") > MAX_PAYLOAD_DEPTH:
            _check_payload(payload)
        return payload


MISSING_EVENT_ID = (
    "Missing data for required field. Send an id that stays the same when this event is sent"
    ' again, e.g. the recipe of docs/event-ids.md ("h:" + the first 32 hex digits of SHA-256'
    " over [topic, source, timestamp, payload] as canonical JSON), or have the server derive"
    " it for this topic: DERIVE_EVENT_ID_TOPICS."
)


class EventSchema(Schema):
    """One published event; unknown fields are rejected."""

    class Meta:
        unknown = RAISE

    topic = Text(metadata={"example": "orders"})
    event_id = Text(
        metadata={
            "example": "2f1c7c1e-0b7d-4a53-9d1c-5b0f5d7c9a10",
            "description": "The same on every resend of this event: (topic, event_id) is the"
            " dedup key. Without one, use the content-hash recipe of docs/event-ids.md"
            ' ("h:" + 32 hex digits of SHA-256), which the server applies itself to topics'
            " in DERIVE_EVENT_ID_TOPICS.",
        },
        error_messages={"required": MISSING_EVENT_ID},
    )
    timestamp = UtcDateTime(
        required=True,
        format="iso",
        metadata={
            "description": "ISO-8601 date-time with a UTC offset.",
            "example": "2026-12-02T10:00:00Z",
        },
    )
    source = Text(metadata={"example": "checkout-service"})
    # JSON object keys are strings already: no key field to run per key.
    payload = Payload(
        required=True,
        metadata={
            "description": f"JSON object: at most {MAX_PAYLOAD_BYTES} bytes serialized, "
            f"{MAX_PAYLOAD_DEPTH} levels deep, no NUL (\\u0000) in any key or string; integers"
            " within -2**63..2**64-1 and other numbers a double holds exactly (longer ones get"
            " 422: send them as strings).",
            "example": {"user": "u1", "total": 42},
        },
    )


class EventOutSchema(EventSchema):
    """A stored event as /events returns it."""

    stored_at = fields.AwareDateTime(
        required=True, format="iso", metadata={"example": "2026-12-02T10:00:01.234567+00:00"}
    )


class JsonObjectText(fields.String):
    """A query parameter holding a JSON object, loaded as a dict."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> Any:
        text = super()._deserialize(value, attr, data, **kwargs)
        if len(text) > 4096:
            raise ValidationError("must be at most 4096 characters")
        try:
            loaded = orjson.loads(text)
        except orjson.JSONDecodeError as exc:
            raise ValidationError(f"not JSON: {exc}") from None
        if not isinstance(loaded, dict):
            raise ValidationError("must be a JSON object")
        _check_payload(loaded)
        try:
            problems = inexact_numbers(text.encode())
        except ValueError as exc:
            raise ValidationError(f"not JSON: {exc}") from None
        if problems:
            raise ValidationError(
                [f"{dotted(['payload', *path])}: {number_complaint(n)}" for path, n in problems]
            )
        return loaded


class EventQuerySchema(Schema):
    """Filters and paging for GET /events."""

    class Meta:
        unknown = RAISE

    topic = fields.String(validate=[validate.Length(min=1, max=MAX_STRING), NO_NUL])
    source = fields.String(validate=[validate.Length(min=1, max=MAX_STRING), NO_NUL])
    since = UtcDateTime(format="iso", metadata={"description": "timestamp >= since"})
    until = UtcDateTime(format="iso", metadata={"description": "timestamp < until"})
    limit = fields.Integer(load_default=100, validate=validate.Range(min=1, max=MAX_PAGE))
    cursor = fields.String(validate=[validate.Length(min=1, max=200), NO_NUL])
    payload = JsonObjectText(
        metadata={
            "description": "A JSON object the payload must contain (JSONB `@>`), e.g."
            ' `{"user":"u1"}`; needs `topic`.',
            "example": '{"user":"u1"}',
        },
    )
    wait = fields.Integer(
        load_default=0,
        validate=validate.Range(min=0, max=MAX_WAIT_SECONDS),
        metadata={
            "description": "Long-poll: when no event follows the cursor, wait up to this many"
            " seconds for one (follow the log by requesting again with next_cursor)."
        },
    )

    @validates_schema
    def _payload_needs_topic(self, data: dict[str, Any], **_: Any) -> None:
        # The containment filter runs on one topic's rows (its index), never on all.
        if "payload" in data and "topic" not in data:
            raise ValidationError({"payload": ["filtering on payload needs a topic"]})


class EventPageSchema(Schema):
    """A page of events and the cursor of the next one."""

    events = fields.List(fields.Nested(EventOutSchema), required=True)
    next_cursor = fields.String(
        required=True,
        allow_none=True,
        metadata={"example": "cDky", "description": "null at the end of the log"},
    )
    retention_gap = fields.Boolean(
        metadata={
            "description": "Present (true) when retention dropped events, of any topic, that"
            " came after the cursor: the page continues at the oldest event kept."
        },
    )


class AcceptedSchema(Schema):
    """Answer to an accepted publish."""

    accepted = fields.Integer(required=True, metadata={"example": 1})
    batch_id = fields.String(
        required=True, metadata={"description": "The task carrying the events; workers log it."}
    )
    idempotency_key = fields.String(
        required=True,
        metadata={"description": "The request's Idempotency-Key, or the one the server made up."},
    )


class BatchIdSchema(Schema):
    """The batch id of GET /batches/<batch_id>, checked before anything is looked up."""

    batch_id = fields.String(
        required=True,
        validate=validate.Regexp(
            BATCH_ID_PATTERN,
            error=f"must be 1 to {MAX_BATCH_ID} letters, digits, '-' or '_'"
            " (the batch_id a 202 answered)",
        ),
    )


class BatchSchema(Schema):
    """What became of one accepted batch, from the worker's ledger."""

    batch_id = fields.String(
        required=True, metadata={"example": "8ba58774272c486180a68d6196e9a079"}
    )
    status = fields.String(
        required=True,
        validate=validate.OneOf(["queued", "stored"]),
        metadata={
            "description": "queued: accepted, not yet stored; stored: a worker committed it,"
            " and the counts say what became of each event.",
            "example": "stored",
        },
    )
    received = fields.Integer(
        required=True,
        metadata={
            "description": "Events in the batch: several small requests that arrived together"
            " may share one batch, and its counts cover all of them.",
            "example": 1000,
        },
    )
    stored = fields.Integer(required=True, allow_none=True, metadata={"example": 0})
    duplicates = fields.Integer(required=True, allow_none=True, metadata={"example": 1000})
    failed = fields.Integer(
        required=True,
        allow_none=True,
        metadata={"description": "Refused by the database (GET /dead-letters).", "example": 0},
    )
    processed_at = fields.AwareDateTime(
        required=True,
        allow_none=True,
        format="iso",
        metadata={"description": "When a worker stored it; null while queued."},
    )


# Schemas hold no per-request state; building them costs more than loading one event.
_ONE = EventSchema()
_MANY = EventSchema(many=True)
EVENT_FIELDS = frozenset(_ONE.fields)


def _unknown_fields(event: dict[str, Any]) -> dict[str, list[str]] | None:
    # Set operations in C, so a body of a million unknown keys costs what its
    # parsing did; the first few are named, in the body's order.
    if len(event) <= len(EVENT_FIELDS) and event.keys() <= EVENT_FIELDS:
        return None
    named: dict[str, list[str]] = {}
    for name in event:
        if name not in EVENT_FIELDS:
            named[name] = ["Unknown field."]
            if len(named) == MAX_LISTED_PROBLEMS:
                break
    unknown = len(event) - len(event.keys() & EVENT_FIELDS)
    if unknown > len(named):
        named["_schema"] = [f"{unknown} unknown fields, {len(named)} named"]
    return named


def refuse_unknown_fields(body: Any) -> None:
    """Refuse unknown fields before the schema runs, naming only the first few."""
    if isinstance(body, dict):
        events: list[Any] = [body]
    elif isinstance(body, list):
        events = body
    else:
        return
    found: dict[int, dict[str, list[str]]] = {}
    for index, event in enumerate(events):
        if isinstance(event, dict) and (unknown := _unknown_fields(event)):
            found[index] = unknown
            if len(found) == MAX_LISTED_PROBLEMS:
                break
    if found:
        raise ValidationError(found[0] if isinstance(body, dict) else found)


def load_events(body: Any, *, max_batch: int = MAX_BATCH) -> list[dict[str, Any]]:
    """Validate one event or a list of events; return them as JSON-ready dicts."""
    if isinstance(body, list) and not 1 <= len(body) <= max_batch:
        raise ValidationError(
            {"_schema": [f"a batch holds 1 to {max_batch} events, got {len(body)}"]}
        )
    refuse_unknown_fields(body)
    if isinstance(body, dict):
        loaded = [_ONE.load(body)]
    elif isinstance(body, list):
        loaded = _MANY.load(body)
    else:
        raise ValidationError({"_schema": ["body must be an event object or an array of events"]})
    # Timestamps go to the queue in one normalised ISO form that PostgreSQL parses
    # (the loaded dicts are new, so they are changed in place).
    for event in loaded:
        event["timestamp"] = event["timestamp"].isoformat()
    return loaded


TEXT_FIELDS = ("topic", "event_id", "source")


def _plainly_valid(event: Any) -> bool:
    # A fast twin of EventSchema for events in the form the API queues them:
    # True only for events the schema accepts; anything else goes to the schema.
    if type(event) is not dict or event.keys() != EVENT_FIELDS:
        return False
    for name in TEXT_FIELDS:
        value = event[name]
        if type(value) is not str or not 1 <= len(value) <= MAX_STRING or "\x00" in value:
            return False
    stamp = event["timestamp"]
    if type(stamp) is not str:
        return False
    try:
        moment = datetime.fromisoformat(stamp)
        if moment.utcoffset() is None:
            return False
        moment.astimezone(UTC)
    except (ValueError, OverflowError):
        return False
    payload = event["payload"]
    if type(payload) is not dict:
        return False
    try:
        text = orjson.dumps(payload)
    except TypeError:
        return False
    if len(text) > MAX_PAYLOAD_BYTES:
        return False
    if b"\\u0000" in text or text.count(b"{") + text.count(b"[") > MAX_PAYLOAD_DEPTH:
        try:
            _check_payload(payload)
        except ValidationError:
            return False
    return True


def queued_problems(events: Any, max_events: int) -> dict[Any, Any]:
    """Check a task's events against EventSchema; return the problems, empty when all are valid.

    The workers' second layer: events reach a task through the API, already
    valid, unless someone queued it another way (Flower, a script with the
    broker's password). A fast twin of the schema passes what is plainly valid
    (a few µs per event); EventSchema itself judges every other event, and its
    messages, for the first MAX_LISTED_PROBLEMS, are what is returned.
    """
    if type(events) is not list or not 1 <= len(events) <= max_events:
        return {"_schema": [f"a task holds a list of 1 to {max_events} events"]}
    problems: dict[Any, Any] = {}
    for index, event in enumerate(events):
        if _plainly_valid(event):
            continue
        try:
            _ONE.load(event)
        except ValidationError as exc:
            problems[index] = exc.messages
        except Exception as exc:  # Values JSON cannot hold (msgpack bytes, integer keys...).
            problems[index] = {"_schema": [f"not JSON-shaped: {type(exc).__name__}"]}
        if len(problems) == MAX_LISTED_PROBLEMS:
            break
    return problems


class ErrorBodySchema(Schema):
    """The one error shape: code, status, message and, for bad input, errors per field."""

    code = fields.Integer(required=True, metadata={"example": 422})
    status = fields.String(required=True, metadata={"example": "Unprocessable Entity"})
    message = fields.String(required=True, metadata={"example": "invalid input"})
    errors = fields.Dict(metadata={"description": "Messages per field (per array index)."})


class TopicStatsSchema(Schema):
    """Counters of one topic."""

    stored = fields.Integer(required=True, metadata={"example": 120})
    duplicates = fields.Integer(required=True, metadata={"example": 4})
    failed = fields.Integer(required=True, metadata={"example": 0})


class BrokerDataLossSchema(Schema):
    """Losses of broker data detected so far (see docs/reliability.md)."""

    detected = fields.Integer(required=True)
    last_detected_at = fields.String(allow_none=True, required=True)
    unacknowledged = fields.Integer(required=True)
    events_unaccounted = fields.Integer(
        required=True,
        metadata={
            "description": "At most this many accepted events were lost: a broker accepts"
            " only as far as PostgreSQL was told to expect (its allowance), so each loss"
            " is bounded by that allowance less what the ledger holds from its epoch."
        },
    )
    events_known_unstored = fields.Integer(
        required=True,
        metadata={
            "description": "Accepted before each loss's last check and not stored when it was"
            " detected (batches still held by workers may commit later)."
        },
    )


class RetentionStateSchema(Schema):
    """How far retention has gone (docs/retention.md)."""

    oldest_position = fields.Integer(
        required=True,
        allow_none=True,
        metadata={"description": "Position of the oldest event kept; null for an empty log."},
    )
    oldest_stored_at = fields.AwareDateTime(required=True, allow_none=True)
    dropped_through = fields.Integer(
        required=True,
        metadata={"description": "Events at or below this position may have been dropped."},
    )
    keys_pruned_before = fields.AwareDateTime(
        required=True,
        allow_none=True,
        metadata={
            "description": "Dedup keys of events older than this may have been pruned: such"
            " events sent again are stored and counted in stored_after_horizon."
        },
    )
    ledger_pruned_before = fields.AwareDateTime(
        required=True,
        allow_none=True,
        metadata={
            "description": "Batches processed before this may have left the ledger"
            " (GET /batches/<id> answers 404); their counts still add up."
        },
    )
    dead_letters_pruned_before = fields.AwareDateTime(
        required=True,
        allow_none=True,
        metadata={"description": "Dead letters that failed before this may have been pruned."},
    )


class StatsSchema(Schema):
    """Counters that add up: received = stored + duplicates + failed + queued."""

    total_received_queued = fields.Integer(required=True, metadata={"example": 104})
    unique_processed_db = fields.Integer(required=True, metadata={"example": 93})
    estimated_duplicate_dropped = fields.Integer(required=True, metadata={"example": 11})
    failed_events = fields.Integer(required=True, metadata={"example": 0})
    queued_events = fields.Integer(required=True, metadata={"example": 0})
    uptime_seconds = fields.Float(required=True, metadata={"example": 7.9})
    broker_data_loss = fields.Nested(BrokerDataLossSchema, required=True)
    stored_after_horizon = fields.Integer(
        required=True,
        metadata={
            "example": 0,
            "description": "Of unique_processed_db: events stored with a timestamp before"
            " keys_pruned_before, whose key may have been pruned (possible re-sends).",
        },
    )
    retention = fields.Nested(RetentionStateSchema, required=True)


class TopicQuerySchema(Schema):
    """Paging and an optional prefix for GET /stats/topics."""

    class Meta:
        unknown = RAISE

    prefix = fields.String(
        validate=[validate.Length(min=1, max=MAX_STRING), NO_NUL],
        metadata={"description": "Only topics starting with this.", "example": "orders."},
    )
    limit = fields.Integer(
        load_default=100,
        validate=validate.Range(min=1, max=MAX_PAGE),
        metadata={"description": f"At most {MAX_PAGE}, or {MAX_OLDEST_PAGE} with oldest=true."},
    )
    cursor = fields.String(validate=[validate.Length(min=1, max=400), NO_NUL])
    oldest = fields.Boolean(
        load_default=False,
        metadata={
            "description": "Also each topic's oldest retained event (oldest_position,"
            " oldest_stored_at). It costs an index probe per topic and daily partition,"
            f" so limit is then at most {MAX_OLDEST_PAGE}."
        },
    )

    @validates_schema
    def _oldest_pages_are_smaller(self, data: dict[str, Any], **_: Any) -> None:
        if data.get("oldest") and data.get("limit", 0) > MAX_OLDEST_PAGE:
            raise ValidationError(
                {"limit": [f"must be at most {MAX_OLDEST_PAGE} with oldest=true"]}
            )


class TopicCountersSchema(TopicStatsSchema):
    """One topic's counters (and, with oldest=true, its oldest retained event)."""

    topic = fields.String(required=True, metadata={"example": "orders.eu"})
    oldest_position = fields.Integer(
        allow_none=True,
        metadata={
            "description": "With oldest=true: position of the topic's oldest event kept;"
            " null when none is (retention dropped them all, or none was stored)."
        },
    )
    oldest_stored_at = fields.AwareDateTime(
        allow_none=True,
        metadata={"description": "With oldest=true: when that event was stored; or null."},
    )


class TopicPageSchema(Schema):
    """A page of topics in code-point order, and the cursor of the next page."""

    topics = fields.List(fields.Nested(TopicCountersSchema), required=True)
    next_cursor = fields.String(
        required=True, allow_none=True, metadata={"example": "b3JkZXJzLnVz"}
    )


class DeadLetterSchema(Schema):
    """An event the database refused, with the reason."""

    id = fields.Integer(required=True)
    batch_id = fields.String(required=True)
    topic = fields.String(required=True)
    event_id = fields.String(required=True)
    event = fields.String(required=True, metadata={"description": "The event as JSON text."})
    error = fields.String(required=True)
    failed_at = fields.AwareDateTime(required=True, format="iso")


class HealthSchema(Schema):
    """Liveness or readiness and the state of each dependency."""

    status = fields.String(required=True)
    checks = fields.Dict(keys=fields.String(), values=fields.String())


class BrokerLossSchema(Schema):
    """One detected loss of broker data."""

    id = fields.Integer(required=True)
    broker = fields.String(
        required=True, metadata={"description": "The broker's URL, without credentials."}
    )
    lost_epoch = fields.String(required=True)
    reason = fields.String(required=True)
    seq_known = fields.Integer(
        required=True, metadata={"description": "Acceptances known to have happened."}
    )
    seq_found = fields.Integer(
        allow_none=True, metadata={"description": "Acceptances the broker still knew of."}
    )
    events_unaccounted = fields.Integer(required=True)
    events_known_unstored = fields.Integer(required=True)
    detected_at = fields.AwareDateTime(required=True, format="iso")
    acknowledged_at = fields.AwareDateTime(allow_none=True, format="iso")


class AcknowledgedSchema(Schema):
    """How many detected losses of broker data an operator just acknowledged."""

    acknowledged = fields.Integer(required=True)


class ReplayResultSchema(Schema):
    """What replaying a dead letter did."""

    id = fields.Integer(required=True)
    result = fields.String(required=True, validate=validate.OneOf(["stored", "duplicate"]))
