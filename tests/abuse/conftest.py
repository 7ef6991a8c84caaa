"""Fixtures of the noisy-neighbour suite: a private broker and workers per module, APIs per test.

Every API here runs as production does (2 gevent processes, bearer tokens, the
default budgets unless a test says otherwise) with the access log on. Modules
of this suite may define fixtures of their own; these are named `abuse_*` so
they never shadow them or the session's.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from scripts.services import RedisServer
from scripts.services import private_redis
from scripts.stack import Api
from scripts.stack import Worker
from scripts.stack import wait_until
from tests.abuse.noisy import ABUSER_TOKEN
from tests.abuse.noisy import GOOD_TOKEN
from tests.abuse.noisy import topic_stored


@pytest.fixture(scope="module")
def abuse_broker(scratch_dir: Path) -> Iterator[RedisServer]:
    """A private Redis for this module: budgets and failed logins counted here only."""
    with private_redis(scratch_dir / f"redis-abuse-{uuid.uuid4().hex[:6]}") as server:
        yield server


@pytest.fixture(scope="module")
def abuse_env(stack_env: dict[str, str], abuse_broker: RedisServer) -> dict[str, str]:
    return {
        **stack_env,
        "REDIS_URL": abuse_broker.url,
        "AUTH_DISABLED": "",
        "API_TOKENS": f"{GOOD_TOKEN}:publish+read,{ABUSER_TOKEN}:publish+read",
    }


@pytest.fixture(scope="module")
def abuse_worker(abuse_env: dict[str, str], logs: Path) -> Iterator[Worker]:
    """A Celery worker (2 processes) on this module's broker."""
    log = logs / f"abuse-worker-{uuid.uuid4().hex[:6]}.log"
    process = Worker(abuse_env, log, name="abuse").start()
    yield process
    process.stop()


class Apis:
    """Starts this test's APIs, and stops them afterwards; their logs go with a failure."""

    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env = env
        self.logs = logs
        self.started: list[Api] = []

    def __call__(self, **overrides: str) -> Api:
        log = self.logs / f"abuse-api-{uuid.uuid4().hex[:6]}.log"
        server = Api({**self.env, **overrides}, log, workers=2, access_log=True).start()
        self.started.append(server)
        return server

    def stop(self) -> None:
        for server in self.started:
            server.stop()


@pytest.fixture
def abuse_api(abuse_env: dict[str, str], logs: Path) -> Iterator[Callable[..., Api]]:
    """Call with environment overrides to start an API (2 gevent processes, access log on)."""
    apis = Apis(abuse_env, logs)
    yield apis
    apis.stop()


@pytest.fixture
def drained() -> Callable[[str, str, int], None]:
    """Wait until the good client's events are all stored and nothing is left queued."""

    def wait(url: str, topic: str, accepted: int) -> None:
        headers = {"Authorization": f"Bearer {GOOD_TOKEN}"}

        def settled() -> bool:
            stats = requests.get(f"{url}/stats", headers=headers, timeout=10).json()
            return stats["queued_events"] == 0 and topic_stored(url, topic) == accepted

        wait_until(settled, timeout=60, interval=0.2)

    return wait


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    """Attach this test's API and worker logs to its report when it fails."""
    report = yield
    if report.failed and call.when == "call" and hasattr(item, "funcargs"):
        logs: list[Path] = []
        apis = item.funcargs.get("abuse_api")
        if isinstance(apis, Apis):
            logs += [server.log for server in apis.started]
        worker = item.funcargs.get("abuse_worker")
        if isinstance(worker, Worker):
            logs.append(worker.log)
        for log in logs:
            if log.exists():
                tail = log.read_text(errors="replace")[-20000:]
                report.sections.append((f"log {log.name}", tail))
    return report
