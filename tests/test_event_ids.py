"""The event_id recipe of the client library (aggregator_client.event_ids): fixed vectors that
docs/event-ids.md repeats, so other languages can check their implementation against them."""

from __future__ import annotations

import hashlib
import io
import re
from datetime import UTC
from datetime import datetime
from typing import Any

import pytest

from aggregator_client.event_ids import canonical_json
from aggregator_client.event_ids import derive_event_id
from aggregator_client.event_ids import line_event_id
from aggregator_client.events import InputError
from aggregator_client.events import LineNumbers
from aggregator_client.events import read_lines
from scripts.stack import ROOT

# The docs' example: one fixed vector with non-ASCII text and keys to sort.
VECTOR = {
    "topic": "orders",
    "source": "checkout",
    "timestamp": "2026-12-02T10:00:00Z",
    "payload": {"user": "u1", "total": 42, "note": "café ✓"},
}
VECTOR_CANONICAL = (
    '["orders","checkout","2026-12-02T10:00:00Z",{"note":"café ✓","total":42,"user":"u1"}]'
)
VECTOR_ID = "h:26f3408f804f2c8b1575263f8400c4e6"


def test_the_fixed_vector() -> None:
    content = [VECTOR[name] for name in ("topic", "source", "timestamp", "payload")]
    assert canonical_json(content).decode() == VECTOR_CANONICAL
    assert derive_event_id(VECTOR) == VECTOR_ID
    # Spelled out: SHA-256 of the UTF-8 text, its first 32 hex digits, after "h:".
    assert VECTOR_ID == "h:" + hashlib.sha256(VECTOR_CANONICAL.encode()).hexdigest()[:32]


def test_the_docs_show_the_same_vector() -> None:
    doc = (ROOT / "docs/event-ids.md").read_text()
    assert VECTOR_CANONICAL in doc
    assert VECTOR_ID in doc


@pytest.mark.parametrize(
    ("event", "canonical", "derived"),
    [
        # Missing fields are null; escapes and numbers as JSON (Python's json) writes them.
        (
            {"topic": "t", "payload": {}},
            '["t",null,null,{}]',
            "h:f57c37c7beb5310deb4f5d9523a1a48f",
        ),
        (
            {
                "topic": "logs",
                "source": "web-1",
                "timestamp": "2026-01-01T00:00:00.5+01:00",
                "payload": {"msg": 'line "1"\n\ttab', "b": [1.5, 2, True, None], "a": {"z": 0}},
            },
            '["logs","web-1","2026-01-01T00:00:00.5+01:00",'
            '{"a":{"z":0},"b":[1.5,2,true,null],"msg":"line \\"1\\"\\n\\ttab"}]',
            "h:670f588db1b92dca5de6c2cdc1efd3af",
        ),
    ],
)
def test_more_vectors(event: dict[str, Any], canonical: str, derived: str) -> None:
    content = [event.get(name) for name in ("topic", "source", "timestamp", "payload")]
    assert canonical_json(content).decode() == canonical
    assert derive_event_id(event) == derived


def test_the_id_ignores_the_event_id_and_key_order_but_not_content() -> None:
    same = {**dict(reversed(list(VECTOR.items()))), "event_id": "anything"}
    assert derive_event_id(same) == VECTOR_ID
    changed = {**VECTOR, "payload": {**VECTOR["payload"], "total": 43}}  # type: ignore[dict-item]
    assert derive_event_id(changed) != VECTOR_ID


def test_a_derived_id_is_a_valid_event_id() -> None:
    assert re.fullmatch(r"h:[0-9a-f]{32}", derive_event_id(VECTOR))


LINE_CANONICAL = '["nginx","web-1","/var/log/nginx/access.log",3,"GET /café 200"]'
LINE_ID = "l:" + hashlib.sha256(LINE_CANONICAL.encode()).hexdigest()[:32]


def test_a_raw_lines_id_is_its_place_and_text_hashed() -> None:
    assert line_event_id("nginx", "web-1", "/var/log/nginx/access.log", 3, "GET /café 200") == (
        LINE_ID
    )
    doc = (ROOT / "docs/event-ids.md").read_text()
    assert LINE_CANONICAL in doc and LINE_ID in doc


def test_raw_lines_become_events_named_by_place_and_text() -> None:
    when = datetime(2026, 12, 5, 9, 0, tzinfo=UTC)
    text = b"same\n\nsame\r\nother\n"
    numbers = LineNumbers()
    events = list(
        read_lines(io.BytesIO(text), topic="t", source="s", origin="o", lines=numbers, now=when)
    )
    assert [event["payload"] for event in events] == [
        {"message": "same", "origin": "o", "line": 1},
        {"message": "same", "origin": "o", "line": 3},
        {"message": "other", "origin": "o", "line": 4},
    ]
    # Equal lines at two places are two events; reading again gives the same ids.
    assert len({event["event_id"] for event in events}) == 3
    again = read_lines(io.BytesIO(text), topic="t", source="s", origin="o", now=when)
    assert [event["event_id"] for event in again] == [event["event_id"] for event in events]
    assert {event["timestamp"] for event in events} == {"2026-12-05T09:00:00+00:00"}
    assert [numbers.line(position) for position in range(3)] == [1, 3, 4]


def test_a_raw_line_that_is_not_utf8_is_refused_by_number_not_changed() -> None:
    lines = read_lines(io.BytesIO(b"fine\nbad \xff byte\n"), topic="t", source="s", origin="o")
    assert next(lines)["payload"]["message"] == "fine"
    with pytest.raises(InputError, match="line 2: not UTF-8 text"):
        next(lines)
