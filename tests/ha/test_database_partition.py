"""PostgreSQL cut off silently (iptables DROP both ways) while a worker is mid-transaction.

Without connect/keepalive/TCP_USER_TIMEOUT limits a connection waiting for a reply from a
server that went silent waits for the kernel's retransmissions (about 15 minutes): the worker's
transaction and the API's reads hang. With them (app.config.DbNetwork) the wait becomes an error
within seconds, the worker hands its batch back, /stats answers 503, and once the link is back
everything drains with the counts exact.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from collections.abc import Iterator

import pytest
import requests
from sqlalchemy import Engine
from sqlalchemy import create_engine
from sqlalchemy import func
from sqlalchemy import select
from sqlalchemy import text

from app.db import make_engine
from app.store.ledger import LOG_LOCK
from scripts.services import PostgresServer
from scripts.services import RedisServer
from scripts.stack import Api
from scripts.stack import wait_until
from tests.faults.harness import PacedPublisher
from tests.faults.harness import Workers
from tests.faults.harness import check_invariants
from tests.faults.harness import ledger
from tests.faults.harness import report
from tests.ha.network import SilentPartition

# What the worker logs when a store failed on an open connection and the batch goes back
# to the queue. A failed connect ("connection to server at ... failed: timeout expired")
# does not count: it is the transaction already under way that must not hang.
HANDED_BACK = re.compile(r"not stored \(OperationalError: (?!.*connection to server at)")


@pytest.fixture
def ha_env(
    stack_env: dict[str, str], own_broker: RedisServer, own_postgres: PostgresServer
) -> dict[str, str]:
    """The session's settings on this test's own broker and PostgreSQL (reached over TCP)."""
    return {
        **stack_env,
        "REDIS_URL": own_broker.url,
        "DATABASE_URL": own_postgres.url("aggregator"),
    }


@pytest.fixture
def tcp_engine(own_postgres: PostgresServer) -> Iterator[Engine]:
    """The test's view of the data over TCP (used once the partition has healed)."""
    engine = make_engine(own_postgres.url("aggregator"))
    yield engine
    engine.dispose()


@pytest.fixture
def socket_engine(own_postgres: PostgresServer) -> Iterator[Engine]:
    """The test's own way in through the unix socket, which the partition leaves open."""
    engine = create_engine(own_postgres.socket_url("aggregator"))
    yield engine
    engine.dispose()


def waiting_for_log_lock(engine: Engine) -> int:
    """Return how many of the aggregator's sessions wait for an advisory lock (the log's)."""
    with engine.connect() as conn:
        return int(
            conn.execute(
                text(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name ="
                    " 'log-aggregator' AND wait_event_type = 'Lock' AND wait_event = 'advisory'"
                )
            ).scalar_one()
        )


def test_database_partitioned_mid_transaction_is_an_error_and_a_retry(
    api: Api,
    worker: Workers,
    own_broker: RedisServer,
    own_postgres: PostgresServer,
    tcp_engine: Engine,
    socket_engine: Engine,
    partitions: Callable[[int], SilentPartition],
) -> None:
    started = time.monotonic()
    worker.start()
    with PacedPublisher(api.url, 2000, spread=25, batch_size=50, max_retries=60) as run:
        wait_until(lambda: ledger(tcp_engine)[0] >= 3, timeout=30)
        cut = partitions(own_postgres.port)
        with socket_engine.connect() as holder:
            # Hold the log's lock, so a worker's store stops mid-transaction (its ledger
            # row claimed, waiting for the lock); cut the link while it waits; release.
            holder.execute(select(func.pg_advisory_xact_lock(LOG_LOCK)))
            wait_until(lambda: waiting_for_log_lock(socket_engine) >= 1, timeout=30)
            offset = len(worker.output())
            cut.cut()
            cut_at = time.monotonic()
            holder.rollback()
        # The server finishes the statement and its answer is dropped: only keepalives
        # (and TCP_USER_TIMEOUT for what the worker sends next) tell the worker the link
        # is gone. It must say so while the link is still cut.
        wait_until(lambda: HANDED_BACK.search(worker.output()[offset:]) is not None, timeout=90)
        worker_error_s = time.monotonic() - cut_at
        # The API's reads become a 503 rather than a hung request.
        response = requests.get(f"{api.url}/stats", timeout=90)
        assert response.status_code == 503, response.text
        api_503_s = time.monotonic() - cut_at
        # Accepting goes on: the API needs only the broker to answer 202.
        answered = run.answered()
        wait_until(lambda: run.answered() > answered, timeout=30)
        cut.heal()
        healed_at = time.monotonic()
        wait_until(lambda: _storing_again(tcp_engine), timeout=60)
        draining_s = time.monotonic() - healed_at
        summary = run.wait(timeout=180)
    check_invariants(
        "database-partitioned-mid-transaction",
        run=run,
        summary=summary,
        api=api,
        engine=tcp_engine,
        broker=own_broker,
        started=started,
        faults=1,
    )
    timings = {
        "seconds_until_worker_error": round(worker_error_s, 2),
        "seconds_until_api_503": round(api_503_s, 2),
        "seconds_from_heal_until_storing": round(draining_s, 2),
    }
    print("database-partitioned-mid-transaction:", timings)
    report(
        "database-partitioned-mid-transaction-timings",
        events_sent=summary.planned,
        acknowledged=summary.sent,
        lost=0,
        double_counted=0,
        duration_s=time.monotonic() - started,
        faults=1,
        **timings,
    )


def _storing_again(engine: Engine) -> bool:
    """Tell whether a batch was stored in the last few seconds (the workers drain again)."""
    with engine.connect() as conn:
        return bool(
            conn.execute(
                text("SELECT max(processed_at) > now() - interval '3 seconds' FROM batches")
            ).scalar()
        )
