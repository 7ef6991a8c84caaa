"""Numbers and cursors against real gunicorn, Celery and PostgreSQL.

A number in a payload is stored exactly (the same value comes back from GET /events, as a page
and as NDJSON) or refused with 422 naming it (`payload.a.b[1]`); nothing is changed silently.
Every cursor the API did not issue gets 422 naming `cursor`, never a 500.
"""

from __future__ import annotations

import base64
import json
from decimal import Decimal
from typing import Any

import pytest
import requests

from scripts.stack import Api
from scripts.stack import Worker
from scripts.stack import wait_until
from tests.helpers import stats

# JSON number texts whose value survives every hop (orjson, msgpack, COPY into JSONB, back out).
EXACT = [
    "0",
    "-0",
    "7",
    "-9223372036854775808",
    "9223372036854775807",
    "18446744073709551615",
    "0.1",
    "-2.25",
    "1.0",
    "1E2",
    "1e-7",
    "1e22",
    "0.30000000000000004",
    "123456789012345.6",
    "0.0000000000000001",
    "5e-324",
    "1.7976931348623157e308",
]
# Texts a double or a 64-bit integer would change (or cannot hold at all).
REFUSED = [
    "18446744073709551616",
    "-9223372036854775809",
    "123456789012345678901234567890",
    "0.1000000000000000055511151231257827",
    "3.14159265358979323846264338327950288",
    "12345678901234567890.5",
    "4.9e-324",
    "1e-400",
    "1e400",
    "-1e400",
    "1" + "0" * 5000,
]


@pytest.fixture
def url(api: Api, worker: Worker, clean: None) -> str:
    return api.url


def event_text(event_id: str, payload: str, topic: str = "numbers") -> str:
    return (
        f'{{"topic":"{topic}","event_id":"{event_id}","timestamp":"2026-01-01T00:00:00Z",'
        f'"source":"tests","payload":{payload}}}'
    )


def post_raw(url: str, text: str) -> requests.Response:
    return requests.post(
        f"{url}/publish",
        data=text.encode(),
        headers={"Content-Type": "application/json"},
        timeout=10,
    )


def exact_json(text: str) -> Any:
    """Parse JSON keeping every number's exact decimal value."""
    return json.loads(text, parse_float=Decimal, parse_int=Decimal)


def assert_422(response: requests.Response) -> dict[str, Any]:
    assert response.status_code == 422, (response.status_code, response.text[:300])
    assert response.headers["Content-Type"] == "application/json"
    body = response.json()
    assert body["code"] == 422 and "Traceback" not in response.text
    return body["errors"]


def test_numbers_a_double_and_a_64_bit_integer_hold_round_trip_exactly(url: str) -> None:
    payload = "{" + ",".join(f'"n{i}":{text}' for i, text in enumerate(EXACT))
    payload += ',"nested":{"list":[' + ",".join(EXACT) + "]}}"
    response = post_raw(url, event_text("exact", payload))
    assert response.status_code == 202, response.text
    wait_until(lambda: stats(url)["unique_processed_db"] == 1, timeout=30)

    page = requests.get(f"{url}/events", params={"topic": "numbers"}, timeout=10)
    export = requests.get(
        f"{url}/events",
        params={"topic": "numbers"},
        headers={"Accept": "application/x-ndjson"},
        timeout=10,
    )
    assert page.status_code == 200 and export.status_code == 200
    for stored in (exact_json(page.text)["events"][0], exact_json(export.text.splitlines()[0])):
        returned = stored["payload"]
        for i, text in enumerate(EXACT):
            assert returned[f"n{i}"] == Decimal(text), (text, returned[f"n{i}"])
            assert returned["nested"]["list"][i] == Decimal(text), text


@pytest.mark.parametrize("text", REFUSED, ids=lambda text: text[:24])
def test_numbers_that_would_change_are_refused_naming_the_field(url: str, text: str) -> None:
    before = stats(url)["total_received_queued"]
    single = assert_422(post_raw(url, event_text("one", f'{{"a":{{"b":[1,{text}]}}}}')))
    assert list(single) == ["payload.a.b[1]"], single
    assert "exactly" in single["payload.a.b[1]"][0]
    # In a batch, under the event's index, like every other field error.
    batch = "[" + event_text("ok", '{"x":1}') + "," + event_text("bad", f'{{"x":{text}}}') + "]"
    errors = assert_422(post_raw(url, batch))
    assert errors == {"1": {"payload.x": errors["1"]["payload.x"]}}, errors
    # Refused whole: nothing of either request was accepted.
    assert stats(url)["total_received_queued"] == before


def test_payload_filter_with_a_number_that_would_change_is_refused(url: str) -> None:
    response = requests.get(
        f"{url}/events",
        params={"topic": "numbers", "payload": '{"n": 18446744073709551616}'},
        timeout=10,
    )
    errors = assert_422(response)
    assert "payload" in errors and "payload.n" in errors["payload"][0], errors


def cursor_of(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


INVALID_EVENT_CURSORS = [
    "zz",
    "%%%",
    cursor_of(b"p"),
    cursor_of(b"p-1"),
    cursor_of(b"p" + b"9" * 40),
    cursor_of(b"p\x00"),
    cursor_of(b"p 1"),
    cursor_of(b"p1_000"),
    cursor_of(b"p\xd9\xa3"),  # an Arabic-Indic digit, which int() would take
    cursor_of(b"1.2.3"),
    cursor_of(b"9" * 30 + b".1"),
    cursor_of(b"-1.5"),
    cursor_of(b"\xff\xfe"),
]
INVALID_TOPIC_CURSORS = [
    "%%%",
    "====",
    cursor_of(b"a\x00b"),
    cursor_of(b"\x00"),
    cursor_of(b"\xff\xfe"),
]


@pytest.mark.parametrize("cursor", INVALID_EVENT_CURSORS)
@pytest.mark.parametrize("accept", ["application/json", "application/x-ndjson"])
def test_every_invalid_events_cursor_is_422_naming_it(url: str, cursor: str, accept: str) -> None:
    response = requests.get(
        f"{url}/events", params={"cursor": cursor}, headers={"Accept": accept}, timeout=10
    )
    assert "cursor" in assert_422(response)


@pytest.mark.parametrize("cursor", INVALID_TOPIC_CURSORS)
def test_every_invalid_topic_cursor_is_422_naming_it(url: str, cursor: str) -> None:
    response = requests.get(f"{url}/stats/topics", params={"cursor": cursor}, timeout=10)
    assert "cursor" in assert_422(response)
