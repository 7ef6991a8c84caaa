"""Publish bodies read, decoded and parsed within bounds, so one body cannot stall the process.

A body is JSON (one event or an array) or NDJSON (one event per line,
app.ndjson), optionally gzip-encoded (app.gunzip). Before a byte is read: the
declared size against MAX_BODY_BYTES, the size charged to the client's budget
(app.auth), and a slot among the process's MAX_LARGE_BODIES for a large body
or one of unknown size (chunked), so concurrent large bodies cannot fill the
memory. A gzip body is inflated a step at a time: its first LARGE_BODY_BYTES
on the loop, the rest in gevent's thread pool (zlib gives the GIL up while it
inflates) holding a slot, refused as soon as it passes MAX_BODY_BYTES; the
budget is then charged for the decoded size. After reading (and decoding),
before parsing: the number of JSON values, counted as commas (and newlines,
for NDJSON) in C. A large body is counted and parsed in a lane of its own:
gevent's thread pool, one body at a time, within half of the process's time
(LARGE_BODY_SHARE), since orjson keeps the GIL while it parses (at most ~50 ms
under these bounds); it is then validated in the pool beside other bodies,
since marshmallow gives the GIL up every few ms. The share is what keeps the
event loop serving the process's other requests between large bodies.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from collections.abc import Iterator
from typing import Any
from typing import TypeVar

import gevent
import orjson
from flask import current_app
from flask import request
from gevent import monkey
from marshmallow import ValidationError
from werkzeug.exceptions import BadRequest
from werkzeug.exceptions import ClientDisconnected
from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.exceptions import RequestTimeout
from werkzeug.exceptions import ServiceUnavailable
from werkzeug.exceptions import UnsupportedMediaType

from app.auth import charge_body
from app.derived_ids import DerivedIds
from app.gunzip import GZIP
from app.gunzip import Inflater
from app.gunzip import body_encoding
from app.ndjson import NDJSON_TYPES
from app.ndjson import Lines
from app.ndjson import by_line
from app.ndjson import parse_lines
from app.ndjson import refuse_inexact_numbers_by_line
from app.schemas import LARGE_BODY_BYTES
from app.schemas import LARGE_BODY_SHARE
from app.schemas import MAX_BODY_VALUES
from app.schemas import MAX_OTHER_BODY_BYTES
from app.schemas import load_events
from app.schemas import refuse_inexact_numbers

T = TypeVar("T")
# Endpoints that read a body; every other one refuses a large declared body unread.
BODY_ENDPOINTS = frozenset({"events.publish_events", "events.publish_batch"})
# Read in pieces of this size, so a chunked body over the limit is cut off there.
READ_CHUNK = 64 * 1024


class LargeBodies:
    """A process's slots for large bodies (their memory), and the one lane their parsing takes."""

    def __init__(self, slots: int, wait_seconds: float) -> None:
        # Gevent's semaphore and lock under gevent (threading is patched): waiting yields.
        self._slots = threading.BoundedSemaphore(slots)
        self._wait = wait_seconds
        self._lane = threading.Lock()
        self._resume_at = 0.0

    def hold(self, held: contextlib.ExitStack) -> None:
        """Take a slot until `held` closes (the request's end), waiting LARGE_BODY_WAIT at most."""
        if not self._slots.acquire(timeout=self._wait):
            raise ServiceUnavailable(
                "too many large bodies in progress on this server; retry shortly",
                retry_after=1,
            )
        held.callback(self._slots.release)

    def inflate(self, body: bytes, limit: int, held: contextlib.ExitStack | None) -> bytes:
        """Inflate a gzip body: up to LARGE_BODY_BYTES on the loop, the rest off it.

        A body that inflates past LARGE_BODY_BYTES takes a slot first, unless
        the request holds one already (`held` is None then): its memory is a
        large body's.
        """
        inflater = Inflater(body, limit)
        if inflater.run(LARGE_BODY_BYTES):
            return inflater.result()
        if held is not None:
            self.hold(held)
        if monkey.is_module_patched("socket"):
            _in_pool(inflater.run)
        else:
            inflater.run()
        return inflater.result()

    def events(self, body: bytes, ndjson: bool, derived: DerivedIds | None) -> list[dict[str, Any]]:
        """Parse and validate a publish body: a small one inline, a large one off the loop.

        A large body is parsed in the lane (gevent's thread pool, one body at
        a time, within LARGE_BODY_SHARE of the process's time: orjson keeps the
        GIL for the whole parse), then validated in the pool beside others
        (marshmallow gives the GIL up every few ms, so the loop keeps turns).
        Pacing only the parse keeps the lane from capping batched acceptance.
        """
        if len(body) <= LARGE_BODY_BYTES or not monkey.is_module_patched("socket"):
            return validate_events(parse_body(body, ndjson), body, derived)
        with self._lane:
            pause = self._resume_at - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            started = time.monotonic()
            try:
                parsed = _in_pool(parse_body, body, ndjson)
            finally:
                spent = time.monotonic() - started
                rest = spent * (1 - LARGE_BODY_SHARE) / LARGE_BODY_SHARE
                self._resume_at = time.monotonic() + rest
        return _in_pool(validate_events, parsed, body, derived)


def refuse_unread_bodies() -> None:
    """Refuse a large declared body to endpoints that take none, before anything reads it."""
    if request.endpoint in BODY_ENDPOINTS:
        return
    if (request.content_length or 0) > MAX_OTHER_BODY_BYTES:
        raise RequestEntityTooLarge(
            f"this endpoint takes no body; at most {MAX_OTHER_BODY_BYTES} bytes are tolerated"
        )


def _body_deadline(seconds: float) -> contextlib.AbstractContextManager[object]:
    # gunicorn reads a body until it has what was asked for, so a per-read
    # socket timeout never fires for a client that drips one byte at a time;
    # under gevent a Timeout bounds the whole read.
    if monkey.is_module_patched("socket"):
        return gevent.Timeout(seconds, TimeoutError)
    return contextlib.nullcontext()


def _read_within(limit: int) -> bytes:
    """Read the body, chunked or not, refusing it once it grows past `limit` bytes."""
    stream = request.environ["wsgi.input"]
    length = request.content_length
    if length is not None:
        body = stream.read(length)
        if len(body) < length:
            raise ClientDisconnected()
        return bytes(body)
    pieces: list[bytes] = []
    size = 0
    while piece := stream.read(READ_CHUNK):
        size += len(piece)
        if size > limit:
            raise RequestEntityTooLarge(f"the body is over {limit} bytes")
        pieces.append(piece)
    return b"".join(pieces)


def _read_body(deadline_seconds: float, limit: int) -> bytes:
    """Read the whole body within a deadline (per read only, on non-gevent workers)."""
    sock = request.environ.get("gunicorn.socket")
    before = sock.gettimeout() if sock is not None else None
    try:
        if sock is not None:
            sock.settimeout(deadline_seconds)
        with _body_deadline(deadline_seconds):
            return _read_within(limit)
    except (TimeoutError, ClientDisconnected, OSError):
        raise RequestTimeout(
            f"the body took longer than {deadline_seconds:g} s or ended before Content-Length"
        ) from None
    finally:
        # The answer is written on the same socket, with the timeout it had.
        if sock is not None:
            sock.settimeout(before)


def _refuse_too_many_values(values: int, counted: str) -> None:
    if values > MAX_BODY_VALUES:
        raise RequestEntityTooLarge(
            f"the body holds up to {values} JSON values (counted by {counted}, those in"
            f" strings too); at most {MAX_BODY_VALUES} per request: send fewer or smaller"
            " events"
        )


def parse_body(body: bytes, ndjson: bool) -> Any:
    """Parse a publish body as NDJSON (into Lines) or JSON, its values counted first."""
    if ndjson:
        values = body.count(b",") + body.count(b"\n") + 1
        _refuse_too_many_values(values, "commas and newlines")
        return parse_lines(body)
    return parse_json(body)


def parse_json(body: bytes) -> Any:
    """Count the JSON values of a publish body, then parse it (no request context)."""
    _refuse_too_many_values(body.count(b",") + 1, "commas")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        if "number" in str(exc):
            # A number beyond a double's range: named (422) like any number that would
            # not be stored exactly, when the rest of the body is JSON.
            with contextlib.suppress(ValueError):
                refuse_inexact_numbers(body)
        hint = ""
        if exc.msg.startswith("unexpected content after") and exc.lineno > 1:
            hint = "; for one event per line send Content-Type: application/x-ndjson"
        raise BadRequest(f"malformed JSON: {exc}{hint}") from None


def validate_events(parsed: Any, body: bytes, derived: DerivedIds | None) -> list[dict[str, Any]]:
    """Validate parsed events, and refuse numbers that would not be stored exactly.

    Topics in DERIVE_EVENT_ID_TOPICS first get ids for events sent without,
    from the events as parsed, before the schema normalises them.
    """
    if isinstance(parsed, Lines):
        return _validate_lines(parsed, body, derived)
    if derived is not None:
        derived.fill(parsed)
    events = load_events(parsed)
    try:
        refuse_inexact_numbers(body)
    except ValueError as exc:  # JSON to orjson, not to the standard library: never seen.
        raise BadRequest(f"malformed JSON: {exc}") from None
    return events


def _validate_lines(lines: Lines, body: bytes, derived: DerivedIds | None) -> list[dict[str, Any]]:
    if derived is not None:
        derived.fill(lines.events)
    try:
        events = load_events(lines.events)
    except ValidationError as exc:
        raise ValidationError(by_line(exc.messages, lines.numbers)) from None
    refuse_inexact_numbers_by_line(body, lines.numbers)
    return events


def _in_pool(function: Callable[..., T], *args: Any) -> T:
    """Run `function` in gevent's thread pool; its exception is raised here."""
    result, error = gevent.get_hub().threadpool.apply(_outcome, (function, *args))
    if error is not None:
        raise error
    return result


def _outcome(function: Callable[..., T], *args: Any) -> tuple[T | None, Exception | None]:
    # Handed back rather than raised in the thread, which gevent would print
    # with the whole error (every refused body) before passing it on.
    try:
        return function(*args), None
    except Exception as exc:
        return None, exc


def _is_ndjson() -> bool:
    """Tell NDJSON from JSON by the Content-Type, refusing any other type with 415."""
    if request.is_json:
        return False
    if request.mimetype in NDJSON_TYPES:
        return True
    raise UnsupportedMediaType(
        "send the body as application/json (an event or an array) or application/x-ndjson"
        " (an event per line)"
    )


@contextlib.contextmanager
def publish_body(
    large_bodies: LargeBodies, derived: DerivedIds | None
) -> Iterator[tuple[bytes, list[dict[str, Any]]]]:
    """Yield the decoded publish body and its validated events, every step bounded before it runs.

    A large body's slot is held until the block ends (the events are handed
    over), since its memory lives until then.
    """
    ndjson = _is_ndjson()
    encoding = body_encoding(request.headers.get("Content-Encoding"))
    limit = current_app.config["MAX_CONTENT_LENGTH"]
    declared = request.content_length
    if declared is not None and declared > limit:
        raise RequestEntityTooLarge(f"the body is over {limit} bytes")
    if declared is not None:
        charge_body(declared)
    with contextlib.ExitStack() as held:
        large = declared is None or declared > LARGE_BODY_BYTES
        if large:
            large_bodies.hold(held)
        body = _read_body(current_app.config["BODY_READ_TIMEOUT"], limit)
        if declared is None:
            charge_body(len(body))
        if encoding == GZIP:
            body = large_bodies.inflate(body, limit, None if large else held)
            # The budget pays for what the body costs to handle: its decoded size.
            charge_body(len(body))
        yield body, large_bodies.events(body, ndjson, derived)
