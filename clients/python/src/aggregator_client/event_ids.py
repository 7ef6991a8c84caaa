"""The stable `event_id` of an event sent without one: a content hash anyone can compute.

The recipe (docs/event-ids.md, with a fixed vector to check other languages
against): take `[topic, source, timestamp, payload]` as sent (a missing field
is null), write it as canonical JSON (keys sorted by code point, no spaces,
UTF-8, non-ASCII characters as themselves), hash it with SHA-256, and keep the
first 32 hex digits after the prefix `h:`. The same event sent again gets the
same id, so the aggregator stores it once. The server derives the same id for
topics listed in DERIVE_EVENT_ID_TOPICS.

Raw log lines (`aggregator publish --lines`) are named instead by where they are
and what they say (`line_event_id`), as the rsyslog recipe does: the same file
read again gives the same ids, and two equal lines at different places stay two
events.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

# Marks a derived id, so it cannot be mistaken for a sender's own (UUIDs, numbers, names).
DERIVED_PREFIX = "h:"
# 128 bits of the digest: a collision among 10^15 events is about as likely as 1 in 10^8.
DERIVED_HEX_DIGITS = 32
# The fields hashed, in this order; event_id is not one of them.
HASHED_FIELDS = ("topic", "source", "timestamp", "payload")


def canonical_json(value: Any) -> bytes:
    """Write a JSON value the way the recipe hashes it: sorted keys, no spaces, UTF-8."""
    text = json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )
    return text.encode("utf-8")


def derive_event_id(event: Mapping[str, Any]) -> str:
    """Return the derived id of an event: `h:` and 32 hex digits of SHA-256 over its content."""
    content = [event.get(name) for name in HASHED_FIELDS]
    digest = hashlib.sha256(canonical_json(content)).hexdigest()
    return DERIVED_PREFIX + digest[:DERIVED_HEX_DIGITS]


# Marks an id named by a line's place in its input, beside `h:` for content hashes.
LINE_PREFIX = "l:"


def line_event_id(topic: str, source: str, origin: str, line: int, message: str) -> str:
    """Return the id of a raw line: `l:` and 32 hex digits of SHA-256 over
    `[topic, source, origin, line, message]` as canonical JSON (origin: the file's
    absolute path, or `stdin`; line: its number from 1)."""
    digest = hashlib.sha256(canonical_json([topic, source, origin, line, message])).hexdigest()
    return LINE_PREFIX + digest[:DERIVED_HEX_DIGITS]
