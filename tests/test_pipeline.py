"""End to end through real gunicorn, Redis, Celery and PostgreSQL: exact storage and counts."""

from __future__ import annotations

import random
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import requests
from sqlalchemy import Engine
from sqlalchemy import func
from sqlalchemy import select
from sqlalchemy import text

from aggregator_client.client import Client
from aggregator_client.events import plan_events
from aggregator_client.events import run_prefix
from aggregator_client.events import run_topics
from aggregator_client.verify import wait_and_verify
from app.db import batches
from app.db import events
from scripts.services import RedisServer
from scripts.stack import Api
from scripts.stack import Worker
from scripts.stack import wait_until
from tasks import celery_app
from tasks.ingest import store_batch
from tests.helpers import assert_adds_up
from tests.helpers import deadlocks
from tests.helpers import make_event
from tests.helpers import publish
from tests.helpers import settled_stats
from tests.helpers import stats


def worker_errors(worker: Worker) -> list[str]:
    return [
        line
        for line in worker.output().splitlines()
        if "ERROR" in line or "Traceback" in line or "CRITICAL" in line
    ]


@pytest.fixture
def url(api: Api, worker: Worker, clean: None) -> str:
    return api.url


def test_same_event_five_times_is_stored_once(url: str, engine: Engine) -> None:
    """Acceptance test B."""
    for _ in range(5):
        publish(url, make_event("b-1"))
    figures = settled_stats(url, received=5)
    assert figures["unique_processed_db"] == 1
    assert figures["estimated_duplicate_dropped"] == 4
    assert figures["total_received_queued"] == 5
    assert figures["failed_events"] == 0
    assert figures["topics"] == {"orders": {"stored": 1, "duplicates": 4, "failed": 0}}
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(events)).scalar() == 1


def test_first_stored_version_wins(url: str) -> None:
    publish(url, make_event("v-1", version=1))
    settled_stats(url, received=1)
    publish(url, [make_event("v-1", version=2), make_event("v-1", version=3)])
    settled_stats(url, received=3)
    page = requests.get(f"{url}/events", params={"topic": "orders"}, timeout=10).json()
    assert [e["payload"] for e in page["events"]] == [{"version": 1}]


def test_fifty_concurrent_identical_publishes_store_one_row(
    url: str, engine: Engine, worker: Worker
) -> None:
    """Acceptance test D: 3 gunicorn workers, 2 pool processes, one row, no errors anywhere."""
    body = make_event("d-1")
    barrier = threading.Barrier(50)

    def send(_: int) -> int:
        barrier.wait()
        return requests.post(f"{url}/publish", json=body, timeout=30).status_code

    with ThreadPoolExecutor(50) as pool:
        codes = list(pool.map(send, range(50)))
    assert codes == [202] * 50
    figures = settled_stats(url, received=50)
    assert (figures["unique_processed_db"], figures["estimated_duplicate_dropped"]) == (1, 49)
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(events)).scalar() == 1
    assert worker_errors(worker) == []


def test_concurrent_overlapping_batches_do_not_deadlock(
    url: str, worker: Worker, engine: Engine
) -> None:
    keys = [f"k-{i}" for i in range(300)]
    deadlocks_before = deadlocks(engine)

    def send(seed: int) -> int:
        shuffled = keys[:]
        random.Random(seed).shuffle(shuffled)
        batch = [make_event(k, topic=f"t{int(k[2:]) % 3}") for k in shuffled]
        return requests.post(f"{url}/publish", json=batch, timeout=30).status_code

    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(send, range(16)))
    assert codes == [202] * 16
    figures = settled_stats(url, received=16 * 300)
    assert figures["unique_processed_db"] == 300
    assert figures["estimated_duplicate_dropped"] == 15 * 300
    assert sum(t["stored"] for t in figures["topics"].values()) == 300
    assert_adds_up(figures, engine, sent=16 * 300)
    # Retried deadlocks would still add up; PostgreSQL counts every one it broke.
    assert deadlocks(engine) == deadlocks_before
    assert worker_errors(worker) == []


def test_batch_with_internal_duplicates_is_counted_exactly(url: str, engine: Engine) -> None:
    batch = [make_event(f"i-{i % 7}") for i in range(20)]
    publish(url, batch)
    figures = settled_stats(url, received=20)
    assert figures["unique_processed_db"] == 7
    assert figures["estimated_duplicate_dropped"] == 13
    assert_adds_up(figures, engine, sent=20)


def test_events_filters_and_fields(url: str) -> None:
    publish(
        url,
        [
            {**make_event("f-1", topic="a"), "timestamp": "2026-01-01T00:00:00+00:00"},
            {**make_event("f-2", topic="a"), "timestamp": "2026-02-01T00:00:00+00:00"},
            {**make_event("f-3", topic="b"), "source": "other"},
        ],
    )
    settled_stats(url, received=3)

    def ids(**params: Any) -> list[str]:
        page = requests.get(f"{url}/events", params=params, timeout=10).json()
        return [e["event_id"] for e in page["events"]]

    assert ids(topic="a") == ["f-1", "f-2"]
    assert ids(source="other") == ["f-3"]
    assert ids(topic="a", since="2026-01-15T00:00:00Z") == ["f-2"]
    assert ids(topic="a", until="2026-01-15T00:00:00Z") == ["f-1"]
    first = requests.get(f"{url}/events", params={"topic": "b"}, timeout=10).json()["events"][0]
    assert set(first) == {"topic", "event_id", "timestamp", "source", "payload", "stored_at"}
    assert first["payload"] == {"n": "f-3"}


def walk(url: str, limit: int, **params: Any) -> list[str]:
    seen: list[str] = []
    cursor = None
    while True:
        query = {"limit": limit, **params, **({"cursor": cursor} if cursor else {})}
        page = requests.get(f"{url}/events", params=query, timeout=10).json()
        seen.extend(e["event_id"] for e in page["events"])
        cursor = page["next_cursor"]
        if cursor is None:
            return seen


def test_pagination_walks_everything_once_while_writes_continue(url: str) -> None:
    publish(url, [make_event(f"p-{i:05d}") for i in range(500)])
    settled_stats(url, received=500)
    stop = threading.Event()
    sent = [500]

    def writer() -> None:
        n = 500
        while not stop.is_set() and n < 3000:
            publish(url, [make_event(f"p-{i:05d}") for i in range(n, n + 50)])
            n += 50
            sent[0] = n

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        during = walk(url, limit=37)
    finally:
        stop.set()
        thread.join()
    settled_stats(url, received=sent[0])
    after = walk(url, limit=100)
    assert len(during) == len(set(during)), "a page repeated an event"
    assert len(after) == sent[0] == len(set(after))
    # No gaps: what the walk saw while writes went on is exactly the start of
    # the complete order, so nothing committed late was skipped.
    assert during == after[: len(during)]
    assert len(during) >= 500


def test_stats_add_up_after_a_mixed_run(url: str, engine: Engine) -> None:
    publish(url, [make_event(f"m-{i}", topic=f"mix-{i % 2}") for i in range(100)])
    publish(url, [make_event(f"m-{i}", topic=f"mix-{i % 2}") for i in range(50, 150)])
    publish(url, make_event("m-1", topic="mix-1"))
    rejected = requests.post(f"{url}/publish", json=[make_event("m-x"), {"bad": 1}], timeout=10)
    assert rejected.status_code == 422
    figures = settled_stats(url, received=201)
    assert_adds_up(figures, engine, sent=201)
    assert figures["unique_processed_db"] == 150
    assert figures["estimated_duplicate_dropped"] == 51
    assert figures["queued_events"] == 0
    assert figures["topics"]["mix-0"] == {"stored": 75, "duplicates": 25, "failed": 0}
    assert figures["topics"]["mix-1"] == {"stored": 75, "duplicates": 26, "failed": 0}


def test_a_task_the_api_would_not_have_queued_is_refused_whole(
    url: str, engine: Engine, redis_server: RedisServer, worker: Worker
) -> None:
    # Queued around the API (Flower, anyone with the broker): NUL cannot be
    # stored in jsonb, and the API refuses it; so does the worker, whole. The
    # database's own refusals are dead-lettered, the rest of their batch stored
    # (test_dead_letter_is_replayed_after_the_cause_is_fixed, tests/test_store.py).
    poison = make_event("x-2")
    poison["payload"] = {"text": "bad\x00byte"}
    rows = [make_event("x-1"), poison, make_event("x-3")]
    with celery_app.connection_for_write(redis_server.url) as connection:
        store_batch.apply_async(args=("poison-batch", rows), connection=connection)
    wait_until(lambda: "'poison-batch' refused, nothing stored" in worker.output(), timeout=30)
    [line] = [line for line in worker.output().splitlines() if "'poison-batch' refused" in line]
    assert "NUL" in line
    figures = stats(url)
    assert (figures["total_received_queued"], figures["unique_processed_db"]) == (0, 0)
    assert_adds_up(figures, engine, sent=0)
    assert requests.get(f"{url}/dead-letters", timeout=10).json() == []
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(batches)).scalar_one() == 0


@pytest.mark.parametrize("batch_size, count", [(100, 3000), (1, 300)])
def test_publisher_run_verifies_exactly(
    url: str, engine: Engine, batch_size: int, count: int
) -> None:
    events = plan_events(count, 0.1, run_topics(run_prefix(), 3), "publisher")
    with Client(url, concurrency=8) as client:
        summary = client.publish(events, batch_size=batch_size)
        result = wait_and_verify(client, summary, timeout=60, poll=0.2)
    assert summary.errors == 0
    assert (summary.sent, summary.unique) == (count, count - count // 10)
    assert result.ok, result.message
    figures = stats(url)
    assert figures["unique_processed_db"] == summary.unique
    assert figures["estimated_duplicate_dropped"] == summary.duplicates
    assert_adds_up(figures, engine, sent=summary.sent)


def test_dead_letter_is_replayed_after_the_cause_is_fixed(url: str, engine: Engine) -> None:
    # A rule the database enforces and validation does not know about.
    with engine.begin() as conn:
        conn.execute(
            text(
                "ALTER TABLE events ADD CONSTRAINT ck_events_not_blocked"
                " CHECK (source <> 'blocked')"
            )
        )
    try:
        publish(url, [make_event("z-1"), {**make_event("z-2"), "source": "blocked"}])
        figures = settled_stats(url, received=2)
        assert (figures["unique_processed_db"], figures["failed_events"]) == (1, 1)
        [letter] = requests.get(f"{url}/dead-letters", timeout=10).json()
        assert "ck_events_not_blocked" in letter["error"]
        refused = requests.post(f"{url}/dead-letters/{letter['id']}/replay", timeout=10)
        assert refused.status_code == 422
        assert "still refuses" in refused.json()["errors"]["event"][0]
    finally:
        with engine.begin() as conn:
            conn.execute(text("ALTER TABLE events DROP CONSTRAINT IF EXISTS ck_events_not_blocked"))
    replayed = requests.post(f"{url}/dead-letters/{letter['id']}/replay", timeout=10)
    assert replayed.json() == {"id": letter["id"], "result": "stored"}
    figures = stats(url)
    assert (figures["unique_processed_db"], figures["failed_events"]) == (2, 0)
    assert_adds_up(figures, engine, sent=2)
    assert requests.get(f"{url}/dead-letters", timeout=10).json() == []
    again = requests.post(f"{url}/dead-letters/{letter['id']}/replay", timeout=10)
    assert again.status_code == 404
    # /metrics counts by first outcome, so "failed" never goes down: the replay is counted apart.
    samples = scrape(url)
    assert samples['aggregator_events_total{outcome="stored"}'] == 1
    assert samples['aggregator_events_total{outcome="failed"}'] == 1
    assert samples['aggregator_dead_letter_replays_total{result="stored"}'] == 1
    assert samples['aggregator_dead_letter_replays_total{result="duplicate"}'] == 0


def scrape(url: str) -> dict[str, float]:
    """GET /metrics as series -> value."""
    body = requests.get(f"{url}/metrics", timeout=10).text
    return {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in body.splitlines()
        if line and not line.startswith("#")
    }


def test_metrics_count_events_per_task_put_on_the_broker(url: str) -> None:
    before = scrape(url).get("aggregator_task_events_sum", 0.0)
    publish(url, [make_event(f"te-{i}") for i in range(7)])
    publish(url, make_event("te-7"))
    settled_stats(url, received=8)
    samples = scrape(url)
    # Group commit may join the two requests into one task: 8 events in 1 or 2 tasks.
    assert samples["aggregator_task_events_sum"] - before == 8
    assert samples["aggregator_task_events_count"] >= 1


def test_metrics_add_up_across_processes(url: str) -> None:
    publish(url, [make_event(f"mt-{i}") for i in range(30)])
    publish(url, make_event("mt-0"))
    settled_stats(url, received=31)
    samples = scrape(url)
    assert samples['aggregator_events_total{outcome="stored"}'] == 30
    assert samples['aggregator_events_total{outcome="duplicate"}'] == 1
    assert samples['aggregator_events_total{outcome="failed"}'] == 0
    assert samples['aggregator_broker_messages{state="ready"}'] == 0
    # Written by the Celery worker processes, read by the API through the shared directory.
    assert samples["aggregator_task_duration_seconds_count"] >= 2
    assert samples['aggregator_worker_events_total{outcome="stored"}'] >= 30
    assert any(k.startswith("aggregator_http_requests_total{") for k in samples)
