"""The cursors the API issues: opaque, URL-safe tokens for the log and for the topic pages."""

from __future__ import annotations

import base64
import re

# Exactly what encode_cursor writes (and what cursors from before positions held,
# "<txid>.<id>"): ASCII digits without sign, spaces or leading zeros, within bigint.
_POSITION = re.compile(r"p(0|[1-9][0-9]{0,18})")
_TXID_AND_ID = re.compile(r"(0|[1-9][0-9]{0,18})\.(0|[1-9][0-9]{0,18})")
_BIGINT_MAX = 2**63 - 1


class InvalidCursor(ValueError):
    """A pagination cursor that we did not issue."""


def _unbase64(cursor: str) -> str:
    """Decode URL-safe base64 (padding optional) strictly; InvalidCursor on anything else."""
    try:
        padded = (cursor + "=" * (-len(cursor) % 4)).encode()
        return base64.b64decode(padded, altchars=b"-_", validate=True).decode()
    except (ValueError, UnicodeError):
        raise InvalidCursor("cursor is not one this API issued") from None


def encode_cursor(position: int) -> str:
    """Turn a log position into an opaque, URL-safe cursor."""
    return base64.urlsafe_b64encode(f"p{position}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> int | tuple[int, int]:
    """Parse a cursor: a position, or (txid, id) from before migration 0005; else InvalidCursor."""
    # The (txid, id) form is still accepted from clients that saved one; the
    # log turns it into a position (app.store.reading).
    raw = _unbase64(cursor)
    if match := _POSITION.fullmatch(raw):
        numbers = [int(match[1])]
    elif match := _TXID_AND_ID.fullmatch(raw):
        numbers = [int(match[1]), int(match[2])]
    else:
        raise InvalidCursor("cursor is not one this API issued")
    # Beyond bigint, PostgreSQL would refuse the comparison (a 500, or a broken stream).
    if max(numbers) > _BIGINT_MAX:
        raise InvalidCursor("cursor is not one this API issued")
    return numbers[0] if len(numbers) == 1 else (numbers[0], numbers[1])


def encode_topic_cursor(topic: str) -> str:
    """Turn the last topic of a page into the cursor of the next one."""
    return base64.urlsafe_b64encode(topic.encode()).decode()


def decode_topic_cursor(cursor: str) -> str:
    """Return the topic a topic-page cursor continues after; else InvalidCursor."""
    try:
        topic = base64.b64decode(cursor.encode(), altchars=b"-_", validate=True).decode()
    except (ValueError, UnicodeError):
        topic = ""
    # Topics never hold NUL (PostgreSQL cannot store it, and would refuse the query).
    if not topic or "\x00" in topic:
        raise InvalidCursor("not a cursor this API issued")
    return topic
