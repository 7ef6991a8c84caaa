"""A whole machine dies at once (a power cut) with everything replicated: nothing 202 is lost.

Three hosts, each a cgroup of real processes (tests/ha/hosts.py):

- host A: the Redis primary, Sentinel 1, the PostgreSQL primary (its pg_autoctl keeper,
  postgres and backends), API A (gunicorn) and worker A (Celery, with its pool);
- host B: the Redis replica, Sentinel 2, the synchronous standby (keeper and postgres),
  API B and worker B;
- host C: Sentinel 3, the pg_auto_failover monitor and the proxy: Debian's nginx with the
  repository's template (deploy/nginx) and an upstream group of API A and API B.

A publisher with idempotency keys and retries sends through the proxy throughout. Mid-run,
host A loses power: every packet to and from its ports, and every packet its sockets send, is
dropped (no reset, as from a machine that is gone), and all its processes are SIGKILLed at
once (`cgroup.kill`). The Sentinels promote the replica, the monitor promotes the standby, the
proxy moves to API B. Once both have failed over, host A's power comes back and a supervisor
starts its services again: its Redis as a replica of the new primary (with one replica and
BROKER_MIN_REPLICAS=1 the promoted node accepts nothing alone, docs/operations.md), its keeper
(which rejoins as the new primary's standby), Sentinel 1, API A and worker A.

Why cgroups on loopback ports and not network namespaces: every service here binds
127.0.0.1 and is started by scripts.services, which would have to take an address and run
its commands through `ip netns exec` for namespaces; what a namespace would give is had here
by other means. A host's processes die together (`cgroup.kill` on the host's cgroup, which
also catches processes it forks while dying) and its address goes silent (iptables DROP on
its ports both ways, and on whatever its processes' sockets send, matched by cgroup): peers
see what they would see of a dead machine, timeouts, never a reset or a refused connection.
What namespaces would add and this does not: a separate routing table and interfaces (a peer
whose packets to host A are dropped still has a working loopback to the others, as it
would have its own link), and addresses other than 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
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
from tests.ha.network import iptables_usable
from tests.helpers import stats
from tests.nginx import Proxy

SCENARIO = "host-lost-power-cut"


@pytest.fixture
def hosts() -> Iterator[dict[str, Host]]:
    """Hosts A, B and C; whatever still runs in them is killed, and their rules removed, after."""
    reason = iptables_usable()
    if reason:
        pytest.skip(reason)
    made: dict[str, Host] = {}
    try:
        for name in ("a", "b", "c"):
            made[name] = Host(name)
        yield made
    finally:
        for host in made.values():
            host.close()


@pytest.fixture
def placed(
    hosts: dict[str, Host], cluster: ReplicatedRedis, pg_cluster: AutoFailoverCluster
) -> dict[str, Host]:
    """The data nodes, Sentinels and monitor, each moved into its host.

    Asks for the hosts first, so they are torn down last: the services stop normally, and the
    hosts then kill whatever was left.
    """
    for index, name in enumerate(("a", "b")):
        redis_node, sentinel, pg_node = (
            cluster.nodes[index],
            cluster.sentinels[index],
            pg_cluster.nodes[index],
        )
        hosts[name].adopt(
            *redis_node.pids(),
            *sentinel.pids(),
            *pg_node.pids(),
            ports=(redis_node.port, sentinel.port, pg_node.port),
        )
    hosts["c"].adopt(
        *cluster.sentinels[2].pids(),
        *pg_cluster.monitor.pids(),
        ports=(cluster.sentinels[2].port, pg_cluster.monitor.port),
    )
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
            api = Api(ha_env, logs / f"host-{name}-api.log", access_log=True).start()
            started[name] = api
            placed[name].adopt(*api.pids(), ports=(api.port,))
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
    made = {name: Workers(ha_env, logs / f"host-{name}-worker.log") for name in ("a", "b")}
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
        f"    server 127.0.0.1:{api.port} max_fails=1 fail_timeout=5s;\n"
        for api in apis.values()
    )
    extra = (
        f"upstream aggregator_apis {{\n{servers}}}\n"
        "log_format answers '$msec $status $request_method $uri $upstream_addr';\n"
        f"access_log {base}/answers.log answers;\n"
    )
    # The template's proxy_pass names a variable: nginx looks its value up among the
    # upstream groups before it asks a resolver.
    server = Proxy(base, "aggregator_apis", http_extra=extra)
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
    placed: dict[str, Host],
    cluster: ReplicatedRedis,
    pg_cluster: AutoFailoverCluster,
    ha_env: dict[str, str],
    apis: dict[str, Api],
    crews: dict[str, Workers],
    proxy: Proxy,
    db_engine: Engine,
) -> None:
    host_a = placed["a"]
    redis_a, redis_b = cluster.nodes
    sentinel_a = cluster.sentinels[0]
    pg_a, pg_b = pg_cluster.nodes
    assert cluster.primary() is redis_a and pg_cluster.primary() is pg_a
    started = time.monotonic()
    with PacedPublisher(
        proxy.url, 3000, spread=30, batch_size=50, concurrency=4, max_retries=60
    ) as run:
        wait_until(lambda: run.answered() >= 10 and ledger(db_engine)[0] >= 3, timeout=60)
        with redis.Redis(port=redis_a.port) as client:
            seq_at_fault = read_state(client).seq
        # Committed before the fault, so on the synchronous standby too: they must survive.
        committed = ledger_ids(db_engine)
        fault_at = time.time()
        fault_mono = time.monotonic()
        killed = host_a.power_cut()
        # Reap what died (the Popen objects of its services), as their supervisor would.
        redis_a.kill()
        sentinel_a.stop()
        pg_a.kill()
        with contextlib.suppress(ProcessFinishedWithError):
            apis["a"].stop()
        db_engine.dispose()
        wait_until(lambda: cluster.primary_port() == redis_b.port, timeout=60)
        broker_failover_s = time.monotonic() - fault_mono
        wait_until(lambda: pg_cluster.primary_port() == pg_b.port, timeout=90)
        database_failover_s = time.monotonic() - fault_mono
        # The power comes back; a supervisor starts host A's services again, in its cgroup.
        host_a.power_on()
        cluster.rejoin(redis_a)
        host_a.adopt(*redis_a.pids())
        sentinel_a.start()
        host_a.adopt(*sentinel_a.pids())
        pg_a.run()
        host_a.adopt(*pg_a.pids())
        apis["a"] = Api(ha_env, apis["a"].log, port=apis["a"].port, access_log=True).start()
        host_a.adopt(*apis["a"].pids())
        host_a.adopt(*crews["a"].start().pids())
        back_s = time.monotonic() - fault_mono
        summary = run.wait(timeout=240)
    check_invariants(
        SCENARIO,
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
    # The promoted standby stores what the promoted replica accepted.
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
        "seconds_to_database_failover": round(database_failover_s, 2),
        "seconds_until_host_back": round(back_s, 2),
        "seconds_without_202": round(seconds_without_202, 2),
        "seconds_until_202_again": round(accepting_again - fault_at, 2),
        "seconds_without_storing": round(seconds_without_storing, 2),
        "seconds_until_draining": round(drained_at - fault_at, 2),
    }
    print(f"{SCENARIO}:", numbers)
    report(
        f"{SCENARIO}-figures",
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
    # Host B holds both primaries; host A's nodes came back as their replica and standby.
    assert cluster.primary_port() == redis_b.port
    pg_cluster.wait_for(pg_a.port, "secondary")
    pg_cluster.wait_for(pg_b.port, "primary")
    # Host A's processes all died: its Redis, Sentinel, keeper and PostgreSQL, gunicorn and
    # Celery, each with its children.
    assert killed >= 10
