"""Workers SIGKILLed mid-batch: the batch is redelivered, stored once and counted once.

These tests run their own broker, API and workers, so the session's worker
cannot take the messages they are about to kill.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from sqlalchemy import Engine
from sqlalchemy import func
from sqlalchemy import select

from app.db import batches
from app.db import events
from scripts.services import RedisServer
from scripts.services import private_redis
from scripts.stack import Api
from scripts.stack import Worker
from scripts.stack import wait_until
from tests.faults.harness import report
from tests.helpers import TableLock
from tests.helpers import assert_adds_up
from tests.helpers import make_event
from tests.helpers import publish
from tests.helpers import settled_stats


@pytest.fixture(scope="module")
def broker(scratch_dir: Path) -> Iterator[RedisServer]:
    with private_redis(scratch_dir / "redis-crash") as server:
        yield server


@pytest.fixture(scope="module")
def crash_env(stack_env: dict[str, str], broker: RedisServer) -> dict[str, str]:
    return {**stack_env, "REDIS_URL": broker.url}


@pytest.fixture(scope="module")
def crash_api(crash_env: dict[str, str], logs: Path) -> Iterator[Api]:
    server = Api(crash_env, logs / "crash-api.log").start()
    yield server
    server.stop()


@pytest.fixture
def workers(crash_env: dict[str, str], logs: Path) -> Iterator[list[Worker]]:
    """Start workers on demand; stop whatever is left at the end."""
    started: list[Worker] = []
    yield started
    for worker in started:
        worker.stop()


# Each test leaves one recovery path in reach: the others are set too slow to hide a failure.
ONLY_REJECT_ON_WORKER_LOST = {"BROKER_VISIBILITY_TIMEOUT": "300", "BROKER_RESEND_AFTER": "300"}
# The defaults for leases and visibility (30 s, swept every 5 s); no resending.
ONLY_LEASES_AT_DEFAULTS = {
    "BROKER_VISIBILITY_TIMEOUT": "",
    "BROKER_RESTORE_INTERVAL": "",
    "BROKER_RESEND_AFTER": "600",
}


def start_worker(
    workers: list[Worker], env: dict[str, str], logs: Path, **overrides: str
) -> Worker:
    worker = Worker({**env, **overrides}, logs / "crash-worker.log", concurrency=2).start()
    workers.append(worker)
    return worker


def assert_broker_empty(broker: RedisServer) -> None:
    client = redis.Redis.from_url(broker.url)
    wait_until(lambda: client.llen("celery") == 0 and client.hlen("unacked") == 0, timeout=30)


def assert_stored_once(engine: Engine, unique: int, batch_count: int) -> None:
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(events)).scalar() == unique
        assert conn.execute(select(func.count()).select_from(batches)).scalar() == batch_count


def test_killed_pool_process_mid_batch_is_redelivered(
    crash_api: Api,
    crash_env: dict[str, str],
    workers: list[Worker],
    logs: Path,
    engine: Engine,
    broker: RedisServer,
    clean: None,
) -> None:
    """task_reject_on_worker_lost hands the message back at once (nothing else is in reach)."""
    worker = start_worker(workers, crash_env, logs, **ONLY_REJECT_ON_WORKER_LOST)
    lock = TableLock(engine)
    try:
        publish(crash_api.url, [make_event(f"c-{i}") for i in range(200)])
        lock.wait_for_blocked_tasks(1)
        for pid in worker.children():
            os.kill(pid, signal.SIGKILL)
        wait_until(lambda: "WorkerLostError" in worker.output(), timeout=30)
    finally:
        lock.release()
    figures = settled_stats(crash_api.url, received=200, timeout=20)
    assert (figures["unique_processed_db"], figures["estimated_duplicate_dropped"]) == (200, 0)
    assert figures["total_received_queued"] == 200
    assert_adds_up(figures)
    assert_stored_once(engine, unique=200, batch_count=1)
    assert_broker_empty(broker)


def test_killed_main_process_mid_batch_is_stored_within_a_minute_at_default_settings(
    crash_api: Api,
    crash_env: dict[str, str],
    workers: list[Worker],
    logs: Path,
    engine: Engine,
    broker: RedisServer,
    clean: None,
) -> None:
    """The dead worker's leases run out after the default visibility timeout (no resending)."""
    worker = start_worker(workers, crash_env, logs, **ONLY_LEASES_AT_DEFAULTS)
    lock = TableLock(engine)
    try:
        # Two batches running (blocked on the lock) and one waiting in the queue,
        # with overlapping keys so the redelivered ones meet each other's rows.
        for start in (0, 100, 200):
            publish(crash_api.url, [make_event(f"m-{i}") for i in range(start, start + 150)])
        lock.wait_for_blocked_tasks(2)
        worker.kill_all()
        killed_at = time.monotonic()
    finally:
        lock.release()
    # Nothing was acknowledged: the messages wait in the unacked set until their
    # leases, no longer renewed, pass the visibility timeout and a new worker puts them back.
    client = redis.Redis.from_url(broker.url)
    assert client.hlen("unacked") >= 2
    start_worker(workers, crash_env, logs, **ONLY_LEASES_AT_DEFAULTS)
    figures = settled_stats(crash_api.url, received=450, timeout=90)
    recovered_in = time.monotonic() - killed_at
    report(
        "worker-main-killed-default-timings",
        events_sent=450,
        acknowledged=450,
        lost=450 - figures["unique_processed_db"] - figures["estimated_duplicate_dropped"],
        double_counted=max(0, figures["total_received_queued"] - 450),
        duration_s=recovered_in,
        faults=1,
        stored_after_s=round(recovered_in, 1),
    )
    assert recovered_in < 60, f"stored {recovered_in:.1f} s after the kill"
    assert figures["unique_processed_db"] == 350
    assert figures["estimated_duplicate_dropped"] == 100
    assert figures["total_received_queued"] == 450
    assert_adds_up(figures)
    assert_stored_once(engine, unique=350, batch_count=3)
    assert_broker_empty(broker)
