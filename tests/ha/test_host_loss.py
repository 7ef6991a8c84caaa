"""A whole machine dies at once (a power cut) with everything replicated: nothing 202 is lost.

Three hosts, each a network namespace with its own address, interfaces and packet filter,
joined by veth pairs on a bridge, and a cgroup holding every process it runs
(tests/ha/hosts.py). The test itself (and its publisher) is a fourth machine: the root
namespace, on the bridge. Two layouts:

`both-primaries-on-a`, power back after the failovers:

- host A: the Redis primary, Sentinel 1, the PostgreSQL primary (its pg_autoctl keeper,
  postgres and backends), API A (gunicorn) and worker A (Celery, with its pool);
- host B: the Redis replica, Sentinel 2, the synchronous standby (keeper and postgres),
  API B and worker B;
- host C: Sentinel 3, the pg_auto_failover monitor and the proxy: Debian's nginx with the
  repository's template (deploy/nginx) and an upstream group of API A and API B.

Once both have failed over, host A's power comes back and a supervisor starts its services
again: its Redis as a replica of the new primary (with one replica and BROKER_MIN_REPLICAS=1
the promoted node accepts nothing alone, docs/operations.md), its keeper (which rejoins as
the new primary's standby), Sentinel 1, API A and worker A.

`primaries-apart-a-stays-down`: the broker's primary on A, the database's on B (its standby on
A), a second Redis replica on C. Host A never comes back: the Sentinels promote a replica
that still has a replica of its own (so it accepts), and the database primary drops its lost
standby (`wait_primary`: it commits alone until a standby is back, docs/operations.md).

A publisher with idempotency keys and retries sends through the proxy throughout. Mid-run,
host A loses power: every packet in and out of its namespace is dropped (no reset, as from a
machine that is gone) and all its processes are SIGKILLed at once (`cgroup.kill`).
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from mirakuru.exceptions import ProcessFinishedWithError
from sqlalchemy import Engine
from sqlalchemy import select

from app.db import broker_losses
from app.db import make_engine
from scripts.services import AutoFailoverCluster
from scripts.services import ReplicatedRedis
from scripts.stack import Api
from scripts.stack import wait_until
from tasks.pending import read_state
from tests.faults.harness import PacedPublisher
from tests.faults.harness import Workers
from tests.faults.harness import check_invariants
from tests.faults.harness import ledger
from tests.faults.harness import ledger_ids
from tests.faults.harness import report
from tests.faults.harness import stored_keys
from tests.ha.answers import batch_times
from tests.ha.answers import first_stored_after
from tests.ha.answers import unavailable_seconds
from tests.ha.hosts import Host
from tests.ha.hosts import Network
from tests.helpers import stats
from tests.nginx import Proxy


@dataclass(frozen=True)
class Layout:
    """Which host runs which server, and whether host A comes back."""

    name: str
    redis_hosts: tuple[str, ...]  # the primary's first, then the replicas'
    pg_hosts: tuple[str, str]  # the primary's, then the synchronous standby's
    comes_back: bool


LAYOUTS = [
    Layout("both-primaries-on-a", ("a", "b"), ("a", "b"), comes_back=True),
    Layout("primaries-apart-a-stays-down", ("a", "b", "c"), ("b", "a"), comes_back=False),
]


@pytest.fixture(params=LAYOUTS, ids=[layout.name for layout in LAYOUTS])
def layout(request: pytest.FixtureRequest) -> Layout:
    return request.param


@pytest.fixture
def redis_placement(layout: Layout, hosts: dict[str, Host]) -> dict[str, Any]:
    return {
        "replicas": len(layout.redis_hosts) - 1,
        "node_places": [hosts[name].place for name in layout.redis_hosts],
        "sentinel_places": [hosts[name].place for name in ("a", "b", "c")],
    }


@pytest.fixture
def pg_placement(layout: Layout, hosts: dict[str, Host], network: Network) -> dict[str, Any]:
    primary, standby = layout.pg_hosts
    return {
        "monitor_place": hosts["c"].place,
        "node_places": (hosts[primary].place, hosts[standby].place),
        "network": network.cidr,
    }


@pytest.fixture
def placed(
    network: Network,
    hosts: dict[str, Host],
    cluster: ReplicatedRedis,
    pg_cluster: AutoFailoverCluster,
) -> dict[str, Host]:
    """The data nodes, Sentinels and monitor, each adopted into its host's cgroup."""
    for server in (*cluster.nodes, *cluster.sentinels, pg_cluster.monitor, *pg_cluster.nodes):
        network.host_at(server.place).adopt(*server.pids())
    return hosts


@pytest.fixture
def ha_env(
    stack_env: dict[str, str], cluster: ReplicatedRedis, pg_cluster: AutoFailoverCluster
) -> dict[str, str]:
    """The broker found through the Sentinels, the database through the multi-host URL."""
    return {**stack_env, **cluster.env(), "DATABASE_URL": pg_cluster.url("aggregator")}


@pytest.fixture
def apis(placed: dict[str, Host], ha_env: dict[str, str], logs: Path) -> Iterator[dict[str, Api]]:
    """API A on host A, API B on host B, each with its access log."""
    started: dict[str, Api] = {}
    try:
        for name in ("a", "b"):
            log = logs / f"host-{name}-api.log"
            api = Api(ha_env, log, access_log=True, place=placed[name].place).start()
            started[name] = api
            placed[name].adopt(*api.pids())
        yield started
    finally:
        for api in started.values():
            # API A may have died with its host.
            with contextlib.suppress(ProcessFinishedWithError):
                api.stop()


@pytest.fixture
def crews(
    placed: dict[str, Host], ha_env: dict[str, str], logs: Path
) -> Iterator[dict[str, Workers]]:
    """Worker A on host A, worker B on host B (one Celery worker, two processes, each)."""
    made = {
        name: Workers(ha_env, logs / f"host-{name}-worker.log", place=placed[name].place)
        for name in ("a", "b")
    }
    try:
        for name, crew in made.items():
            placed[name].adopt(*crew.start().pids())
        yield made
    finally:
        for crew in made.values():
            crew.close()


@pytest.fixture
def proxy(placed: dict[str, Host], apis: dict[str, Api], scratch_dir: Path) -> Iterator[Proxy]:
    """nginx on host C, in front of API A and API B, logging each answer's time and status."""
    base = scratch_dir / f"nginx-hosts-{uuid.uuid4().hex[:6]}"
    servers = "".join(
        # Marked failed after one error (a refused or timed-out connect) for 5 s.
        f"    server {api.place.address}:{api.port} max_fails=1 fail_timeout=5s;\n"
        for api in apis.values()
    )
    extra = (
        f"upstream aggregator_apis {{\n{servers}}}\n"
        "log_format answers '$msec $status $request_method $uri $upstream_addr';\n"
        f"access_log {base}/answers.log answers;\n"
    )
    # The template's proxy_pass names a variable: nginx looks its value up among the
    # upstream groups before it asks a resolver.
    server = Proxy(base, "aggregator_apis", http_extra=extra, place=placed["c"].place)
    placed["c"].adopt(server.process.pid)
    yield server
    server.stop()


@pytest.fixture
def db_engine(pg_cluster: AutoFailoverCluster) -> Iterator[Engine]:
    """The test's view of the data, through the same multi-host URL as the application."""
    engine = make_engine(pg_cluster.url("aggregator"))
    yield engine
    engine.dispose()


def proxy_answers(proxy: Proxy) -> list[tuple[float, int, str]]:
    """Return (time, status, API) of every POST /publish the proxy answered, from its log."""
    answers = []
    log = proxy.base / "answers.log"
    for line in log.read_text().splitlines() if log.exists() else []:
        fields = line.split()
        if len(fields) == 5 and fields[2:4] == ["POST", "/publish"]:
            answers.append((float(fields[0]), int(fields[1]), fields[4]))
    return sorted(answers)


def longest_pause(moments: list[float], fault_at: float) -> tuple[float, float]:
    """Return the longest stretch without any of `moments` from the last one before the
    fault on, and when it ended (0 and the fault's time when none came after it)."""
    edges = [moment for moment in moments if moment <= fault_at][-1:] + sorted(
        moment for moment in moments if moment > fault_at
    )
    pauses = [(end - start, end) for start, end in zip(edges, edges[1:], strict=False)]
    return max(pauses, default=(0.0, fault_at))


def test_a_whole_host_lost_at_once_fails_over_and_loses_nothing(
    layout: Layout,
    placed: dict[str, Host],
    cluster: ReplicatedRedis,
    pg_cluster: AutoFailoverCluster,
    ha_env: dict[str, str],
    apis: dict[str, Api],
    crews: dict[str, Workers],
    proxy: Proxy,
    db_engine: Engine,
) -> None:
    scenario = f"host-lost-{layout.name}"
    host_a = placed["a"]
    redis_a = cluster.nodes[0]
    sentinel_a = cluster.sentinels[0]
    pg_on_a = next(node for node in pg_cluster.nodes if node.place == host_a.place)
    # The database's node that survives: promoted, or the primary all along.
    pg_left = next(node for node in pg_cluster.nodes if node is not pg_on_a)
    assert cluster.primary() is redis_a and pg_cluster.primary() is pg_cluster.nodes[0]
    started = time.monotonic()
    with PacedPublisher(
        proxy.url, 3000, spread=30, batch_size=50, concurrency=4, max_retries=60
    ) as run:
        wait_until(lambda: run.answered() >= 10 and ledger(db_engine)[0] >= 3, timeout=60)
        with redis_a.client() as client:
            seq_at_fault = read_state(client).seq
        # Committed before the fault, so on the synchronous standby too: they must survive.
        committed = ledger_ids(db_engine)
        fault_at = time.time()
        fault_mono = time.monotonic()
        killed = host_a.power_cut()
        # Reap what died (the Popen objects of its services), as their supervisor would.
        redis_a.kill()
        sentinel_a.stop()
        pg_on_a.kill()
        with contextlib.suppress(ProcessFinishedWithError):
            apis["a"].stop()
        db_engine.dispose()
        wait_until(lambda: cluster.primary_port() != redis_a.port, timeout=60)
        broker_failover_s = time.monotonic() - fault_mono
        # The survivor writes alone: promoted (standby lost its primary) or the primary
        # having dropped its lost synchronous standby.
        pg_cluster.wait_for(pg_left.port, "wait_primary", timeout=90)
        database_settled_s = time.monotonic() - fault_mono
        back_s = None
        if layout.comes_back:
            # The power comes back; a supervisor starts host A's services again, in its cgroup.
            host_a.power_on()
            cluster.rejoin(redis_a)
            host_a.adopt(*redis_a.pids())
            sentinel_a.start()
            host_a.adopt(*sentinel_a.pids())
            pg_on_a.run()
            host_a.adopt(*pg_on_a.pids())
            apis["a"] = Api(
                ha_env, apis["a"].log, port=apis["a"].port, access_log=True, place=host_a.place
            ).start()
            host_a.adopt(*apis["a"].pids())
            host_a.adopt(*crews["a"].start().pids())
            back_s = time.monotonic() - fault_mono
        summary = run.wait(timeout=240)
    check_invariants(
        scenario,
        run=run,
        summary=summary,
        api=apis["b"],
        engine=db_engine,
        broker=cluster.primary(),
        started=started,
        faults=1,
    )
    assert committed <= ledger_ids(db_engine), "ledger rows committed before the fault are gone"
    # The promoted replica held everything WAITed: no loss of broker data recorded.
    with db_engine.connect() as conn:
        assert conn.execute(select(broker_losses)).all() == []
    assert stats(apis["b"].url)["broker_data_loss"]["detected"] == 0
    # The surviving database stores what the promoted replica accepted.
    drained_at = first_stored_after(db_engine, seq_at_fault)
    assert drained_at is not None, "nothing accepted after the fault was stored"
    seconds_without_storing, _ = longest_pause(batch_times(db_engine), fault_at)
    logged = proxy_answers(proxy)
    accepted_at = [stamp for stamp, status, _ in logged if status == 202]
    seconds_without_202, accepting_again = longest_pause(accepted_at, fault_at)
    after = [(stamp, status, api) for stamp, status, api in logged if stamp >= fault_at]
    answers = [(stamp, status) for stamp, status, _ in after]
    # What the clients saw other than 202, in seconds after the fault, and from which API.
    refusals = [(round(t - fault_at, 2), status, api) for t, status, api in after if status != 202]
    print("answers other than 202 (seconds after the fault, status, API):", refusals)
    stored = stored_keys(db_engine, summary.topics)
    figures = stats(apis["b"].url)
    numbers: dict[str, float | int] = {
        "sent": summary.planned,
        "answered_202": summary.sent,
        "stored": len(stored),
        "counted": figures["unique_processed_db"] + figures["estimated_duplicate_dropped"],
        "lost": len(run.accepted_keys() - set(stored)),
        "double_counted": sum(count - 1 for count in stored.values()),
        "processes_killed": killed,
        "answers_503": sum(1 for _, status in answers if status == 503),
        "answers_other_errors": sum(1 for _, status in answers if status not in (202, 503)),
        "seconds_of_503": round(unavailable_seconds(answers, fault_at), 2),
        "seconds_to_broker_failover": round(broker_failover_s, 2),
        "seconds_until_database_writes_alone": round(database_settled_s, 2),
        "seconds_without_202": round(seconds_without_202, 2),
        "seconds_until_202_again": round(accepting_again - fault_at, 2),
        "seconds_without_storing": round(seconds_without_storing, 2),
        "seconds_until_draining": round(drained_at - fault_at, 2),
    }
    if back_s is not None:
        numbers["seconds_until_host_back"] = round(back_s, 2)
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
    # The broker's primary and the database's writer are on hosts that survived.
    assert cluster.primary().place != host_a.place
    if layout.comes_back:
        # Host A's nodes came back as the new primaries' replica and standby.
        pg_cluster.wait_for(pg_on_a.port, "secondary")
        pg_cluster.wait_for(pg_left.port, "primary")
    else:
        assert pg_cluster.primary_port() == pg_left.port
    # Host A's processes all died: its Redis, Sentinel, keeper and PostgreSQL, gunicorn and
    # Celery, each with its children.
    assert killed >= 10
