"""A full broker: the backlog budget answers 503 first, maxmemory refuses whole acceptances only.

Workers never exit on Redis's OOM error, and no accepted batch is lost while the broker
is full and the database away.
"""

from __future__ import annotations

import re
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import redis
import requests
from sqlalchemy import Engine

from scripts.services import PostgresServer
from scripts.services import RedisServer
from scripts.services import private_redis
from scripts.stack import Api
from scripts.stack import wait_until
from tasks.pending import IDEMPOTENCY_KEY
from tasks.pending import MESSAGE_KEY
from tasks.pending import PENDING_KEY
from tasks.pending import QUEUE_KEY
from tasks.pending import STATE_KEY
from tasks.pending import idempotency_record
from tests.faults.harness import PacedPublisher
from tests.faults.harness import Workers
from tests.faults.harness import check_invariants
from tests.faults.harness import fatal_lines
from tests.faults.harness import report
from tests.helpers import assert_adds_up
from tests.helpers import make_event
from tests.helpers import settled_stats


def publish_503s(api: Api) -> float:
    """Return how many publish requests the API answered 503."""
    text = requests.get(f"{api.url}/metrics", timeout=10).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith("aggregator_http_requests_total{") and 'status="503"' in line:
            if "publish" in line:
                total += float(line.rsplit(" ", 1)[1])
    return total


def broker_snapshot(client: redis.Redis) -> tuple[int, int, int, bytes | None]:
    """What an acceptance writes: queue, pending marks, resend copies, and the sequence."""
    return (
        client.llen(QUEUE_KEY),
        client.hlen(PENDING_KEY),
        client.hlen(MESSAGE_KEY),
        client.hget(STATE_KEY, "seq"),
    )


class TestBacklogBudget:
    @pytest.fixture
    def fault_env(self, stack_env: dict[str, str], broker: RedisServer) -> dict[str, str]:
        # About ten 100-event batches (each held twice: message and resend copy).
        return {**stack_env, "REDIS_URL": broker.url, "BROKER_MAX_BACKLOG_BYTES": "500000"}

    def test_backlog_over_budget_gives_503_until_workers_catch_up(
        self, api: Api, worker: Workers, broker: RedisServer, engine: Engine, clean: None
    ) -> None:
        accepted = 0
        refused: requests.Response | None = None
        for n in range(100):
            body = [make_event(f"bp-{n}-{i}", topic="budget") for i in range(100)]
            response = requests.post(f"{api.url}/publish", json=body, timeout=10)
            if response.status_code == 503:
                refused = response
                break
            assert response.status_code == 202, response.text
            accepted += 100
        assert refused is not None, "the backlog budget never answered 503"
        assert 300 <= accepted <= 3000
        assert refused.headers["Retry-After"]
        assert "unstored work" in refused.json()["message"]
        with redis.Redis.from_url(broker.url) as client:
            # The refused request left nothing behind.
            assert client.hlen(PENDING_KEY) == accepted // 100
            assert client.llen(QUEUE_KEY) == accepted // 100

        worker.start()
        figures = settled_stats(api.url, received=accepted, timeout=60)
        assert_adds_up(figures, engine, sent=accepted)
        response = requests.post(
            f"{api.url}/publish", json=[make_event("after", topic="budget")], timeout=10
        )
        assert response.status_code == 202, response.text


def test_acceptance_refused_at_maxmemory_writes_nothing(
    api: Api, worker: Workers, broker: RedisServer, engine: Engine, clean: None
) -> None:
    """maxmemory reached: no 202, and not one of the acceptance's writes happened."""
    worker.start()
    key = uuid.uuid4().hex
    body = [make_event(f"oom-{i}", topic="oom") for i in range(50)]
    with redis.Redis.from_url(broker.url) as client:
        # Load the script first, so the refusal comes from the memory check alone.
        warm = requests.post(f"{api.url}/publish", json=make_event("warm", "oom"), timeout=10)
        assert warm.status_code == 202
        settled_stats(api.url, received=1, timeout=30)
        before = broker_snapshot(client)
        client.config_set("maxmemory", max(1, int(client.info("memory")["used_memory"]) // 2))
        try:
            response = requests.post(
                f"{api.url}/publish", json=body, headers={"Idempotency-Key": key}, timeout=10
            )
            assert response.status_code == 503, response.text
            assert response.headers["Retry-After"]
            assert broker_snapshot(client) == before
            assert idempotency_record(client, "-", key) is None
        finally:
            client.config_set("maxmemory", 0)
    again = requests.post(
        f"{api.url}/publish", json=body, headers={"Idempotency-Key": key}, timeout=10
    )
    assert again.status_code == 202, again.text
    assert "Idempotent-Replayed" not in again.headers
    figures = settled_stats(api.url, received=51, timeout=30)
    assert figures["topics"]["oom"] == {"stored": 51, "duplicates": 0, "failed": 0}
    assert_adds_up(figures, engine, sent=51)


class TestFullBrokerDuringDatabaseOutage:
    """Redis with a small maxmemory while PostgreSQL is stopped for 20 s."""

    @pytest.fixture
    def broker(self, scratch_dir: Path) -> Iterator[RedisServer]:
        datadir = scratch_dir / f"redis-memory-{uuid.uuid4().hex[:6]}"
        with private_redis(datadir, maxmemory="3mb") as server:
            yield server

    @pytest.fixture(params=["budget", "maxmemory"])
    def fault_env(
        self,
        request: pytest.FixtureRequest,
        stack_env: dict[str, str],
        broker: RedisServer,
        postgres: PostgresServer,
    ) -> dict[str, str]:
        # "budget": the API's budget (300 kB of messages) refuses well before Redis would
        # (Redis needs several times the bytes the budget counts, for keys and buffers);
        # "maxmemory": the budget is out of reach and Redis itself refuses writes.
        budget = "300000" if request.param == "budget" else "1000000000"
        return {
            **stack_env,
            "REDIS_URL": broker.url,
            "DATABASE_URL": postgres.url("aggregator"),
            "BROKER_MAX_BACKLOG_BYTES": budget,
        }

    def test_full_broker_gives_503s_and_loses_nothing(
        self,
        fault_env: dict[str, str],
        postgres: PostgresServer,
        api: Api,
        worker: Workers,
        broker: RedisServer,
        outage_engine: Engine,
    ) -> None:
        started = time.monotonic()
        worker.start()
        exits = restart_workers_that_exit(worker)
        try:
            with PacedPublisher(api.url, 6000, spread=12.0, batch_size=100, max_retries=60) as run:
                wait_until(lambda: run.answered() >= 3, timeout=30)
                postgres.stop()
                wait_until(lambda: publish_503s(api) >= 10, timeout=60)
                down_for = 20.0
                outage_ends = time.monotonic() + down_for
                wait_until(lambda: time.monotonic() >= outage_ends, timeout=down_for + 5)
                postgres.start()
                summary = run.wait(timeout=180)
        finally:
            exits.stop()
        assert summary.errors == 0, summary.first_error
        check_invariants(
            "full-broker-during-database-outage",
            run=run,
            summary=summary,
            api=api,
            engine=outage_engine,
            broker=broker,
            started=started,
            faults=1,
            settle=120,
        )
        assert exits.count == 0, f"workers exited {exits.count} time(s): {fatal_lines(worker)}"
        # Which of the two refused: Redis counts the commands it refused for memory.
        with redis.Redis.from_url(broker.url) as client:
            errors = client.info("errorstats")
        refused = int(errors.get("errorstat_OOM", {}).get("count", 0))
        if int(fault_env["BROKER_MAX_BACKLOG_BYTES"]) < 3 * 1024 * 1024:
            assert refused == 0, "the budget should have answered before maxmemory"
        else:
            assert refused > 0, f"Redis never reached maxmemory: {errors}"
        assert not re.search(r"Unrecoverable error", worker.output())


class WorkerRestarts:
    """Restarts the current worker whenever it exits, counting how often."""

    def __init__(self, workers: Workers) -> None:
        self.workers = workers
        self.count = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            if not self.workers.current.executor.running():
                self.count += 1
                self.workers.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=70)


def restart_workers_that_exit(workers: Workers) -> WorkerRestarts:
    return WorkerRestarts(workers)


def test_idempotency_records_are_not_evicted_and_retries_under_pressure_count_once(
    api: Api, worker: Workers, broker: RedisServer, engine: Engine, clean: None
) -> None:
    """Records used to have a TTL: `volatile-ttl` evicted them and retries counted twice."""
    worker.start()
    keys = [uuid.uuid4().hex for _ in range(1000)]
    bodies = {key: make_event(f"ev-{key}", topic="evict") for key in keys}

    def send(key: str) -> requests.Response:
        return requests.post(
            f"{api.url}/publish", json=bodies[key], headers={"Idempotency-Key": key}, timeout=30
        )

    with ThreadPoolExecutor(8) as pool:
        first = list(pool.map(send, keys))
    assert all(response.status_code == 202 for response in first)
    settled_stats(api.url, received=1000, timeout=60)
    with redis.Redis.from_url(broker.url) as client:
        client.config_set("maxmemory-policy", "volatile-ttl")
        used = int(client.info("memory")["used_memory"])
        # Below what Redis holds: every command now makes it look for a key to evict.
        client.config_set("maxmemory", used - 64 * 1024)
        try:
            with ThreadPoolExecutor(8) as pool:
                retries = list(pool.map(send, keys))
            evicted = int(client.info("stats")["evicted_keys"])
            records = client.hlen(IDEMPOTENCY_KEY)
        finally:
            client.config_set("maxmemory", 0)
        metrics = requests.get(f"{api.url}/metrics", timeout=10).text
    statuses = Counter(response.status_code for response in retries)
    replayed = sum(r.headers.get("Idempotent-Replayed") == "true" for r in retries)
    figures = settled_stats(api.url, received=1000, timeout=60)
    report(
        "idempotency-records-under-eviction-pressure",
        events_sent=2000,
        acknowledged=statuses[202],
        lost=0,
        double_counted=figures["total_received_queued"] - 1000,
        duration_s=0,
        evicted_keys=evicted,
        replayed=replayed,
    )
    # Redis evicted what has a TTL (kombu's sweep lock, remote-control replies), none of ours.
    assert records == 1000
    assert statuses == Counter({202: 1000}) and replayed == 1000, statuses
    assert figures["total_received_queued"] == 1000
    assert figures["topics"]["evict"] == {"stored": 1000, "duplicates": 0, "failed": 0}
    assert_adds_up(figures, engine, sent=1000)
    assert f'aggregator_broker_evicted_keys_total{{policy="volatile-ttl"}} {evicted}.0' in metrics
    assert 'aggregator_broker_budget{budget="idempotency_records",kind="used"} 1000.0' in metrics
