"""The cursors the API issues: opaque, URL-safe tokens for the log and for the topic pages."""

from __future__ import annotations

import base64
import binascii


class InvalidCursor(ValueError):
    """A pagination cursor that we did not issue."""


def encode_cursor(position: int) -> str:
    """Turn a log position into an opaque, URL-safe cursor."""
    return base64.urlsafe_b64encode(f"p{position}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> int | tuple[int, int]:
    """Parse a cursor: a position, or (txid, id) from before migration 0005; else InvalidCursor."""
    # The (txid, id) form is still accepted from clients that saved one; the
    # log turns it into a position (app.store.reading).
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        if raw.startswith("p"):
            return int(raw[1:])
        txid, row_id = raw.split(".")
        return int(txid), int(row_id)
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise InvalidCursor("cursor is not one this API issued") from None


def encode_topic_cursor(topic: str) -> str:
    """Turn the last topic of a page into the cursor of the next one."""
    return base64.urlsafe_b64encode(topic.encode()).decode()


def decode_topic_cursor(cursor: str) -> str:
    """Return the topic a topic-page cursor continues after; else InvalidCursor."""
    try:
        topic = base64.b64decode(cursor.encode(), altchars=b"-_", validate=True).decode()
    except (ValueError, UnicodeDecodeError):
        topic = ""
    if not topic:
        raise InvalidCursor("not a cursor this API issued")
    return topic
