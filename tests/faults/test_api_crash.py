"""gunicorn workers SIGKILLed under load: no 202 for what was not accepted."""

from __future__ import annotations

import random
import time

import pytest
from sqlalchemy import Engine

from scripts.services import RedisServer
from scripts.stack import Api
from scripts.stack import wait_until
from tests.faults.harness import PacedPublisher
from tests.faults.harness import Workers
from tests.faults.harness import assert_still_processing
from tests.faults.harness import check_invariants
from tests.faults.harness import kill_and_wait

# --- 4. API crash -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("count", "kills", "settle"),
    [
        pytest.param(6000, 8, 40, id="6k"),
        pytest.param(20000, 25, 120, id="20k", marks=pytest.mark.soak),
    ],
)
def test_killed_api_processes_never_acknowledge_what_was_not_enqueued(
    count: int,
    kills: int,
    settle: float,
    api: Api,
    worker: Workers,
    broker: RedisServer,
    engine: Engine,
    clean: None,
) -> None:
    """SIGKILL gunicorn workers under load: every 202 is stored, counts exact within tolerance."""
    started = time.monotonic()
    worker.start()
    rng = random.Random()
    with PacedPublisher(api.url, count, spread=count / 750, max_retries=20) as run:
        for _ in range(kills):
            due = time.monotonic() + rng.uniform(0.5, 1.0)
            before = run.answered()
            # Kill only once the API answered something since the last kill; gunicorn's
            # master has respawned its workers by then (or is about to).
            wait_until(
                lambda due=due, before=before: (
                    time.monotonic() >= due and (run.done() or run.answered() > before)
                ),
                timeout=60,
                interval=0.05,
            )
            kill_and_wait(rng.choice(api.worker_pids()))
        summary = run.wait(timeout=120)
    assert summary.errors == 0, summary.first_error
    check_invariants(
        f"api-crash-{count}",
        run=run,
        summary=summary,
        api=api,
        engine=engine,
        broker=broker,
        started=started,
        faults=kills,
        settle=settle,
    )
    wait_until(lambda: len(api.worker_pids()) == 3, timeout=30)
    assert_still_processing(api.url)
