"""Fixtures of the HA suites: each test has its own Redis primary, replica and three Sentinels
(or one Redis), its own PostgreSQL (one, or a pg_auto_failover monitor, primary and synchronous
standby), real processes on loopback ports or on hosts of the test's own network (network
namespaces, tests/ha/hosts.py), private directories, stopped after; and an API and workers on
them (the broker found through the Sentinels, the database through a multi-host URL).

A module places the servers on hosts by overriding `redis_placement` and `pg_placement`
(ReplicatedRedis's and AutoFailoverCluster's keyword arguments); by default all are on
loopback."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Callable
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine

from scripts.services import ROOT
from scripts.services import AutoFailoverCluster
from scripts.services import PostgresServer
from scripts.services import RedisServer
from scripts.services import ReplicatedRedis
from scripts.services import create_database
from scripts.services import migrate
from scripts.services import private_auto_failover
from scripts.services import private_postgres
from scripts.services import private_redis
from scripts.services import private_replicated_redis
from scripts.services import truncate_app_tables
from scripts.services import with_database
from scripts.stack import Api
from tests.faults.harness import Workers
from tests.ha.hosts import Host
from tests.ha.hosts import Network
from tests.ha.network import SilentPartition
from tests.ha.network import iptables_usable


@pytest.fixture
def network() -> Iterator[Network]:
    """This test's own network of hosts (namespaces on a bridge); all of it removed after."""
    reason = iptables_usable()
    if reason:
        pytest.skip(reason)
    made = Network()
    try:
        yield made
    finally:
        made.close()


@pytest.fixture
def hosts(network: Network) -> dict[str, Host]:
    """Hosts A, B and C (.1, .2, .3 of the test's network); the test itself is .254."""
    return {name: network.host(name) for name in ("a", "b", "c")}


@pytest.fixture
def redis_placement() -> dict[str, Any]:
    """Where the broker's nodes and Sentinels run (ReplicatedRedis's options): loopback."""
    return {}


@pytest.fixture
def pg_placement() -> dict[str, Any]:
    """Where the monitor and database nodes run (AutoFailoverCluster's options): loopback."""
    return {}


@pytest.fixture
def cluster(scratch_dir: Path, redis_placement: dict[str, Any]) -> Iterator[ReplicatedRedis]:
    """A Redis primary, its replicas and three Sentinels of this test's own."""
    base = scratch_dir / f"ha-{uuid.uuid4().hex[:6]}"
    with private_replicated_redis(base, **redis_placement) as replicated:
        yield replicated


@pytest.fixture
def ha_env(stack_env: dict[str, str], cluster: ReplicatedRedis) -> dict[str, str]:
    """The session's settings, the broker found through the Sentinels (BROKER_MIN_REPLICAS 1)."""
    return {**stack_env, **cluster.env()}


@pytest.fixture
def ha_clean(engine: Engine) -> None:
    """Empty the tables (the broker is this test's own, and new)."""
    with engine.begin() as connection:
        truncate_app_tables(connection)


@pytest.fixture
def api(ha_env: dict[str, str], logs: Path) -> Iterator[Api]:
    """This test's gunicorn, with its access log (each answer's status and time)."""
    server = Api(ha_env, logs / "ha-api.log", access_log=True).start()
    yield server
    server.stop()


@pytest.fixture
def worker(ha_env: dict[str, str], logs: Path) -> Iterator[Workers]:
    """Workers started on demand. Named like the session's, so a failure shows their log."""
    crew = Workers(ha_env, logs / "ha-worker.log")
    yield crew
    crew.close()


@pytest.fixture
def partitions() -> Iterator[Callable[[int], SilentPartition]]:
    """Make silent partitions of loopback ports; all healed after the test."""
    reason = iptables_usable()
    if reason:
        pytest.skip(reason)
    made: list[SilentPartition] = []

    def make(port: int) -> SilentPartition:
        partition = SilentPartition(port)
        made.append(partition)
        return partition

    yield make
    for partition in made:
        partition.heal()


@pytest.fixture
def own_broker(scratch_dir: Path) -> Iterator[RedisServer]:
    """One redis-server of this test's own (the database suites fault PostgreSQL, not Redis)."""
    with private_redis(scratch_dir / f"ha-redis-{uuid.uuid4().hex[:6]}") as server:
        yield server


@pytest.fixture
def own_postgres(scratch_dir: Path) -> Iterator[PostgresServer]:
    """One PostgreSQL of this test's own, migrated, so the test can cut it off."""
    with private_postgres(scratch_dir / f"ha-pg-{uuid.uuid4().hex[:6]}", durable=False) as server:
        server.create_database("aggregator")
        migrate(server.url("aggregator"))
        yield server


@pytest.fixture
def pg_cluster(scratch_dir: Path, pg_placement: dict[str, Any]) -> Iterator[AutoFailoverCluster]:
    """pg_auto_failover of this test's own: monitor, primary, synchronous standby; migrated.

    The database is created and migrated through the multi-host URL, the way a deploy's
    one-shot `alembic upgrade head` step would (DATABASE_URL read by migrations/env.py).
    """
    base = scratch_dir / f"ha-paf-{uuid.uuid4().hex[:6]}"
    with private_auto_failover(base, **pg_placement) as cluster:
        url = cluster.url("aggregator")
        create_database(with_database(url, "postgres"), "aggregator")
        subprocess.run(
            [sys.executable, "-m", "alembic", "upgrade", "head"],
            cwd=ROOT,
            env={**os.environ, "DATABASE_URL": url},
            check=True,
            capture_output=True,
        )
        yield cluster
