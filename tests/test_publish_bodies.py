"""NDJSON and gzip publish bodies, and ids derived by the server, against real gunicorn,
Celery, Redis and PostgreSQL: batches stored, errors named by line, bombs refused without
the API's memory growing, budgets charged for the decoded size, resent lines stored once."""

from __future__ import annotations

import gzip
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import requests

from aggregator_client.event_ids import derive_event_id
from scripts.stack import Api
from scripts.stack import Worker
from tests.helpers import settled_stats
from tests.helpers import topic_counters

NDJSON = "application/x-ndjson"
# Under this topic prefix the deriving API derives ids.
DERIVED_PREFIX = "shipped."


def event(topic: str, event_id: str | None, **overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "topic": topic,
        "timestamp": "2026-03-01T09:00:00+01:00",
        "source": "web-1",
        "payload": {"message": f"GET /{event_id} 200", "bytes": 512},
    }
    if event_id is not None:
        body["event_id"] = event_id
    body.update(overrides)
    return body


def lines(*events: dict[str, Any]) -> bytes:
    return b"".join(orjson.dumps(e) + b"\n" for e in events)


def post(
    url: str, body: bytes, content_type: str = NDJSON, encoding: str | None = None
) -> requests.Response:
    headers = {"Content-Type": content_type}
    if encoding is not None:
        headers["Content-Encoding"] = encoding
    return requests.post(f"{url}/publish", data=body, headers=headers, timeout=30)


def error(response: requests.Response, code: int) -> dict[str, Any]:
    assert response.status_code == code, response.text
    assert response.headers["Content-Type"] == "application/json"
    body: dict[str, Any] = response.json()
    assert body["code"] == code and body["message"]
    return body


def topic() -> str:
    return f"bodies-{secrets.token_hex(4)}"


@pytest.fixture
def url(api: Api, worker: Worker, clean: None) -> str:
    return api.url


@pytest.fixture(scope="module")
def deriving_api(stack_env: dict[str, str], logs: Path) -> Iterator[Api]:
    """One gunicorn worker (its memory can be read) deriving ids for `shipped.*` topics."""
    env = {**stack_env, "DERIVE_EVENT_ID_TOPICS": f"{DERIVED_PREFIX}*"}
    server = Api(env, logs / "deriving-api.log", workers=1).start()
    yield server
    server.stop()


@pytest.fixture
def deriving_url(deriving_api: Api, worker: Worker, clean: None) -> str:
    return deriving_api.url


def test_an_ndjson_batch_is_accepted_and_stored(url: str) -> None:
    name = topic()
    body = lines(*(event(name, f"e-{n}") for n in range(1000)))
    response = post(url, body)
    assert response.status_code == 202, response.text
    assert response.json()["accepted"] == 1000
    settled_stats(url, received=1000)
    assert topic_counters(url, prefix=name) == {
        name: {"stored": 1000, "duplicates": 0, "failed": 0}
    }


def test_a_bad_line_is_named_by_its_line_number(url: str) -> None:
    name = topic()
    events = [event(name, f"e-{n}") for n in range(1, 1001)]
    events[749]["timestamp"] = "yesterday"
    body = error(post(url, lines(*events)), 422)
    assert body["errors"] == {"line 750": {"timestamp": ["Not a valid datetime."]}}
    assert topic_counters(url, prefix=name) == {}


def test_a_line_that_is_not_json_is_400_naming_the_line(url: str) -> None:
    name = topic()
    body = lines(event(name, "a")) + b"\n" + b'{"topic": "' + name.encode() + b'",\n'
    answer = error(post(url, body), 400)
    assert "line 3 is not JSON" in answer["message"]


def test_the_json_array_shape_is_unchanged(url: str) -> None:
    name = topic()
    events = [event(name, "a"), event(name, "b", timestamp="yesterday")]
    body = error(post(url, orjson.dumps(events), "application/json"), 422)
    assert body["errors"] == {"1": {"timestamp": ["Not a valid datetime."]}}


@pytest.mark.parametrize("content_type", ["application/json", NDJSON, "application/jsonl"])
def test_gzip_bodies_are_accepted(url: str, content_type: str) -> None:
    name = topic()
    events = [event(name, f"e-{n}") for n in range(500)]
    raw = orjson.dumps(events) if content_type == "application/json" else lines(*events)
    response = post(url, gzip.compress(raw), content_type, encoding="gzip")
    assert response.status_code == 202, response.text
    assert response.json()["accepted"] == 500
    settled_stats(url, received=500)
    assert topic_counters(url, prefix=name)[name]["stored"] == 500


def test_a_gzip_body_that_inflates_past_a_large_body_is_accepted_chunked(url: str) -> None:
    # ~100 KiB compressed to ~2 KiB, sent without Content-Length: the read, the slot for
    # a large body taken once it inflates past 64 KiB, and the inflation off the loop.
    name = topic()
    raw = lines(*(event(name, f"e-{n}", payload={"n": n, "pad": "x" * 100}) for n in range(500)))
    packed = gzip.compress(raw)
    assert len(raw) > 64 * 1024 > len(packed)
    response = requests.post(
        f"{url}/publish",
        data=iter([packed[:1000], packed[1000:]]),
        headers={"Content-Type": NDJSON, "Content-Encoding": "gzip"},
        timeout=30,
    )
    assert response.status_code == 202, response.text
    settled_stats(url, received=500)
    assert topic_counters(url, prefix=name)[name]["stored"] == 500


def test_an_unknown_encoding_is_415_naming_the_supported_ones(url: str) -> None:
    packed = gzip.compress(lines(event(topic(), "a")))
    body = error(post(url, packed, encoding="br"), 415)
    assert "gzip" in body["message"] and "identity" in body["message"]


@pytest.mark.parametrize(
    "packed",
    [b"\x1f\x8b\x08\x00garbage", gzip.compress(b'{"topic":"t"}')[:-6], b'{"topic":"t"}'],
    ids=["corrupt", "cut-short", "not-compressed"],
)
def test_a_body_that_is_not_gzip_is_400(url: str, packed: bytes) -> None:
    body = error(post(url, packed, "application/json", encoding="gzip"), 400)
    assert "body is not valid gzip" in body["message"]


def _memory_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


def test_a_gzip_bomb_is_413_and_the_api_memory_does_not_grow_by_its_size(
    deriving_url: str, deriving_api: Api
) -> None:
    bomb_size = 100 * 1024 * 1024
    bomb = gzip.compress(b"\0" * bomb_size, compresslevel=9)
    assert len(bomb) < 2 * 1024 * 1024  # within MAX_BODY_BYTES as sent
    [pid] = deriving_api.worker_pids()
    # Reset the process's peak resident memory (VmHWM) to what it holds now.
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    before = _memory_kib(pid, "VmRSS")
    body = error(post(deriving_url, bomb, encoding="gzip"), 413)
    assert "inflates to more than" in body["message"]
    grown = _memory_kib(pid, "VmHWM") - before
    # MAX_BODY_BYTES (2 MiB) and a step at most, plus the request's own: never the bomb.
    assert grown * 1024 < bomb_size / 10, f"peak memory grew {grown} KiB"
    assert requests.get(f"{deriving_url}/health", timeout=10).status_code == 200


@pytest.fixture
def budget_url(stack_env: dict[str, str], logs: Path, worker: Worker) -> Iterator[str]:
    """An API whose per-client budget is 5 units a minute (a unit per 8 KiB of body)."""
    env = {**stack_env, "RATE_LIMIT": "5 per minute"}
    server = Api(env, logs / "budget-api.log", workers=1).start()
    yield server.url
    server.stop()


def test_the_budget_is_charged_for_the_decoded_size(budget_url: str) -> None:
    # One event of ~60 KiB: 8 units decoded, 1 as sent.
    raw = lines(event(topic(), "big", payload={"blob": secrets.token_hex(30 * 1024)}))
    packed = gzip.compress(raw)
    assert len(packed) < 8192 * 5 < 8192 * 7 < len(raw)
    body = error(post(budget_url, packed, encoding="gzip"), 413)
    assert "costs 8 of the budget" in body["message"]


def test_the_same_line_sent_twice_is_stored_once_with_a_derived_id(deriving_url: str) -> None:
    name = f"{DERIVED_PREFIX}{topic()}"
    line = event(name, None)
    # Once as NDJSON, once gzip'd in a JSON array: the same event, the same id.
    first = post(deriving_url, lines(line))
    second = post(deriving_url, gzip.compress(orjson.dumps([line])), "application/json", "gzip")
    assert (first.status_code, second.status_code) == (202, 202), (first.text, second.text)
    settled_stats(deriving_url, received=2)
    assert topic_counters(deriving_url, prefix=name) == {
        name: {"stored": 1, "duplicates": 1, "failed": 0}
    }
    stored = requests.get(f"{deriving_url}/events", params={"topic": name}, timeout=10).json()
    [only] = stored["events"]
    assert only["event_id"] == derive_event_id(line)


def test_an_own_id_is_kept_where_ids_are_derived(deriving_url: str) -> None:
    name = f"{DERIVED_PREFIX}{topic()}"
    assert post(deriving_url, lines(event(name, "mine"))).status_code == 202
    settled_stats(deriving_url, received=1)
    stored = requests.get(f"{deriving_url}/events", params={"topic": name}, timeout=10).json()
    assert [e["event_id"] for e in stored["events"]] == ["mine"]


def test_without_the_option_a_missing_id_is_422_naming_the_option(
    url: str, deriving_url: str
) -> None:
    # The default API derives nothing; the deriving one only for its topics.
    for target, name in ((url, f"{DERIVED_PREFIX}{topic()}"), (deriving_url, topic())):
        body = error(post(target, lines(event(name, "a"), event(name, None))), 422)
        [complaint] = body["errors"]["line 2"]["event_id"]
        assert "DERIVE_EVENT_ID_TOPICS" in complaint and "docs/event-ids.md" in complaint
