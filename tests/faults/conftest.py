"""Fixtures of the fault suite: every test runs its own broker, API and workers."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine

from app.db import make_engine
from scripts.services import PostgresServer
from scripts.services import RedisServer
from scripts.services import migrate
from scripts.services import private_postgres
from scripts.services import private_redis
from scripts.stack import Api
from tests.faults.harness import Workers

# --- fixtures: a private broker, API and workers per test ------------------------------------


@pytest.fixture
def broker(scratch_dir: Path) -> Iterator[RedisServer]:
    """A private redis-server with AOF, so an outage test can stop it and find its data again.

    DEBUG is allowed from loopback, so a test can stall it with `DEBUG SLEEP`.
    """
    with private_redis(scratch_dir / f"redis-faults-{uuid.uuid4().hex[:6]}", debug=True) as server:
        yield server


@pytest.fixture
def fault_env(stack_env: dict[str, str], broker: RedisServer) -> dict[str, str]:
    return {**stack_env, "REDIS_URL": broker.url}


@pytest.fixture
def api(fault_env: dict[str, str], logs: Path) -> Iterator[Api]:
    """This test's gunicorn (3 workers). Named like the session's, so a failure shows its log."""
    server = Api(fault_env, logs / "faults-api.log").start()
    yield server
    server.stop()


@pytest.fixture
def worker(fault_env: dict[str, str], logs: Path) -> Iterator[Workers]:
    """Workers started on demand. Named like the session's, so a failure shows their log."""
    crew = Workers(fault_env, logs / "faults-worker.log")
    yield crew
    crew.close()


@pytest.fixture
def postgres(scratch_dir: Path) -> Iterator[PostgresServer]:
    """A PostgreSQL of the test's own, migrated, so the test can stop and start it."""
    with private_postgres(
        scratch_dir / f"pg-faults-{uuid.uuid4().hex[:6]}", durable=False
    ) as server:
        server.create_database("aggregator")
        migrate(server.url("aggregator"))
        yield server


@pytest.fixture
def outage_engine(postgres: PostgresServer) -> Iterator[Engine]:
    """An engine on the test's own PostgreSQL."""
    engine = make_engine(postgres.url("aggregator"))
    yield engine
    engine.dispose()
