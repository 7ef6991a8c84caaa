"""Real services for tests: a throwaway database, a private Redis, gunicorn and Celery."""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from sqlalchemy import Connection
from sqlalchemy import Engine

from app.db import make_engine
from scripts import services
from scripts.services import RedisServer
from scripts.services import postgres_server_url
from scripts.services import private_redis
from scripts.services import throwaway_database
from scripts.services import truncate_app_tables
from scripts.stack import Api
from scripts.stack import Worker
from tasks.pending import forget_everything


@pytest.fixture(scope="session")
def scratch_dir() -> Iterator[Path]:
    """A directory an unprivileged PostgreSQL account can reach, removed afterwards."""
    with services.scratch_dir("agg-test-") as path:
        yield path


@pytest.fixture(scope="session")
def pg_server_url(scratch_dir: Path) -> Iterator[str]:
    """URL of a PostgreSQL server: DATABASE_URL's when given, else a private one."""
    with postgres_server_url(scratch_dir / "pg", durable=False) as url:
        yield url


@pytest.fixture(scope="session")
def database_url(pg_server_url: str) -> Iterator[str]:
    """A fresh database migrated to head, dropped at the end of the session."""
    with throwaway_database(pg_server_url, "agg_test") as url:
        yield url


@pytest.fixture(scope="session")
def engine(database_url: str) -> Iterator[Engine]:
    engine = make_engine(database_url)
    yield engine
    engine.dispose()


@pytest.fixture
def conn(engine: Engine) -> Iterator[Connection]:
    """A connection inside a transaction that is rolled back after the test.

    The tables are emptied inside it, so the test sees none of the committed
    data of end-to-end tests, and gets it back afterwards.
    """
    with engine.connect() as connection:
        transaction = connection.begin()
        truncate_app_tables(connection)
        yield connection
        transaction.rollback()


@pytest.fixture(scope="session")
def redis_server(scratch_dir: Path) -> Iterator[RedisServer]:
    """A private redis-server (AOF on) for the whole session."""
    with private_redis(scratch_dir / "redis") as server:
        yield server


@pytest.fixture
def quiet_broker(scratch_dir: Path) -> Iterator[redis.Redis]:
    """A private Redis no worker listens to, so nothing but the test touches its queue."""
    with private_redis(scratch_dir / f"redis-quiet-{uuid.uuid4().hex[:6]}") as server:
        client = redis.Redis.from_url(server.url)
        yield client
        client.close()


@pytest.fixture(scope="session")
def stack_env(database_url: str, redis_server: RedisServer, scratch_dir: Path) -> dict[str, str]:
    """Environment for API and worker processes: short timeouts so faults resolve quickly."""
    metrics = scratch_dir / "metrics"
    metrics.mkdir(exist_ok=True)
    return {
        "PROMETHEUS_MULTIPROC_DIR": str(metrics),
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_server.url,
        "BROKER_VISIBILITY_TIMEOUT": "5",
        "BROKER_RESTORE_INTERVAL": "1",
        "BROKER_RESEND_AFTER": "3",
        "BROKER_CHECK_INTERVAL": "1",
        "TASK_RETRY_BACKOFF_MAX": "2",
        "BODY_READ_TIMEOUT": "2",
        # Open on purpose here (tests/test_auth.py runs closed): the API refuses
        # to start without tokens unless told so.
        "AUTH_DISABLED": "1",
    }


@pytest.fixture(scope="session")
def logs(scratch_dir: Path) -> Path:
    path = scratch_dir / "logs"
    path.mkdir(exist_ok=True)
    return path


@pytest.fixture(scope="session")
def api(stack_env: dict[str, str], logs: Path) -> Iterator[Api]:
    """gunicorn with 3 workers, shared by the tests of a session."""
    server = Api(stack_env, logs / "api.log").start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def worker(stack_env: dict[str, str], logs: Path) -> Iterator[Worker]:
    """A Celery worker with 2 pool processes, shared by the tests of a session."""
    process = Worker(stack_env, logs / "worker.log").start()
    yield process
    process.stop()


@pytest.fixture
def clean(engine: Engine, redis_server: RedisServer) -> None:
    """Empty the tables and the pending marks; end-to-end tests share committed data."""
    with engine.begin() as connection:
        truncate_app_tables(connection)
    with redis.Redis.from_url(redis_server.url) as client:
        forget_everything(client)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    """Attach the API and worker logs to a failing test's report."""
    report = yield
    if report.failed and call.when == "call":
        for fixture in ("api", "worker"):
            process = item.funcargs.get(fixture) if hasattr(item, "funcargs") else None
            log = getattr(process, "log", None)
            if log is not None and Path(log).exists():
                tail = Path(log).read_text(errors="replace")[-30000:]
                report.sections.append((f"{fixture} log ({log})", tail))
    return report


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_node_collection_finished(node: object, ids: list[str]) -> None:
    """Refuse, under pytest-xdist, tests that share a node id: xdist runs only one of them.

    schemathesis gives every operation of tests/test_fuzz.py the same id, so scripts/test.sh
    runs that module in a plain session of its own.
    """
    shared = sorted(nodeid for nodeid, count in Counter(ids).items() if count > 1)
    if shared:
        raise pytest.UsageError(
            f"these node ids name several tests, and pytest-xdist would run one of each: {shared}"
        )
