"""The database's primary dies or is cut off under load; pg_auto_failover promotes the
synchronous standby; nothing answered 202 is lost or counted twice.

Real processes: a pg_auto_failover monitor on host C and two PostgreSQL nodes, the primary on
host A and its synchronous standby on host B (`synchronous_commit = on`; hosts are network
namespaces of the test's own network, tests/ha/hosts.py); a Redis broker, gunicorn and Celery
workers on the test's own machine (the root namespace, on the same network) whose
DATABASE_URL is a libpq multi-host URL with `target_session_attrs=read-write`. A publisher with
idempotency keys and retries runs throughout.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Engine

from app.db import make_engine
from scripts.services import AutoFailoverCluster
from scripts.services import AutoFailoverNode
from scripts.services import RedisServer
from scripts.stack import Api
from scripts.stack import wait_until
from tests.faults.harness import PacedPublisher
from tests.faults.harness import Workers
from tests.faults.harness import check_invariants
from tests.faults.harness import ledger
from tests.faults.harness import ledger_ids
from tests.faults.harness import report
from tests.faults.harness import stored_keys
from tests.ha.answers import answers_since
from tests.ha.answers import batch_times
from tests.ha.answers import unavailable_seconds
from tests.ha.hosts import Host
from tests.ha.hosts import Network
from tests.helpers import stats


@pytest.fixture
def pg_placement(hosts: dict[str, Host], network: Network) -> dict[str, Any]:
    """The monitor on host C, the primary on host A, its standby on host B."""
    return {
        "monitor_place": hosts["c"].place,
        "node_places": (hosts["a"].place, hosts["b"].place),
        "network": network.cidr,
    }


@pytest.fixture
def ha_env(
    stack_env: dict[str, str], own_broker: RedisServer, pg_cluster: AutoFailoverCluster
) -> dict[str, str]:
    """The session's settings on this test's broker and its replicated database."""
    return {
        **stack_env,
        "REDIS_URL": own_broker.url,
        "DATABASE_URL": pg_cluster.url("aggregator"),
    }


@pytest.fixture
def db_engine(pg_cluster: AutoFailoverCluster) -> Iterator[Engine]:
    """The test's view of the data, through the same multi-host URL as the application."""
    engine = make_engine(pg_cluster.url("aggregator"))
    yield engine
    engine.dispose()


def fail_over_under_load(
    scenario: str,
    fault: Callable[[AutoFailoverNode], Callable[[], None]],
    *,
    api: Api,
    worker: Workers,
    cluster: AutoFailoverCluster,
    broker: RedisServer,
    engine: Engine,
) -> dict[str, float | int]:
    """Publish throughout a fault of the primary; check every invariant; return the numbers.

    `fault(primary)` injects the fault and returns what to do once the standby has been
    promoted (start the killed node again, heal the partition).
    """
    started = time.monotonic()
    offset = api.log.stat().st_size
    worker.start()
    with PacedPublisher(
        api.url, 3000, spread=20, batch_size=50, concurrency=4, max_retries=60
    ) as run:
        wait_until(lambda: run.answered() >= 10 and ledger(engine)[0] >= 3, timeout=60)
        old = cluster.primary()
        # Committed before the fault, so on the synchronous standby too: they must survive.
        committed = ledger_ids(engine)
        fault_at = time.time()
        fault_mono = time.monotonic()
        recover = fault(old)
        wait_until(lambda: cluster.primary_port() not in (None, old.port), timeout=60)
        failover_s = time.monotonic() - fault_mono
        recover()
        summary = run.wait(timeout=180)
    check_invariants(
        scenario,
        run=run,
        summary=summary,
        api=api,
        engine=engine,
        broker=broker,
        started=started,
        faults=1,
    )
    assert committed <= ledger_ids(engine), "ledger rows committed before the fault are gone"
    # The old primary is back, as the new primary's synchronous standby.
    cluster.wait_for(old.port, "secondary")
    times = batch_times(engine)
    after = [moment for moment in times if moment > fault_at]
    assert after, "nothing was stored after the fault"
    before = [moment for moment in times if moment <= fault_at]
    # The longest stretch around the fault in which no batch was stored.
    edges = ([before[-1]] if before else []) + after
    gap = max((b - a for a, b in zip(edges, edges[1:], strict=False)), default=0.0)
    answers = answers_since(api, offset)
    stored = stored_keys(engine, summary.topics)
    figures = stats(api.url)
    numbers: dict[str, float | int] = {
        "sent": summary.planned,
        "answered_202": summary.sent,
        "stored": len(stored),
        "counted": figures["unique_processed_db"] + figures["estimated_duplicate_dropped"],
        "lost": len(run.accepted_keys() - set(stored)),
        "double_counted": sum(count - 1 for count in stored.values()),
        "answers_503": sum(1 for stamp, status in answers if status == 503 and stamp >= fault_at),
        "seconds_of_503": round(unavailable_seconds(answers, fault_at), 2),
        "seconds_to_failover": round(failover_s, 2),
        "seconds_without_storing": round(gap, 2),
        "seconds_until_draining": round(after[0] - fault_at, 2),
    }
    print(f"{scenario}:", numbers)
    report(
        f"{scenario}-figures",
        events_sent=summary.planned,
        acknowledged=summary.sent,
        lost=int(numbers["lost"]),
        double_counted=int(numbers["double_counted"]),
        duration_s=time.monotonic() - started,
        faults=1,
        ambiguous=summary.ambiguous,
        **{key: value for key, value in numbers.items() if key not in ("lost", "double_counted")},
    )
    assert numbers["lost"] == 0 and numbers["double_counted"] == 0
    return numbers


def test_database_primary_killed_fails_over_and_loses_nothing(
    api: Api,
    worker: Workers,
    pg_cluster: AutoFailoverCluster,
    own_broker: RedisServer,
    db_engine: Engine,
) -> None:
    def kill(primary: AutoFailoverNode) -> Callable[[], None]:
        # The machine dies: pg_autoctl, PostgreSQL and every backend at once.
        primary.kill()
        # A supervisor starts it again once the standby took over; it rejoins as standby.
        return primary.run

    fail_over_under_load(
        "database-primary-killed-auto-failover",
        kill,
        api=api,
        worker=worker,
        cluster=pg_cluster,
        broker=own_broker,
        engine=db_engine,
    )


def test_database_primary_partitioned_fails_over_and_loses_nothing(
    api: Api,
    worker: Workers,
    pg_cluster: AutoFailoverCluster,
    own_broker: RedisServer,
    db_engine: Engine,
    network: Network,
) -> None:
    """The primary's host cut off (every packet in and out dropped, no reset): nobody may hang."""

    def partition(primary: AutoFailoverNode) -> Callable[[], None]:
        # The whole host goes silent: its PostgreSQL, and its keeper's link to the monitor.
        host = network.host_at(primary.place)
        host.isolate()
        cut_at = time.time()

        def heal() -> None:
            # Healed once the promoted standby stores again, so the clients' way past the
            # silent old primary is shown, not just its return. Cut off from the monitor and
            # its standby, its keeper has demoted it (network_partition_timeout); healed, it
            # rejoins as the new primary's standby.
            wait_until(lambda: any(moment > cut_at for moment in batch_times(db_engine)), 60)
            host.heal()

        return heal

    # No hang: heal() waits (with a deadline) for the promoted standby to store while the
    # old primary is still silent, which connections hung on it would never let happen.
    fail_over_under_load(
        "database-primary-partitioned-auto-failover",
        partition,
        api=api,
        worker=worker,
        cluster=pg_cluster,
        broker=own_broker,
        engine=db_engine,
    )
