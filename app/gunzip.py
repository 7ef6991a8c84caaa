"""gzip-encoded publish bodies, inflated a step at a time within a bound on the decoded size.

A body of 2 KiB can inflate to gigabytes (a "zip bomb"): it is never inflated
in one call. Each step yields at most INFLATE_STEP bytes, and the body is
refused (413) as soon as the decoded size passes the limit, so the memory it
takes stays below the limit plus one step. zlib releases the GIL while it
inflates, so a step run in a thread leaves the event loop free.
"""

from __future__ import annotations

import zlib

from werkzeug.exceptions import BadRequest
from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.exceptions import UnsupportedMediaType

# Content-Encoding values of a publish body (RFC 9110: case-insensitive; x-gzip is gzip).
IDENTITY = "identity"
GZIP = "gzip"
ENCODINGS = {"": IDENTITY, "identity": IDENTITY, "gzip": GZIP, "x-gzip": GZIP}
# Output of one inflate call at most.
INFLATE_STEP = 64 * 1024
# Input of one inflate call at most: zlib copies what a call leaves unread, so
# feeding the whole body would copy it again on every step.
FEED_STEP = 16 * 1024
# zlib's window bits for a gzip wrapper (16 + the largest window), refusing raw deflate.
GZIP_WBITS = 16 + zlib.MAX_WBITS


def body_encoding(header: str | None) -> str:
    """Return IDENTITY or GZIP for a Content-Encoding header, or refuse others with 415."""
    encoding = ENCODINGS.get((header or "").strip().lower())
    if encoding is None:
        raise UnsupportedMediaType(
            f"Content-Encoding {header!r} is not supported; send gzip, or identity (no header)"
        )
    return encoding


class Inflater:
    """One gzip body being inflated, in steps that can be run in different threads (in turn)."""

    def __init__(self, body: bytes, limit: int) -> None:
        self._limit = limit
        self._body = memoryview(body)
        self._offset = 0
        self._unread = b""
        self._member = zlib.decompressobj(GZIP_WBITS)
        self._pieces: list[bytes] = []
        self.size = 0
        self.done = False

    def run(self, upto: int | None = None) -> bool:
        """Inflate until the decoded size passes `upto` (or the end); return whether it ended.

        Refuses the body with 413 past the limit and with 400 when it is not gzip.
        """
        stop = self._limit if upto is None else min(upto, self._limit)
        while not self.done and self.size <= stop:
            self._step()
        return self.done

    def result(self) -> bytes:
        """Return the whole decoded body (once run() has said it ended)."""
        assert self.done, "the body is not fully inflated yet"
        body = b"".join(self._pieces)
        self._pieces = [body]
        return body

    def _feed(self) -> bytes | memoryview:
        if self._unread:
            return self._unread
        chunk = self._body[self._offset : self._offset + FEED_STEP]
        self._offset += len(chunk)
        return chunk

    def _step(self) -> None:
        try:
            piece = self._member.decompress(self._feed(), INFLATE_STEP)
        except zlib.error as exc:
            raise BadRequest(f"body is not valid gzip: {exc}") from None
        self._unread = self._member.unconsumed_tail
        if piece:
            self.size += len(piece)
            if self.size > self._limit:
                # Dropped at once: what was inflated so far is freed with the request.
                self._pieces.clear()
                raise RequestEntityTooLarge(
                    f"the body inflates to more than {self._limit} bytes (MAX_BODY_BYTES"
                    " counts the decoded size)"
                )
            self._pieces.append(piece)
        more = self._offset < len(self._body)
        if self._member.eof:
            self._unread = self._member.unused_data
            if not self._unread and not more:
                self.done = True
                return
            # Concatenated gzip members are one body (RFC 1952).
            self._member = zlib.decompressobj(GZIP_WBITS)
        elif not piece and not self._unread and not more:
            raise BadRequest("body is not valid gzip: it ends before the gzip stream does")
