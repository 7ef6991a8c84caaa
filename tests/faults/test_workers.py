"""Worker processes killed, slow or caught mid-fetch: nothing lost, nothing counted twice."""

from __future__ import annotations

import contextlib
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable

import pytest
import redis
import requests
from sqlalchemy import Engine
from sqlalchemy import select

from app.db import batches
from scripts.services import ROOT
from scripts.services import RedisServer
from scripts.stack import Api
from scripts.stack import alive
from scripts.stack import wait_until
from tests.faults.harness import PacedPublisher
from tests.faults.harness import Workers
from tests.faults.harness import assert_broker_drained
from tests.faults.harness import assert_still_processing
from tests.faults.harness import check_invariants
from tests.faults.harness import kill_and_wait
from tests.faults.harness import ledger
from tests.faults.harness import report
from tests.faults.harness import stored_keys
from tests.helpers import TableLock
from tests.helpers import assert_adds_up
from tests.helpers import make_event
from tests.helpers import settled_stats
from tests.helpers import stats

# --- 1. worker chaos --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("count", "kills", "settle"),
    [
        pytest.param(6000, 7, 40, id="6k"),
        pytest.param(20000, 20, 120, id="20k", marks=pytest.mark.soak),
    ],
)
def test_random_worker_kills_lose_and_double_count_nothing(
    count: int,
    kills: int,
    settle: float,
    api: Api,
    worker: Workers,
    broker: RedisServer,
    engine: Engine,
    clean: None,
) -> None:
    """SIGKILL a random worker process (pool child or main) every 1-2 s while publishing."""
    started = time.monotonic()
    worker.start()
    rng = random.Random()
    kinds: Counter[str] = Counter()
    with PacedPublisher(api.url, count, spread=count / 750) as run:
        for n in range(kills):
            due = time.monotonic() + rng.uniform(1.0, 2.0)
            before = ledger(engine)[0]
            # Each kill waits until something was stored since the last one, so faults land
            # on a system that is making progress, not on one still restarting.
            wait_until(
                lambda due=due, before=before: (
                    time.monotonic() >= due and (run.done() or ledger(engine)[0] > before)
                ),
                timeout=60,
                interval=0.1,
            )
            current = worker.current
            pool = current.children()
            kind = rng.choice(["main"] + ["child"] * len(pool))
            # Make sure both kinds happen in every run.
            if n == kills - 1 and kinds["main"] == 0:
                kind = "main"
            elif n == kills - 1 and kinds["child"] == 0:
                kind = "child"
            kinds[kind] += 1
            if kind == "main":
                # Only the main process: its pool is orphaned, as after an OOM kill.
                kill_and_wait(current.pid)
                worker.start()
            else:
                kill_and_wait(rng.choice(pool))
        summary = run.wait(timeout=120)
    assert summary.errors == 0, summary.first_error
    check_invariants(
        f"worker-chaos-{count}",
        run=run,
        summary=summary,
        api=api,
        engine=engine,
        broker=broker,
        started=started,
        faults=kills,
        settle=settle,
    )
    # The pool replaces a killed process; then every process of the last worker runs.
    wait_until(
        lambda: (
            len(worker.current.children()) == worker.concurrency
            and all(alive(pid) for pid in [worker.current.pid, *worker.current.children()])
        ),
        timeout=10,
    )
    assert_still_processing(api.url)


# --- 5. slow worker ---------------------------------------------------------------------------


def holds_for(condition: Callable[[], bool], seconds: float, interval: float = 0.2) -> None:
    """Fail as soon as condition stops holding within the next `seconds`."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert condition(), f"stopped holding: {condition}"
        time.sleep(interval)


def test_task_outliving_the_visibility_timeout_keeps_its_lease_and_runs_once(
    api: Api,
    worker: Workers,
    broker: RedisServer,
    engine: Engine,
    fault_env: dict[str, str],
    clean: None,
) -> None:
    """A live worker renews the lease of a message it holds: no second copy, however slow."""
    started = time.monotonic()
    # The lock is held for three visibility timeouts (15 s): past DB_LOCK_TIMEOUT (10 s),
    # which would end the task's wait first and make this a test of a retry instead.
    worker.start(DB_LOCK_TIMEOUT="60")
    body = [make_event(f"s-{i}", topic="slow") for i in range(100)]
    body += [make_event(f"s-{i}", topic="slow") for i in range(10)]
    lock = TableLock(engine)
    try:
        response = requests.post(f"{api.url}/publish", json=body, timeout=10)
        assert response.status_code == 202, response.text
        lock.wait_for_blocked_tasks(1)
        # Three visibility timeouts: without leases kombu would have handed the message
        # to the other pool process, which would then wait on the claimed ledger row.
        visibility = float(fault_env["BROKER_VISIBILITY_TIMEOUT"])
        holds_for(lambda: lock.blocked_tasks() == 1, seconds=3 * visibility)
    finally:
        lock.release()
    figures = settled_stats(api.url, received=len(body), timeout=30)
    with engine.connect() as conn:
        ledger_rows = conn.execute(select(batches)).all()
    stored = stored_keys(engine, ["slow"])
    report(
        "slow-worker",
        events_sent=len(body),
        acknowledged=len(body),
        lost=100 - len(stored),
        double_counted=max(0, figures["total_received_queued"] - len(body)),
        duration_s=time.monotonic() - started,
        faults=1,
    )
    assert len(ledger_rows) == 1
    batch_id = ledger_rows[0].batch_id
    assert (ledger_rows[0].received, ledger_rows[0].stored, ledger_rows[0].duplicates) == (
        110,
        100,
        10,
    )
    log = worker.output()
    assert log.count(f"store_batch[{batch_id}] received") == 1
    assert re.search(
        rf"batch {batch_id} received=110 stored=100 duplicates=10 .*replayed=False", log
    )
    assert len(stored) == 100 and max(stored.values()) == 1
    assert figures["total_received_queued"] == 110
    assert (figures["unique_processed_db"], figures["estimated_duplicate_dropped"]) == (100, 10)
    assert (figures["failed_events"], figures["queued_events"]) == (0, 0)
    assert_adds_up(figures, engine, sent=110)
    assert_broker_drained(broker)
    assert_still_processing(api.url)


# --- a worker killed while it sweeps for expired messages -------------------------------------


def sweep_lock_expiry(env: dict[str, str]) -> int:
    """Return how long a worker's broker channel keeps the sweep lock, as configured for it."""
    # A fresh process with the workers' environment, so it sees their settings.
    code = (
        "from tasks import celery_app\n"
        "with celery_app.connection_for_write() as conn:\n"
        "    print(conn.default_channel.unacked_mutex_expire)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return int(done.stdout)


def test_worker_killed_while_sweeping_does_not_stall_redelivery(
    api: Api,
    worker: Workers,
    broker: RedisServer,
    fault_env: dict[str, str],
    engine: Engine,
    clean: None,
) -> None:
    """kombu sweeps expired messages under a Redis lock (`unacked_mutex`).

    A worker SIGKILLed inside the sweep leaves that lock behind until it expires, and no
    worker restores anything before then. This sets the lock exactly as such a worker leaves
    it, with the expiry the workers are configured with, and kills a worker mid-batch: the
    batch must still be redelivered soon after the visibility timeout.
    """
    started = time.monotonic()
    current = worker.start()
    expiry = sweep_lock_expiry(fault_env)
    lock = TableLock(engine)
    try:
        response = requests.post(
            f"{api.url}/publish", json=[make_event(f"w-{i}") for i in range(50)], timeout=10
        )
        assert response.status_code == 202, response.text
        lock.wait_for_blocked_tasks(1)
        with redis.Redis.from_url(broker.url) as client:
            client.set("unacked_mutex", "token-of-a-killed-worker", px=expiry * 1000)
        current.kill_all()
    finally:
        lock.release()
    worker.start()
    deadline = int(fault_env["BROKER_VISIBILITY_TIMEOUT"]) + 15
    with contextlib.suppress(TimeoutError):
        wait_until(lambda: stats(api.url)["queued_events"] == 0, timeout=deadline)
    figures = stats(api.url)
    report(
        "worker-killed-while-sweeping",
        events_sent=50,
        acknowledged=50,
        lost=50 - figures["unique_processed_db"],
        double_counted=max(0, figures["total_received_queued"] - 50),
        duration_s=time.monotonic() - started,
        faults=1,
    )
    assert figures["queued_events"] == 0, (
        f"not redelivered within {deadline} s: the sweep lock a killed worker left behind"
        f" (unacked_mutex, {expiry} s) blocks every worker's sweep until it expires"
    )
    assert (figures["unique_processed_db"], figures["total_received_queued"]) == (50, 50)
    assert_broker_drained(broker)


# --- a worker killed between taking a message and recording it --------------------------------


def waiting_in_brpop(client: redis.Redis) -> bool:
    """Tell whether a worker's connection is blocked in BRPOP, waiting for the next message."""
    return any(c.get("cmd") == "brpop" and "b" in c.get("flags", "") for c in client.client_list())


def test_batch_taken_by_a_worker_killed_before_recording_it_is_not_lost(
    api: Api,
    worker: Workers,
    broker: RedisServer,
    fault_env: dict[str, str],
    engine: Engine,
    clean: None,
) -> None:
    """kombu takes a message off the queue with BRPOP, and only then records it as unacked.

    A worker killed in between (BRPOP answered, answer not handled yet) takes the message
    with it: it is neither on the queue nor in the unacked hash, so no sweep brings it back.
    Here the worker is frozen (SIGSTOP) while its BRPOP waits, a batch is published straight
    into that BRPOP, and the worker is killed: the batch must still be stored.
    """
    started = time.monotonic()
    current = worker.start()
    sent = 0
    with redis.Redis.from_url(broker.url) as client:
        for attempt in range(5):
            wait_until(lambda: waiting_in_brpop(client), timeout=10)
            os.kill(current.pid, signal.SIGSTOP)
            # BRPOP gives up after 1 s; only a freeze inside one catches the next message.
            if waiting_in_brpop(client):
                body = [make_event(f"b{attempt}-{i}") for i in range(50)]
                response = requests.post(f"{api.url}/publish", json=body, timeout=10)
                assert response.status_code == 202, response.text
                sent += len(body)
                if client.llen("celery") == 0:
                    break  # The frozen worker's BRPOP took it off the queue.
            os.kill(current.pid, signal.SIGCONT)
            wait_until(lambda: stats(api.url)["queued_events"] == 0, timeout=30)
        else:
            pytest.fail("the worker was never caught waiting in BRPOP")
        assert client.hlen("unacked") == 0  # Taken, and recorded nowhere.
    current.kill_all()
    worker.start()
    deadline = int(fault_env["BROKER_VISIBILITY_TIMEOUT"]) + 15
    with contextlib.suppress(TimeoutError):
        wait_until(lambda: stats(api.url)["queued_events"] == 0, timeout=deadline)
    figures = stats(api.url)
    report(
        "worker-killed-after-brpop",
        events_sent=sent,
        acknowledged=sent,
        lost=sent - figures["unique_processed_db"],
        double_counted=max(0, figures["total_received_queued"] - sent),
        duration_s=time.monotonic() - started,
        faults=1,
    )
    assert figures["queued_events"] == 0, (
        f"{figures['queued_events']} events answered 202 never stored: their message left the"
        " queue in the BRPOP answer of a worker killed before it recorded it in unacked"
    )
    assert (figures["unique_processed_db"], figures["total_received_queued"]) == (sent, sent)
    assert_broker_drained(broker)
