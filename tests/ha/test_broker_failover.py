"""The broker's primary dies under load; Sentinel promotes the replica; no 202 is lost.

Real processes: a Redis primary on host A, its replica on host B and a Sentinel on each of
hosts A, B and C (network namespaces of the test's own network, tests/ha/hosts.py); gunicorn
and a Celery worker on the test's own machine (the root namespace, on the same network) that
find the primary through the Sentinels (BROKER_MIN_REPLICAS 1: every 202 waited for the
replica); PostgreSQL. A publisher with idempotency keys and retries runs throughout.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests
from sqlalchemy import Engine
from sqlalchemy import select

from app.db import broker_checkpoints
from app.db import broker_losses
from scripts.services import RedisServer
from scripts.services import ReplicatedRedis
from scripts.stack import Api
from scripts.stack import wait_until
from tasks.pending import read_state
from tests.faults.harness import PacedPublisher
from tests.faults.harness import Workers
from tests.faults.harness import check_invariants
from tests.faults.harness import report
from tests.faults.harness import stored_keys
from tests.ha.answers import answers_since
from tests.ha.answers import first_stored_after
from tests.ha.answers import unavailable_seconds
from tests.ha.hosts import Host
from tests.ha.hosts import Network
from tests.helpers import make_event
from tests.helpers import publish
from tests.helpers import stats


@pytest.fixture
def replica_hosts() -> tuple[str, ...]:
    """The hosts of the replicas (a test may ask for more)."""
    return ("b",)


@pytest.fixture
def redis_placement(hosts: dict[str, Host], replica_hosts: tuple[str, ...]) -> dict[str, Any]:
    """The primary on host A, a replica on each of `replica_hosts`, a Sentinel on each of A,
    B and C."""
    return {
        "replicas": len(replica_hosts),
        "node_places": [hosts["a"].place, *(hosts[name].place for name in replica_hosts)],
        "sentinel_places": [host.place for host in hosts.values()],
    }


def losses_detected(url: str) -> int:
    """Return the losses /stats reports, 0 while it cannot answer (the broker failing over)."""
    response = requests.get(f"{url}/stats", timeout=10)
    return response.json()["broker_data_loss"]["detected"] if response.status_code == 200 else 0


def checkpointed_events(engine: Engine) -> int:
    """Return the accepted events the last broker check recorded (0 before the first)."""
    with engine.connect() as conn:
        value = conn.execute(select(broker_checkpoints.c.accepted_events)).scalar()
    return int(value or 0)


def fail_over_under_load(
    scenario: str,
    fault: Callable[[RedisServer], Callable[[], None]],
    *,
    api: Api,
    worker: Workers,
    cluster: ReplicatedRedis,
    engine: Engine,
) -> dict[str, float | int]:
    """Publish throughout a fault of the primary; check every invariant; return the numbers.

    `fault(primary)` injects the fault and returns what to do once Sentinel has promoted
    another node (restart the killed node as a replica, heal the partition).
    """
    started = time.monotonic()
    offset = api.log.stat().st_size
    worker.start()
    old = cluster.primary()
    with PacedPublisher(
        api.url, 3000, spread=15, batch_size=50, concurrency=4, max_retries=40
    ) as run:
        wait_until(lambda: run.answered() >= 10, timeout=30)
        with old.client() as client:
            seq_at_fault = read_state(client).seq
        fault_at = time.time()
        fault_mono = time.monotonic()
        recover = fault(old)
        wait_until(lambda: cluster.primary_port() != old.port, timeout=30)
        failover_s = time.monotonic() - fault_mono
        recover()
        summary = run.wait(timeout=180)
    check_invariants(
        scenario,
        run=run,
        summary=summary,
        api=api,
        engine=engine,
        broker=cluster.primary(),
        started=started,
        faults=1,
    )
    # The promoted replica held everything WAITed: no loss recorded, the epoch went on.
    with engine.connect() as conn:
        assert conn.execute(select(broker_losses)).all() == []
    assert stats(api.url)["broker_data_loss"]["detected"] == 0
    # Workers store again what the promoted replica accepted.
    drained_at = first_stored_after(engine, seq_at_fault)
    assert drained_at is not None, "nothing accepted after the fault was stored"
    answers = answers_since(api, offset)
    first_refusal = min(
        (stamp for stamp, status in answers if stamp >= fault_at and status == 503),
        default=fault_at,
    )
    accepting_again = min(
        (stamp for stamp, status in answers if stamp > first_refusal and status == 202),
        default=fault_at,
    )
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
        "seconds_until_202_again": round(accepting_again - fault_at, 2),
        "seconds_until_draining": round(drained_at - fault_at, 2),
    }
    print(f"{scenario}:", numbers)
    report(
        scenario,
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


def first_202_after(api: Api, offset: int, moment: float) -> float | None:
    """Return when the API first answered 202 after `moment` (from its access log)."""
    return min(
        (stamp for stamp, status in answers_since(api, offset) if stamp > moment and status == 202),
        default=None,
    )


def test_primary_killed_mid_run_fails_over_and_loses_nothing(
    api: Api, worker: Workers, cluster: ReplicatedRedis, engine: Engine, ha_clean: None
) -> None:
    def kill(primary: RedisServer) -> Callable[[], None]:
        primary.kill()
        # A supervisor starts the node again once Sentinel has moved the primary elsewhere.
        return lambda: cluster.rejoin(primary)

    fail_over_under_load(
        "broker-primary-killed-sentinel-failover",
        kill,
        api=api,
        worker=worker,
        cluster=cluster,
        engine=engine,
    )


@pytest.mark.parametrize("replica_hosts", [("b",), ("b", "c")], ids=["one-replica", "two-replicas"])
def test_primary_partitioned_silently_fails_over_and_loses_nothing(
    replica_hosts: tuple[str, ...],
    api: Api,
    worker: Workers,
    cluster: ReplicatedRedis,
    engine: Engine,
    network: Network,
    ha_clean: None,
) -> None:
    """The primary's host cut off (every packet in and out dropped, no reset), then healed:
    clients must not hang. With one replica the promoted node accepts nothing alone until the
    old primary is back as its replica; with two it keeps one and accepts before the heal."""
    cut: dict[str, float] = {}
    offset = api.log.stat().st_size

    def partition(primary: RedisServer) -> Callable[[], None]:
        host = network.host_at(primary.place)
        host.isolate()
        cut["at"] = time.time()

        def heal() -> None:
            # Healed a while after Sentinel promoted the replica: the old primary comes
            # back with connections its clients may still hold, refusing writes
            # (min-replicas-to-write) until Sentinel demotes it.
            time.sleep(5)
            cut["healed_at"] = time.time()
            host.heal()

        return heal

    replicas = len(replica_hosts)
    numbers = fail_over_under_load(
        f"broker-primary-partitioned-sentinel-failover-{replicas}-replicas",
        partition,
        api=api,
        worker=worker,
        cluster=cluster,
        engine=engine,
    )
    # Keepalive and TCP_USER_TIMEOUT end the workers' hung connections within seconds.
    assert numbers["seconds_until_draining"] < 30
    accepting_again = first_202_after(api, offset, cut["at"] + numbers["seconds_to_failover"])
    assert accepting_again is not None
    if replicas >= 2:
        # The promoted node kept a replica: it accepted while the old primary was still cut off.
        assert accepting_again < cut["healed_at"], numbers
    else:
        # Alone, the promoted node accepts nothing (min-replicas-to-write, BROKER_MIN_REPLICAS)
        # until the old primary is back as its replica: durability before availability.
        assert accepting_again > cut["healed_at"], numbers


def test_a_replica_that_lagged_is_reported_as_a_loss_when_promoted(
    cluster: ReplicatedRedis, ha_env: dict[str, str], logs: Path, engine: Engine, ha_clean: None
) -> None:
    """Without WAIT (BROKER_MIN_REPLICAS 0), events only the primary held die with it: reported."""
    api = Api({**ha_env, "BROKER_MIN_REPLICAS": "0"}, logs / "ha-lag-api.log").start()
    try:
        old = cluster.primary()
        [replica] = [node for node in cluster.nodes if node is not old]
        for node in cluster.nodes:
            with node.client() as client:
                # Without WAIT nothing here needs a replica: let a primary write alone.
                client.config_set("min-replicas-to-write", 0)
        for n in range(10):
            publish(api.url, [make_event(f"a-{n}-{i}", topic="kept") for i in range(50)])
        wait_until(lambda: checkpointed_events(engine) == 500, timeout=15)
        with replica.client() as client:
            wait_until(lambda: read_state(client).seq == 10, timeout=10)
            # The replica stops following (its link to the primary is cut).
            client.execute_command("REPLICAOF", "127.0.0.1", "1")
        for n in range(6):
            publish(api.url, [make_event(f"b-{n}-{i}", topic="lost") for i in range(50)])
        wait_until(lambda: checkpointed_events(engine) == 800, timeout=15)
        old.kill()
        wait_until(lambda: cluster.primary_port() == replica.port, timeout=30)
        wait_until(lambda: losses_detected(api.url) >= 1, timeout=30)
        loss = stats(api.url)["broker_data_loss"]
        with engine.connect() as conn:
            [row] = conn.execute(select(broker_losses)).all()
        assert "went back in time" in row.reason, row.reason
        assert (row.seq_known, row.seq_found) == (16, 10)
        # The 300 events only the old primary held, within the bound the check gives.
        assert loss["events_known_unstored"] == 300
        assert 300 <= loss["events_unaccounted"]
        # Publishing goes on under a new epoch on the promoted replica.
        publish(api.url, [make_event(f"c-{i}", topic="after") for i in range(10)])
        report(
            "broker-lagging-replica-promoted",
            events_sent=810,
            acknowledged=810,
            lost=300,
            double_counted=0,
            duration_s=0,
            faults=1,
            events_unaccounted=loss["events_unaccounted"],
        )
    finally:
        api.stop()
