"""Publish bodies read and parsed within bounds, so one client's body cannot stall the process.

Before a byte is read: the declared size against MAX_BODY_BYTES, the size
charged to the client's budget (app.auth), and a slot among the process's
MAX_LARGE_BODIES for a large body or one of unknown size (chunked), so
concurrent large bodies cannot fill the memory. After reading, before parsing:
the number of JSON values, counted as commas in C. Then a large body is parsed
and validated in gevent's thread pool: the event loop keeps serving the
process's other requests meanwhile (orjson holds the GIL while it parses, at
most ~50 ms under these bounds; marshmallow gives it up every few ms).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from collections.abc import Iterator
from typing import Any
from typing import TypeVar

import gevent
import orjson
from flask import current_app
from flask import request
from gevent import monkey
from werkzeug.exceptions import BadRequest
from werkzeug.exceptions import ClientDisconnected
from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.exceptions import RequestTimeout
from werkzeug.exceptions import ServiceUnavailable
from werkzeug.exceptions import UnsupportedMediaType

from app.auth import charge_body
from app.schemas import LARGE_BODY_BYTES
from app.schemas import MAX_BODY_VALUES
from app.schemas import MAX_OTHER_BODY_BYTES
from app.schemas import OFFLOAD_BODY_BYTES
from app.schemas import load_events

T = TypeVar("T")
# Endpoints that read a body; every other one refuses a large declared body unread.
BODY_ENDPOINTS = frozenset({"events.publish_events", "events.publish_batch"})
# Read in pieces of this size, so a chunked body over the limit is cut off there.
READ_CHUNK = 64 * 1024


class LargeBodies:
    """A process's slots for large bodies, and how long a request may wait for one."""

    def __init__(self, slots: int, wait_seconds: float) -> None:
        # A gevent semaphore under gevent (threading is patched): waiting yields.
        self._slots = threading.BoundedSemaphore(slots)
        self._wait = wait_seconds

    @contextlib.contextmanager
    def slot(self, size: int | None) -> Iterator[None]:
        """Hold a slot for the request's lifetime if its body is large or of unknown size."""
        if size is not None and size <= LARGE_BODY_BYTES:
            yield
            return
        if not self._slots.acquire(timeout=self._wait):
            raise ServiceUnavailable(
                "too many large bodies in progress on this server; retry shortly",
                retry_after=1,
            )
        try:
            yield
        finally:
            self._slots.release()


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


def parse_events(body: bytes) -> list[dict[str, Any]]:
    """Parse and validate a publish body (no request context: it may run in a thread)."""
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"malformed JSON: {exc}") from None
    return load_events(parsed)


def _outcome(function: Callable[[bytes], T], body: bytes) -> tuple[T | None, Exception | None]:
    # Handed back rather than raised in the thread, which gevent would print
    # with the whole error (every refused body) before passing it on.
    try:
        return function(body), None
    except Exception as exc:
        return None, exc


def off_the_loop(function: Callable[[bytes], T], body: bytes) -> T:
    """Run a CPU-bound step on a large body in gevent's thread pool; small ones inline."""
    if len(body) <= OFFLOAD_BODY_BYTES or not monkey.is_module_patched("socket"):
        return function(body)
    result, error = gevent.get_hub().threadpool.apply(_outcome, (function, body))
    if error is not None:
        raise error
    return result


@contextlib.contextmanager
def publish_body(large_bodies: LargeBodies) -> Iterator[tuple[bytes, list[dict[str, Any]]]]:
    """Yield the publish body and its validated events, every step bounded before it runs.

    A large body's slot is held until the block ends (the events are handed
    over), since its memory lives until then.
    """
    if not request.is_json:
        raise UnsupportedMediaType("send the body as application/json")
    limit = current_app.config["MAX_CONTENT_LENGTH"]
    declared = request.content_length
    if declared is not None and declared > limit:
        raise RequestEntityTooLarge(f"the body is over {limit} bytes")
    if declared is not None:
        charge_body(declared)
    with large_bodies.slot(declared):
        body = _read_body(current_app.config["BODY_READ_TIMEOUT"], limit)
        if declared is None:
            charge_body(len(body))
        values = body.count(b",") + 1
        if values > MAX_BODY_VALUES:
            raise RequestEntityTooLarge(
                f"the body holds up to {values} JSON values (counted by commas, those in"
                f" strings too); at most {MAX_BODY_VALUES} per request: send fewer or smaller"
                " events"
            )
        yield body, off_the_loop(parse_events, body)
