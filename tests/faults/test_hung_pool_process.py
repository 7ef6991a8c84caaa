"""A pool process that hangs holding a batch: the time limits take the batch from it.

Its main process goes on renewing the message's lease, so without a time limit nobody
else ever gets the batch. At the hard limit the pool process is killed and the message
handed back (not acknowledged, as Celery does by default for a timed-out task); at the
soft limit the task hands it back itself. Either way the batch is stored once, counted
once, and the broker drains. Real gunicorn, Celery workers, Redis and PostgreSQL.
"""

from __future__ import annotations

import os
import signal
import time

import psutil
import pytest
import requests
from sqlalchemy import Engine
from sqlalchemy import func
from sqlalchemy import select
from sqlalchemy import text

from app.db import batches
from app.db import broker_checkpoints
from scripts.services import PostgresServer
from scripts.services import RedisServer
from scripts.stack import Api
from scripts.stack import Worker
from scripts.stack import alive
from scripts.stack import wait_until
from tests.faults.harness import Workers
from tests.faults.harness import assert_broker_drained
from tests.faults.harness import assert_still_processing
from tests.faults.harness import report
from tests.faults.harness import stored_keys
from tests.helpers import TableLock
from tests.helpers import assert_adds_up
from tests.helpers import make_event
from tests.helpers import settled_stats

# Short limits, so the test does not wait for the defaults (120 s and 150 s). Resending is
# set too slow to act: a batch acknowledged by mistake would not come back within the test.
NO_RESEND = {"BROKER_RESEND_AFTER": "600"}
HARD_LIMIT = {"TASK_SOFT_TIME_LIMIT": "2", "TASK_TIME_LIMIT": "4", **NO_RESEND}
# A hard limit far away: only the soft one can act.
SOFT_LIMIT = {"TASK_SOFT_TIME_LIMIT": "2", "TASK_TIME_LIMIT": "60", **NO_RESEND}


def pool_process_waiting_on_lock(worker: Worker, engine: Engine) -> int:
    """Return the pid of the pool process whose database session waits for a lock."""
    with engine.connect() as conn:
        ports = set(
            conn.execute(
                text(
                    "SELECT client_port FROM pg_stat_activity"
                    " WHERE application_name = 'log-aggregator' AND wait_event_type = 'Lock'"
                    " AND datname = current_database()"
                )
            ).scalars()
        )
    holders = [
        pid
        for pid in worker.children()
        if any(c.laddr.port in ports for c in psutil.Process(pid).net_connections("tcp"))
    ]
    assert len(holders) == 1, (ports, holders)
    return holders[0]


def post_batch(url: str, topic: str) -> list[dict[str, object]]:
    """Publish 100 events and 10 repeats of them as one request (one batch)."""
    body = [make_event(f"{topic}-{i}", topic=topic) for i in range(100)]
    body += [make_event(f"{topic}-{i}", topic=topic) for i in range(10)]
    response = requests.post(f"{url}/publish", json=body, timeout=10)
    assert response.status_code == 202, response.text
    return body


def assert_stored_once_after(
    scenario: str,
    *,
    topic: str,
    api: Api,
    workers: Workers,
    broker: RedisServer,
    engine: Engine,
    started: float,
    detected: bool,
    deliveries_expected: int | None = 2,
) -> int:
    """The batch is stored once and counted once; return how often it was delivered."""
    figures = settled_stats(api.url, received=110, timeout=60)
    with engine.connect() as conn:
        ledger_rows = conn.execute(select(batches)).all()
    stored = stored_keys(engine, [topic])
    assert len(ledger_rows) == 1
    batch_id = ledger_rows[0].batch_id
    log = workers.output()
    deliveries = log.count(f"store_batch[{batch_id}] received")
    report(
        scenario,
        events_sent=110,
        acknowledged=110,
        lost=100 - len(stored),
        double_counted=max(0, figures["total_received_queued"] - 110),
        duration_s=time.monotonic() - started,
        faults=1,
        stored=len(stored),
        counted=figures["total_received_queued"],
        executions=deliveries,
        detected="y" if detected else "n",
    )
    assert (ledger_rows[0].received, ledger_rows[0].stored, ledger_rows[0].duplicates) == (
        110,
        100,
        10,
    )
    assert len(stored) == 100 and max(stored.values()) == 1
    assert figures["total_received_queued"] == 110
    assert (figures["unique_processed_db"], figures["estimated_duplicate_dropped"]) == (100, 10)
    assert (figures["failed_events"], figures["queued_events"]) == (0, 0)
    assert_adds_up(figures, engine, sent=110)
    if deliveries_expected is not None:
        # Once by the process that hung, once by the one that took over.
        assert deliveries == deliveries_expected, deliveries
    assert_broker_drained(broker)
    assert_still_processing(api.url)
    return deliveries


def test_stopped_pool_process_loses_its_batch_at_the_hard_time_limit(
    api: Api, worker: Workers, broker: RedisServer, engine: Engine, clean: None
) -> None:
    """SIGSTOP the pool process in the middle of a batch; nothing else is done to it."""
    started = time.monotonic()
    current = worker.start(**HARD_LIMIT)
    lock = TableLock(engine)
    stopped: int | None = None
    try:
        post_batch(api.url, "hung")
        lock.wait_for_blocked_tasks(1)
        stopped = pool_process_waiting_on_lock(current, engine)
        os.kill(stopped, signal.SIGSTOP)
        lock.release()
        # Celery logs the kill: the hang is detected, not merely outlived.
        wait_until(lambda: "Hard time limit (4s) exceeded" in worker.output(), timeout=30)
        assert_stored_once_after(
            "pool-process-stopped",
            topic="hung",
            api=api,
            workers=worker,
            broker=broker,
            engine=engine,
            started=started,
            detected=True,
        )
        assert not alive(stopped), "the stopped pool process was not killed"
        # The pool replaced it.
        wait_until(lambda: len(current.children()) == worker.concurrency, timeout=10)
    finally:
        lock.release()
        if stopped is not None and alive(stopped):
            os.kill(stopped, signal.SIGCONT)


def test_task_past_the_soft_time_limit_hands_its_batch_back(
    api: Api, worker: Workers, broker: RedisServer, engine: Engine, clean: None
) -> None:
    """A task held up past the soft limit rolls back and hands its batch back, not acks it."""
    started = time.monotonic()
    worker.start(**SOFT_LIMIT)
    lock = TableLock(engine)
    try:
        post_batch(api.url, "soft")
        lock.wait_for_blocked_tasks(1)
        wait_until(lambda: "Soft time limit (2s) exceeded" in worker.output(), timeout=30)
    finally:
        # The statement returns; the soft limit strikes in the task at once.
        lock.release()
    wait_until(lambda: "hit the soft time limit; back on the queue" in worker.output(), timeout=30)
    assert_stored_once_after(
        "task-past-soft-time-limit",
        topic="soft",
        api=api,
        workers=worker,
        broker=broker,
        engine=engine,
        started=started,
        detected=True,
    )


class TestSoftLimitDuringBackoff:
    """PostgreSQL is down: the task waits out its backoff, and the soft limit strikes there."""

    @pytest.fixture
    def fault_env(
        self, stack_env: dict[str, str], broker: RedisServer, postgres: PostgresServer
    ) -> dict[str, str]:
        return {**stack_env, "REDIS_URL": broker.url, "DATABASE_URL": postgres.url("aggregator")}

    def test_soft_limit_in_the_backoff_wait_hands_the_batch_back(
        self,
        postgres: PostgresServer,
        api: Api,
        worker: Workers,
        broker: RedisServer,
        outage_engine: Engine,
    ) -> None:
        started = time.monotonic()
        # The backoff doubles from 0.25 s: the fourth failure of a process waits 2 s,
        # past the 1 s soft limit.
        worker.start(
            TASK_SOFT_TIME_LIMIT="1", TASK_TIME_LIMIT="60", TASK_RETRY_BACKOFF_MAX="4", **NO_RESEND
        )
        # The broker needs its epoch (set by a check, which needs the database) to accept.
        wait_until(lambda: checkpoints(outage_engine) >= 1, timeout=15)
        postgres.stop()
        post_batch(api.url, "backoff")
        try:
            wait_until(
                lambda: "hit the soft time limit; back on the queue" in worker.output(), timeout=60
            )
        except TimeoutError:
            # Seen once in CI and not since (12 runs beside CPU hogs): say what the workers did.
            raise AssertionError(f"no hand-back at the soft limit:\n{worker.recent()}") from None
        postgres.start()
        assert_stored_once_after(
            "soft-time-limit-in-backoff",
            topic="backoff",
            api=api,
            workers=worker,
            broker=broker,
            engine=outage_engine,
            started=started,
            detected=True,
            deliveries_expected=None,
        )


def checkpoints(engine: Engine) -> int:
    with engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(broker_checkpoints)).scalar_one()
