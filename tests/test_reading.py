"""Reading the log against real gunicorn, Celery and PostgreSQL: filters, strict queries,
following with long polls, and NDJSON export."""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import orjson
import pytest
import requests

from scripts.stack import Api
from scripts.stack import Worker
from scripts.stack import wait_until
from tests.helpers import make_event
from tests.helpers import publish


@pytest.fixture
def url(api: Api, worker: Worker, clean: None) -> str:
    return api.url


def events(url: str, **params: Any) -> requests.Response:
    return requests.get(f"{url}/events", params=params, timeout=40)


def stored(url: str, topic: str, count: int) -> None:
    """Wait until `count` events of the topic can be read."""
    wait_until(lambda: len(events(url, topic=topic, limit=1000).json()["events"]) == count)


@pytest.mark.parametrize(
    ("path", "names"),
    [
        ("/events?topik=orders", ["topik"]),
        ("/events?payload.user=u1&topic=t", ["payload.user"]),
        ("/events?limit=5&Cursor=x", ["Cursor"]),
        ("/stats?topic=orders", ["topic"]),
        ("/dead-letters?verbose=1", ["verbose"]),
    ],
)
def test_unknown_query_parameters_are_refused_by_name(
    url: str, path: str, names: list[str]
) -> None:
    response = requests.get(f"{url}{path}", timeout=10)
    assert response.status_code == 422, response.text
    assert sorted(response.json()["errors"]) == names


def test_payload_containment_filter_on_a_topic(url: str) -> None:
    topic = f"filter-{uuid.uuid4().hex[:6]}"
    batch = [
        make_event("a", topic=topic, user="u1", level="error"),
        make_event("b", topic=topic, user="u2", level="error"),
        make_event("c", topic=topic, user="u1", level="info"),
        make_event("d", topic=f"{topic}-other", user="u1"),
    ]
    publish(url, batch)
    stored(url, topic, 3)
    found = events(url, topic=topic, payload=orjson.dumps({"user": "u1"}).decode()).json()
    assert [e["event_id"] for e in found["events"]] == ["a", "c"]
    both = events(url, topic=topic, payload='{"user": "u1", "level": "error"}').json()
    assert [e["event_id"] for e in both["events"]] == ["a"]
    for params, field in (
        ({"payload": '{"user": "u1"}'}, "payload"),  # no topic
        ({"topic": topic, "payload": "[1]"}, "payload"),
        ({"topic": topic, "payload": "{nope"}, "payload"),
    ):
        refused = events(url, **params)
        assert refused.status_code == 422, refused.text
        assert field in refused.json()["errors"]


def test_a_waiting_request_returns_as_soon_as_an_event_follows_its_cursor(url: str) -> None:
    topic = f"follow-{uuid.uuid4().hex[:6]}"
    publish(url, make_event("first", topic=topic))
    stored(url, topic, 1)
    cursor = events(url, topic=topic, wait=1).json()["next_cursor"]
    assert cursor is not None
    # Nothing new: the request waits its time and hands the same cursor back.
    started = time.monotonic()
    idle = events(url, topic=topic, cursor=cursor, wait=1).json()
    assert idle == {"events": [], "next_cursor": cursor}
    assert time.monotonic() - started >= 0.9

    later = threading.Timer(1.0, lambda: publish(url, make_event("second", topic=topic)))
    later.start()
    started = time.monotonic()
    page = events(url, topic=topic, cursor=cursor, wait=20).json()
    waited = time.monotonic() - started
    later.join()
    assert [e["event_id"] for e in page["events"]] == ["second"]
    assert waited < 10  # the event, not the 20 s deadline, ended the wait
    assert page["next_cursor"] not in (None, cursor)


def test_a_follower_that_reconnects_at_random_sees_every_event_exactly_once(url: str) -> None:
    topic = f"tail-{uuid.uuid4().hex[:6]}"
    expected = [f"e-{n:03d}" for n in range(120)]

    def write() -> None:
        for start in range(0, len(expected), 10):
            publish(url, [make_event(i, topic=topic) for i in expected[start : start + 10]])
            time.sleep(0.05)  # writers keep publishing while the follower reads

    writer = threading.Thread(target=write)
    writer.start()
    seen: list[str] = []
    cursor = None
    rng = random.Random(7)
    deadline = time.monotonic() + 90
    while len(seen) < len(expected) and time.monotonic() < deadline:
        params: dict[str, Any] = {"topic": topic, "wait": 2, "limit": rng.choice([1, 7, 50])}
        if cursor is not None:
            params["cursor"] = cursor
        try:
            # Now and then the follower hangs up before the answer: it keeps its cursor.
            response = requests.get(
                f"{url}/events", params=params, timeout=rng.choice([0.05, 0.3, 5, 5])
            )
        except requests.Timeout:
            continue
        page = response.json()
        seen.extend(e["event_id"] for e in page["events"])
        cursor = page["next_cursor"] or cursor
    writer.join()
    assert sorted(seen) == expected
    assert len(seen) == len(set(seen))


def test_ndjson_export_streams_every_event_in_order_and_resumes_by_cursor(url: str) -> None:
    topic = f"export-{uuid.uuid4().hex[:6]}"
    ids = [f"x-{n:04d}" for n in range(1500)]
    for start in range(0, len(ids), 500):
        publish(url, [make_event(i, topic=topic) for i in ids[start : start + 500]])
    wait_until(lambda: exported(url, topic) == 1500, timeout=60)
    with requests.get(
        f"{url}/events",
        params={"topic": topic},
        headers={"Accept": "application/x-ndjson"},
        stream=True,
        timeout=30,
    ) as response:
        assert response.headers["Content-Type"].startswith("application/x-ndjson")
        lines = [orjson.loads(line) for line in response.iter_lines() if line]
    assert sorted(e["event_id"] for e in lines) == ids
    page_order = walk(url, topic)
    assert [e["event_id"] for e in lines] == page_order
    # Resume after line 1,000: the rest, nothing twice.
    resumed = requests.get(
        f"{url}/events",
        params={"topic": topic, "cursor": lines[999]["cursor"]},
        headers={"Accept": "application/x-ndjson"},
        timeout=30,
    )
    rest = [orjson.loads(line)["event_id"] for line in resumed.content.splitlines()]
    assert rest == page_order[1000:]


def exported(url: str, topic: str) -> int:
    response = requests.get(
        f"{url}/events",
        params={"topic": topic},
        headers={"Accept": "application/x-ndjson"},
        timeout=30,
    )
    return len(response.content.splitlines())


def walk(url: str, topic: str) -> list[str]:
    order: list[str] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"topic": topic, "limit": 1000}
        if cursor:
            params["cursor"] = cursor
        page = events(url, **params).json()
        order.extend(e["event_id"] for e in page["events"])
        cursor = page["next_cursor"]
        if cursor is None:
            return order


@pytest.fixture
def one_follower(stack_env: dict[str, str], logs: Path) -> Iterator[Api]:
    env = {**stack_env, "MAX_FOLLOWERS": "1"}
    server = Api(env, logs / "followers-api.log", workers=1).start()
    yield server
    server.stop()


def test_waiting_requests_are_bounded_per_process(one_follower: Api) -> None:
    topic = f"bound-{uuid.uuid4().hex[:6]}"
    # Three at once with MAX_FOLLOWERS=1: one waits its 2 s, the others are told to come back.
    with ThreadPoolExecutor(3) as pool:
        answers = list(pool.map(lambda _: events(one_follower.url, topic=topic, wait=2), range(3)))
    assert sorted(a.status_code for a in answers) == [200, 503, 503]
    assert all(int(a.headers["Retry-After"]) >= 1 for a in answers if a.status_code == 503)


def test_stats_is_constant_in_size_and_topics_page_by_prefix(url: str) -> None:
    run = f"topics-{uuid.uuid4().hex[:6]}"
    names = [f"{run}.{n:02d}" for n in range(25)] + [f"{run}x", f"{run[:-1]}"]
    publish(url, [make_event("e", topic=name) for name in names])
    wait_until(lambda: requests.get(f"{url}/stats", timeout=10).json()["unique_processed_db"] >= 27)
    figures = requests.get(f"{url}/stats", timeout=10).json()
    assert "topics" not in figures
    seen: list[str] = []
    params: dict[str, Any] = {"prefix": f"{run}.", "limit": 10}
    while True:
        page = requests.get(f"{url}/stats/topics", params=params, timeout=10).json()
        assert len(page["topics"]) <= 10
        seen.extend(row["topic"] for row in page["topics"])
        if page["next_cursor"] is None:
            break
        params["cursor"] = page["next_cursor"]
    assert seen == sorted(f"{run}.{n:02d}" for n in range(25))
    one = requests.get(f"{url}/stats/topics", params={"prefix": f"{run}.03"}, timeout=10).json()
    assert one == {
        "topics": [{"topic": f"{run}.03", "stored": 1, "duplicates": 0, "failed": 0}],
        "next_cursor": None,
    }
    bad = requests.get(f"{url}/stats/topics", params={"cursor": "%%%"}, timeout=10)
    assert bad.status_code == 422
