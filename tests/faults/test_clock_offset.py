"""A worker whose clock is off by minutes: leases and their ages come from one clock (Redis TIME).

kombu stamps a delivery, and sweeps for expired ones, with each host's own clock. A worker
whose clock is behind by more than the visibility timeout then looks dead to every other
worker: each sweep hands its batches to someone else, again and again; a worker whose clock
is ahead sweeps away everyone else's. Here one worker runs under libfaketime (Debian's
`faketime`, preloaded), ten minutes off, next to one with the real time: every batch runs
once, and is stored and counted once. Real gunicorn, Celery workers, Redis and PostgreSQL.
"""

from __future__ import annotations

import re
import time
from collections import Counter

import pytest
import requests
from sqlalchemy import Engine
from sqlalchemy import select

from app.db import batches
from scripts.services import RedisServer
from scripts.services import ServiceError
from scripts.services import find_libfaketime
from scripts.stack import Api
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

OFFSET_MINUTES = 10
BATCHES = 2


@pytest.fixture(scope="module")
def libfaketime() -> str:
    try:
        return str(find_libfaketime())
    except (ServiceError, OSError) as exc:
        pytest.skip(f"libfaketime is not installed and could not be installed: {exc}")


def skewed(libfaketime: str, minutes: int) -> dict[str, str]:
    """Environment that moves a process's wall clock (only) by `minutes`."""
    return {
        "LD_PRELOAD": libfaketime,
        "FAKETIME": f"{minutes:+d}m",
        # Timeouts and timers keep the real pace; only time.time() is off, as with a bad NTP.
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
    }


@pytest.mark.parametrize(
    ("holder_minutes", "sweeper_minutes"),
    [
        pytest.param(-OFFSET_MINUTES, 0, id="holder-behind"),
        pytest.param(0, OFFSET_MINUTES, id="sweeper-ahead"),
    ],
)
def test_worker_with_its_clock_off_runs_each_batch_once(
    holder_minutes: int,
    sweeper_minutes: int,
    libfaketime: str,
    api: Api,
    worker: Workers,
    broker: RedisServer,
    engine: Engine,
    fault_env: dict[str, str],
    clean: None,
) -> None:
    """One worker holds two slow batches; another one sweeps; one of them has its clock off."""
    started = time.monotonic()
    # The lock is held for more than two visibility timeouts: past DB_LOCK_TIMEOUT (10 s),
    # which would end the holder's wait first and make this a test of a retry instead.
    patient = {"DB_LOCK_TIMEOUT": "60"}
    holder = worker.start(
        **patient, **(skewed(libfaketime, holder_minutes) if holder_minutes else {})
    )
    topics = [f"clock-{n}" for n in range(BATCHES)]
    lock = TableLock(engine)
    try:
        for topic in topics:
            body = [make_event(f"{topic}-{i}", topic=topic) for i in range(100)]
            body += [make_event(f"{topic}-{i}", topic=topic) for i in range(10)]
            response = requests.post(f"{api.url}/publish", json=body, timeout=10)
            assert response.status_code == 202, response.text
        lock.wait_for_blocked_tasks(BATCHES)
        worker.start(**patient, **(skewed(libfaketime, sweeper_minutes) if sweeper_minutes else {}))
        # Two visibility timeouts with the other worker sweeping every second: with each
        # host's clock, the skewed leases look ten minutes old to the sweeper.
        visibility = float(fault_env["BROKER_VISIBILITY_TIMEOUT"])
        deadline = time.monotonic() + 2 * visibility
        wait_until(lambda: time.monotonic() >= deadline, timeout=3 * visibility)
    finally:
        lock.release()
    sent = 110 * BATCHES
    figures = settled_stats(api.url, received=sent, timeout=60)
    assert_broker_drained(broker)
    with engine.connect() as conn:
        ledger_rows = conn.execute(select(batches)).all()
    stored = stored_keys(engine, topics)
    log = worker.output()
    deliveries = Counter(
        {row.batch_id: log.count(f"store_batch[{row.batch_id}] received") for row in ledger_rows}
    )
    # The skewed worker says so (the clock check of its lease thread).
    offsets = [float(m) for m in re.findall(r"this host's clock is ([+-][\d.]+) s off", log)]
    report(
        f"clock-offset-{'holder-behind' if holder_minutes else 'sweeper-ahead'}",
        events_sent=sent,
        acknowledged=sent,
        lost=100 * BATCHES - len(stored),
        double_counted=max(0, figures["total_received_queued"] - sent),
        duration_s=time.monotonic() - started,
        faults=1,
        stored=len(stored),
        counted=figures["total_received_queued"],
        executions=sum(deliveries.values()),
        detected="y" if offsets else "n",
    )
    assert len(ledger_rows) == BATCHES
    assert all((row.received, row.stored, row.duplicates) == (110, 100, 10) for row in ledger_rows)
    assert len(stored) == 100 * BATCHES and max(stored.values()) == 1
    assert figures["total_received_queued"] == sent
    assert (figures["unique_processed_db"], figures["estimated_duplicate_dropped"]) == (
        100 * BATCHES,
        10 * BATCHES,
    )
    assert_adds_up(figures, engine, sent=sent)
    # Each batch ran once: nobody took it from the worker holding it (a second delivery
    # is tolerated for a lease that lapsed on this busy machine, not more).
    assert max(deliveries.values()) <= 2, deliveries
    assert sum(deliveries.values()) <= BATCHES + 1, deliveries
    expected = (holder_minutes or sweeper_minutes) * 60
    assert offsets and all(abs(offset - expected) < 30 for offset in offsets), offsets
    assert holder.executor.running()
    assert_still_processing(api.url)
