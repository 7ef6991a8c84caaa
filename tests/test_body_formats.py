"""Unit tests of publish bodies' pure parts (no services): NDJSON with errors by line, gzip
inflated within a bound, Content-Encoding values, and ids derived for configured topics."""

from __future__ import annotations

import gzip
import tracemalloc
import zlib
from typing import Any

import orjson
import pytest
from marshmallow import ValidationError
from werkzeug.exceptions import BadRequest
from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.exceptions import UnsupportedMediaType

from aggregator_client.event_ids import derive_event_id
from app.bodies import parse_body
from app.bodies import validate_events
from app.config import SettingsError
from app.config import load_settings
from app.derived_ids import DerivedIds
from app.derived_ids import derived_ids
from app.gunzip import GZIP
from app.gunzip import IDENTITY
from app.gunzip import INFLATE_STEP
from app.gunzip import Inflater
from app.gunzip import body_encoding
from app.schemas import MAX_BATCH
from app.schemas import MAX_BODY_VALUES


def event(event_id: str | None = "e-1", **overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "topic": "orders",
        "event_id": event_id,
        "timestamp": "2026-01-01T12:00:00+01:00",
        "source": "tests",
        "payload": {"amount": 3},
    }
    if event_id is None:
        del body["event_id"]
    body.update(overrides)
    return body


def ndjson(*lines: Any) -> bytes:
    return b"".join(
        (line if isinstance(line, bytes) else orjson.dumps(line)) + b"\n" for line in lines
    )


def load(body: bytes, derived: DerivedIds | None = None) -> list[dict[str, Any]]:
    return validate_events(parse_body(body, ndjson=True), body, derived)


def refusal(body: bytes, derived: DerivedIds | None = None) -> Any:
    with pytest.raises(ValidationError) as refused:
        load(body, derived)
    return refused.value.messages


# NDJSON


def test_ndjson_lines_become_one_batch_and_blank_lines_are_skipped() -> None:
    body = ndjson(event("a"), b"", b"   \r", event("b")) + b"\n\n"
    events = load(body)
    assert [e["event_id"] for e in events] == ["a", "b"]
    # Normalised as a JSON batch is (timestamps in UTC).
    assert events[0]["timestamp"] == "2026-01-01T11:00:00+00:00"


def test_crlf_line_ends_are_taken() -> None:
    body = orjson.dumps(event("a")) + b"\r\n" + orjson.dumps(event("b")) + b"\r\n"
    assert len(load(body)) == 2


def test_errors_name_lines_counted_from_one_blank_lines_included() -> None:
    body = ndjson(event("a"), b"", event("b", timestamp="noon"), event("c", source=""))
    assert refusal(body) == {
        "line 3": {"timestamp": ["Not a valid datetime."]},
        "line 4": {"source": ["Length must be between 1 and 255."]},
    }


def test_unknown_fields_are_named_by_line() -> None:
    assert refusal(ndjson(event("a"), event("b", colour="red"))) == {
        "line 2": {"colour": ["Unknown field."]}
    }


def test_a_bad_line_among_a_thousand_is_named_by_its_line() -> None:
    lines = [event(f"e-{n}") for n in range(1, MAX_BATCH + 1)]
    lines[749] = event("e-750", timestamp="2026-01-01T12:00:00")
    assert refusal(ndjson(*lines)) == {"line 750": {"timestamp": ["Not a valid aware datetime."]}}


def test_a_line_that_is_not_an_object_is_named() -> None:
    messages = refusal(ndjson(event("a"), [event("b")]))
    assert list(messages) == ["line 2"]


def test_a_line_that_is_not_json_is_400_naming_it() -> None:
    body = ndjson(event("a")) + b'{"topic": "orders", oops}\n'
    with pytest.raises(BadRequest, match=r"line 2 is not JSON: .* at column 21"):
        load(body)


def test_a_line_nested_past_what_orjson_reads_is_400_naming_it() -> None:
    with pytest.raises(BadRequest, match="line 2 is not JSON: depth limit exceeded"):
        load(ndjson(event("a")) + b"[" * 2000 + b"]" * 2000 + b"\n")


def test_ndjson_sent_as_json_is_told_its_content_type() -> None:
    body = ndjson(event("a"), event("b"))
    with pytest.raises(BadRequest, match="send Content-Type: application/x-ndjson"):
        parse_body(body, ndjson=False)


def test_an_empty_ndjson_body_is_refused() -> None:
    assert refusal(b"\n \n") == {
        "_schema": [f"a batch holds 1 to {MAX_BATCH} events (lines), got 0"]
    }


def test_more_lines_than_a_batch_are_refused_before_parsing() -> None:
    # Not JSON at all: refused for its count, before any line is read.
    with pytest.raises(ValidationError, match="got 1001"):
        parse_body(b"x\n" * (MAX_BATCH + 1), ndjson=True)


def test_ndjson_values_are_counted_with_newlines() -> None:
    body = b"{}\n" * (MAX_BODY_VALUES // 2) + b"[" + b"," * (MAX_BODY_VALUES // 2) + b"]"
    with pytest.raises(RequestEntityTooLarge, match="commas and newlines"):
        parse_body(body, ndjson=True)


def test_inexact_numbers_are_named_by_line_and_path() -> None:
    body = ndjson(event("a"), event("b", payload={"n": 1}), b"")
    body += orjson.dumps(event("c"))[:-2] + b',"big":12345678901234567890123}}\n'
    assert refusal(body) == {
        "line 4": {
            "payload.big": [
                "12345678901234567890123 would not be stored exactly: integers must lie in"
                " -2**63..2**64-1 and other numbers within a double's precision (about 15"
                " significant digits); send it as a string"
            ]
        }
    }


def test_the_json_array_shape_keeps_its_index_keys() -> None:
    body = orjson.dumps([event("a"), event("b", timestamp="noon")])
    with pytest.raises(ValidationError) as refused:
        validate_events(parse_body(body, ndjson=False), body, None)
    assert refused.value.messages == {1: {"timestamp": ["Not a valid datetime."]}}


# gzip


def test_encodings_are_gzip_or_identity_and_others_are_415() -> None:
    assert body_encoding(None) == IDENTITY
    assert body_encoding("identity") == IDENTITY
    assert body_encoding(" GZip ") == GZIP
    assert body_encoding("x-gzip") == GZIP
    for other in ("br", "deflate", "gzip, gzip", "zstd"):
        with pytest.raises(UnsupportedMediaType, match="send gzip, or identity"):
            body_encoding(other)


def inflate(body: bytes, limit: int) -> bytes:
    inflater = Inflater(body, limit)
    assert inflater.run()
    return inflater.result()


def test_gzip_bodies_are_inflated_whole() -> None:
    text = ndjson(*(event(f"e-{n}") for n in range(300)))
    assert inflate(gzip.compress(text), 1 << 20) == text


def test_concatenated_gzip_members_are_one_body() -> None:
    assert inflate(gzip.compress(b"abc") + gzip.compress(b"def"), 100) == b"abcdef"


def test_inflating_stops_at_a_size_and_resumes() -> None:
    text = bytes(range(256)) * 2000
    inflater = Inflater(gzip.compress(text), 1 << 20)
    assert not inflater.run(upto=INFLATE_STEP)
    assert INFLATE_STEP < inflater.size <= 2 * INFLATE_STEP
    assert inflater.run()
    assert inflater.result() == text


def test_a_body_at_the_limit_passes_and_one_byte_more_is_413() -> None:
    assert len(inflate(gzip.compress(b"a" * 1000), 1000)) == 1000
    with pytest.raises(RequestEntityTooLarge, match="inflates to more than 999 bytes"):
        inflate(gzip.compress(b"a" * 1000), 999)


def test_a_bomb_is_refused_without_being_inflated_into_memory() -> None:
    limit = 2 * 1024 * 1024
    bomb = gzip.compress(b"\0" * (200 * 1024 * 1024), compresslevel=9)
    assert len(bomb) < 300 * 1024
    tracemalloc.start()
    try:
        with pytest.raises(RequestEntityTooLarge):
            inflate(bomb, limit)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # The limit and a step or two, never the bomb's 200 MiB.
    assert peak < limit + 4 * INFLATE_STEP


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"not gzip at all",
        orjson.dumps(event()),
        zlib.compress(b"{}"),  # zlib, not gzip
        gzip.compress(b"{}", mtime=0)[:-5],  # cut short
        gzip.compress(b"{}", mtime=0) + b"trailing",
    ],
)
def test_what_is_not_gzip_is_400(body: bytes) -> None:
    with pytest.raises(BadRequest, match="body is not valid gzip"):
        inflate(body, 1 << 20)


def test_corrupt_data_inside_a_gzip_stream_is_400() -> None:
    packed = bytearray(gzip.compress(bytes(range(256)) * 100))
    packed[20:30] = b"\xff" * 10
    with pytest.raises(BadRequest, match="body is not valid gzip"):
        inflate(bytes(packed), 1 << 20)


# Derived ids


def test_derived_ids_are_given_only_to_events_of_listed_topics_without_one() -> None:
    derived = DerivedIds(("logs", "app.*"))
    assert derived.applies("logs") and derived.applies("app.web") and derived.applies("app.")
    assert (
        not derived.applies("logs.x")
        and not derived.applies("application")
        and not (derived.applies(7))
    )
    sent = [
        event(None, topic="logs"),
        event(None, topic="app.web"),
        event("mine", topic="logs"),
        event(None, topic="orders"),
    ]
    originals = orjson.loads(orjson.dumps(sent))
    derived.fill(sent)
    assert sent[0]["event_id"] == derive_event_id(originals[0])
    assert sent[1]["event_id"] == derive_event_id(originals[1])
    assert sent[2]["event_id"] == "mine"
    assert "event_id" not in sent[3]


def test_a_star_derives_for_every_topic_and_nothing_derives_by_default() -> None:
    everything = derived_ids(("*",))
    assert everything is not None and everything.applies("any.topic")
    assert derived_ids(()) is None


def test_the_id_is_derived_from_the_event_as_sent_before_normalising() -> None:
    derived = DerivedIds(("*",))
    line = event(None, timestamp="2026-01-01T12:00:00+01:00")
    [stored] = load(ndjson(line), derived)
    # The hash covers the sent "+01:00" form; the stored timestamp is in UTC.
    assert stored["event_id"] == derive_event_id(line)
    assert stored["timestamp"] == "2026-01-01T11:00:00+00:00"
    # The same line in a JSON body gets the same id.
    body = orjson.dumps(line)
    [again] = validate_events(parse_body(body, ndjson=False), body, derived)
    assert again["event_id"] == stored["event_id"]


def test_without_the_option_a_missing_id_names_the_option_and_the_recipe() -> None:
    messages = refusal(ndjson(event("a"), event(None)))
    [complaint] = messages["line 2"]["event_id"]
    assert "DERIVE_EVENT_ID_TOPICS" in complaint and "docs/event-ids.md" in complaint


@pytest.mark.parametrize("depth", [300, 1000])
def test_a_payload_too_deep_to_write_is_refused_for_its_depth(depth: int) -> None:
    # Deeper than orjson (255 levels) or also Python's json (~1,000) write, within what orjson
    # reads (1,024): refused as too deep, not a 500, with or without an id to derive.
    body = orjson.dumps(event(None, payload={}))
    body = body.replace(b'"payload":{}', b'"payload":' + b'{"d":' * depth + b"{}" + b"}" * depth)
    with pytest.raises(ValidationError) as refused:
        validate_events(parse_body(body, ndjson=False), body, DerivedIds(("*",)))
    assert "nested deeper" in refused.value.messages["payload"][0]


def test_topic_patterns_come_from_the_environment() -> None:
    assert load_settings({}).derive_event_id_topics == ()
    loaded = load_settings({"DERIVE_EVENT_ID_TOPICS": " logs , app.* ,, *"})
    assert loaded.derive_event_id_topics == ("logs", "app.*", "*")
    with pytest.raises(SettingsError, match=r"'a\*b' has a '\*' before its end"):
        load_settings({"DERIVE_EVENT_ID_TOPICS": "a*b"})
