"""Faults injected into real processes while a known run is published, then the invariants.

Each scenario publishes events with duplicates while a fault happens (killed workers, a broker or
database outage, killed API processes, a task that outlives the visibility timeout), waits until
the system settles and checks: every event answered 202 is stored exactly once, nothing never
sent is stored, /stats matches what was sent (within the publisher's `ambiguous` tolerance), the
broker holds no message, and a fresh batch is still processed promptly.

Every test runs its own broker, API and workers, so the session's worker cannot take its
messages. When RELIABILITY_REPORT names a file, each scenario appends one JSON line to it.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from typing import Self

import pytest
import redis
import requests
import urllib3
from mirakuru.exceptions import ProcessFinishedWithError
from sqlalchemy import Engine
from sqlalchemy import func
from sqlalchemy import select

from app.db import batches
from app.db import events
from app.db import make_engine
from publisher.client import PublishConfig
from publisher.client import PublishSummary
from publisher.client import RequestOutcome
from publisher.client import percentile
from publisher.client import send_batch
from publisher.client import summarize
from publisher.events import batched
from publisher.events import event_key
from publisher.events import plan_events
from publisher.verify import VerifyResult
from publisher.verify import wait_and_verify
from scripts.services import PostgresServer
from scripts.services import RedisServer
from scripts.services import find_pg_bindir
from scripts.services import find_redis_server
from scripts.services import free_port
from scripts.stack import Api
from scripts.stack import Worker
from scripts.stack import alive
from scripts.stack import wait_until
from tasks.pending import PENDING_KEY
from tests.conftest import migrate
from tests.test_crash import TableLock
from tests.test_pipeline import assert_adds_up
from tests.test_pipeline import make_event
from tests.test_pipeline import stats

ROOT = Path(__file__).resolve().parent.parent
Key = tuple[str, str]


# --- reporting --------------------------------------------------------------------------------


def report(
    scenario: str,
    *,
    events_sent: int,
    acknowledged: int,
    lost: int,
    double_counted: int,
    duration_s: float,
    p99_503_ms: float | None = None,
    faults: int | None = None,
    ambiguous: int = 0,
) -> None:
    """Append this scenario's numbers as one JSON line to $RELIABILITY_REPORT, when it is set."""
    path = os.environ.get("RELIABILITY_REPORT")
    if not path:
        return
    line = {
        "scenario": scenario,
        "events_sent": events_sent,
        "acknowledged": acknowledged,
        "lost": lost,
        "double_counted": double_counted,
        "p99_503_ms": p99_503_ms,
        "duration_s": round(duration_s, 2),
        "faults": faults,
        "ambiguous": ambiguous,
    }
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(line) + "\n")


# --- a publisher run that keeps every answer ------------------------------------------------


@dataclass(frozen=True)
class Sent:
    """One publish request: when it started and ended (monotonic) and how it ended."""

    started: float
    finished: float
    outcome: RequestOutcome


class PacedPublisher:
    """The publisher's own request path (plan_events, send_batch, summarize) in a thread.

    publisher.client.publish returns counts only; the invariants need the keys each answer
    covered, so this keeps every RequestOutcome. Requests are spread over `spread` seconds
    (think time, as locust's wait_time) so the run is still going while faults are injected.
    """

    def __init__(
        self,
        url: str,
        count: int,
        *,
        spread: float,
        batch_size: int = 100,
        concurrency: int = 4,
        max_retries: int = 20,
        timeout: float = 10.0,
    ) -> None:
        self.config = PublishConfig(
            url=url,
            count=count,
            duplicate_ratio=0.1,
            batch_size=batch_size,
            concurrency=concurrency,
            topics=3,
            max_retries=max_retries,
            timeout=timeout,
            progress=False,
        )
        self.spread = spread
        self.events = plan_events(count, 0.1, self.config.topic_names(), self.config.source)
        self.batches = batched(self.events, batch_size)
        self.sent: list[Sent] = []
        self._lock = threading.Lock()
        self._cancel = threading.Event()
        self._thread = threading.Thread(target=self._run, name="paced-publisher", daemon=True)
        self._error: BaseException | None = None
        self._started = 0.0
        self._elapsed = 0.0

    def __enter__(self) -> Self:
        self._started = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        # On a failing test: send nothing more, and let requests in flight end.
        self._cancel.set()
        self._thread.join(timeout=60)

    def _send(self, index: int, pool: urllib3.PoolManager) -> None:
        due = self._started + index * self.spread / len(self.batches)
        if self._cancel.wait(max(0.0, due - time.monotonic())):
            return
        started = time.monotonic()
        outcome = send_batch(
            pool,
            self.config.url.rstrip("/") + "/publish",
            self.batches[index],
            headers={"Content-Type": "application/json"},
            as_object=False,
            max_retries=self.config.max_retries,
            timeout=self.config.timeout,
        )
        with self._lock:
            self.sent.append(Sent(started, time.monotonic(), outcome))

    def _run(self) -> None:
        pool = urllib3.PoolManager(maxsize=self.config.concurrency)
        try:
            with ThreadPoolExecutor(self.config.concurrency) as executor:
                futures = [
                    executor.submit(self._send, index, pool) for index in range(len(self.batches))
                ]
                for future in futures:
                    future.result()
        except BaseException as exc:  # Re-raised in the test by wait().
            self._error = exc
        finally:
            pool.clear()
            self._elapsed = time.monotonic() - self._started

    def done(self) -> bool:
        return not self._thread.is_alive()

    def answered(self) -> int:
        """Return how many requests have been answered with 202 so far."""
        with self._lock:
            return sum(1 for sent in self.sent if sent.outcome.accepted)

    def wait(self, timeout: float) -> PublishSummary:
        """Wait for the last request, then summarise the run as the publisher's CLI would."""
        self._thread.join(timeout)
        assert not self._thread.is_alive(), f"publisher still running after {timeout} s"
        if self._error is not None:
            raise self._error
        outcomes = [sent.outcome for sent in self.sent]
        return summarize(len(self.events), outcomes, self._elapsed, self.config.topic_names())

    def accepted_keys(self) -> set[Key]:
        return {event_key(e) for s in self.sent if s.outcome.accepted for e in s.outcome.events}

    def maybe_sent_keys(self) -> set[Key]:
        """Keys of failed requests that may still have reached the API (ambiguous attempts)."""
        return {
            event_key(e)
            for s in self.sent
            if not s.outcome.accepted and s.outcome.ambiguous_attempts
            for e in s.outcome.events
        }


# --- fixtures: a private broker, API and workers per test ------------------------------------


@pytest.fixture
def broker(scratch_dir: Path) -> Iterator[RedisServer]:
    """A private redis-server with AOF, so an outage test can stop it and find its data again."""
    server = RedisServer(
        scratch_dir / f"redis-faults-{uuid.uuid4().hex[:6]}", free_port(), find_redis_server()
    )
    server.start()
    yield server
    server.stop()


@pytest.fixture
def fault_env(stack_env: dict[str, str], broker: RedisServer) -> dict[str, str]:
    return {**stack_env, "REDIS_URL": broker.url}


@pytest.fixture
def api(fault_env: dict[str, str], logs: Path) -> Iterator[Api]:
    """This test's gunicorn (3 workers). Named like the session's, so a failure shows its log."""
    server = Api(fault_env, logs / "faults-api.log").start()
    yield server
    server.stop()


class Workers:
    """The Celery workers of one test, sharing one log; every one started is cleaned up."""

    def __init__(self, env: dict[str, str], log: Path, concurrency: int = 2) -> None:
        self.env = env
        self.log = log
        self.concurrency = concurrency
        self.started: list[Worker] = []
        self._offset = log.stat().st_size if log.exists() else 0

    @property
    def current(self) -> Worker:
        return self.started[-1]

    def start(self) -> Worker:
        worker = Worker(self.env, self.log, concurrency=self.concurrency, name="fault").start()
        self.started.append(worker)
        return worker

    def output(self) -> str:
        """Return what this test's workers have logged."""
        with open(self.log, "rb") as handle:
            handle.seek(self._offset)
            return handle.read().decode(errors="replace")

    def close(self) -> None:
        for worker in self.started:
            try:
                worker.stop()
            except ProcessFinishedWithError:
                pass  # It had exited with an error already; the test says why.
            # Pool processes orphaned by a SIGKILLed main process: mirakuru finds them by
            # their environment marker. Then stop() again only closes the log.
            worker.executor.kill(sig=signal.SIGKILL)
            worker.stop()


@pytest.fixture
def worker(fault_env: dict[str, str], logs: Path) -> Iterator[Workers]:
    """Workers started on demand. Named like the session's, so a failure shows their log."""
    crew = Workers(fault_env, logs / "faults-worker.log")
    yield crew
    crew.close()


# --- checks ---------------------------------------------------------------------------------


def ledger(engine: Engine) -> tuple[int, int]:
    """Return the number of processed batches and the events they received."""
    with engine.connect() as conn:
        rows, received = conn.execute(
            select(func.count(), func.coalesce(func.sum(batches.c.received), 0))
        ).one()
    return rows, received


def stored_keys(engine: Engine, topics: list[str]) -> Counter[Key]:
    with engine.connect() as conn:
        rows = conn.execute(
            select(events.c.topic, events.c.event_id).where(events.c.topic.in_(topics))
        ).all()
    return Counter((row.topic, row.event_id) for row in rows)


def event_count(engine: Engine) -> int:
    with engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(events)).scalar_one()


def assert_broker_drained(broker: RedisServer) -> None:
    """No message left on the queue or held unacknowledged, and no pending mark."""
    with redis.Redis.from_url(broker.url) as client:
        wait_until(lambda: client.llen("celery") == 0 and client.hlen("unacked") == 0, timeout=30)
        # /stats forgets the marks of committed batches; the test just read /stats.
        assert client.hlen(PENDING_KEY) == 0


def assert_still_processing(url: str, timeout: float = 10.0) -> None:
    """A fresh small batch is stored promptly: no worker is stuck or disconnected."""
    topic = f"fresh-{uuid.uuid4().hex[:8]}"
    bodies = [[make_event(f"{i}-{j}", topic=topic) for j in range(25)] for i in range(4)]

    def post(body: list[dict[str, Any]]) -> int:
        return requests.post(f"{url}/publish", json=body, timeout=10).status_code

    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(post, bodies)) == [202] * 4
    expected = {"stored": 100, "duplicates": 0, "failed": 0}
    wait_until(lambda: stats(url)["topics"].get(topic) == expected, timeout=timeout)


def double_counted(result: VerifyResult) -> int:
    """Return how far stored and duplicate counts went above what the tolerance allows."""
    return max(0, result.observed_stored - result.expected_stored_max) + max(
        0, result.observed_duplicates - result.expected_duplicates_max
    )


def check_invariants(
    scenario: str,
    *,
    run: PacedPublisher,
    summary: PublishSummary,
    api: Api,
    engine: Engine,
    broker: RedisServer,
    started: float,
    faults: int,
    p99_503_ms: float | None = None,
    settle: float = 60,
) -> None:
    """Settle, report the scenario's numbers, then check every invariant of a run."""
    result = wait_and_verify(api.url, summary, timeout=settle, poll=0.2)
    stored = stored_keys(engine, summary.topics)
    accepted = run.accepted_keys()
    lost = accepted - set(stored)
    never_sent = set(stored) - accepted - run.maybe_sent_keys()
    report(
        scenario,
        events_sent=summary.planned,
        acknowledged=summary.sent,
        lost=len(lost),
        double_counted=double_counted(result),
        duration_s=time.monotonic() - started,
        p99_503_ms=p99_503_ms,
        faults=faults,
        ambiguous=summary.ambiguous,
    )
    assert not lost, f"{len(lost)} events answered 202 were not stored, e.g. {sorted(lost)[:3]}"
    assert not never_sent, f"stored events never sent: {sorted(never_sent)[:3]}"
    assert max(stored.values(), default=1) == 1
    assert result.ok, result.message

    figures = stats(api.url)
    assert_adds_up(figures)
    assert (figures["failed_events"], figures["queued_events"]) == (0, 0)
    assert summary.sent <= figures["total_received_queued"] <= summary.sent + summary.ambiguous
    # Only this run's events are in the database, each once, and the counters say so.
    assert figures["unique_processed_db"] == len(stored) == event_count(engine)
    batch_rows, received = ledger(engine)
    assert received == figures["total_received_queued"]
    answered = [s.outcome for s in run.sent if s.outcome.accepted]
    ambiguous = sum(s.outcome.ambiguous_attempts for s in run.sent)
    assert len(answered) <= batch_rows <= len(answered) + ambiguous
    assert_broker_drained(broker)


def kill_and_wait(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not alive(pid), timeout=10)


def fatal_lines(workers: Workers) -> list[str]:
    """Return the lines where a worker gave up (Celery logs those as CRITICAL)."""
    return [line for line in workers.output().splitlines() if "CRITICAL" in line]


# --- 1. worker chaos --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("count", "kills", "settle"),
    [
        pytest.param(6000, 7, 40, id="6k"),
        pytest.param(20000, 20, 120, id="20k", marks=pytest.mark.soak),
    ],
)
def test_random_worker_kills_lose_and_double_count_nothing(
    count: int,
    kills: int,
    settle: float,
    api: Api,
    worker: Workers,
    broker: RedisServer,
    engine: Engine,
    clean: None,
) -> None:
    """SIGKILL a random worker process (pool child or main) every 1-2 s while publishing."""
    started = time.monotonic()
    worker.start()
    rng = random.Random()
    kinds: Counter[str] = Counter()
    with PacedPublisher(api.url, count, spread=count / 750) as run:
        for n in range(kills):
            due = time.monotonic() + rng.uniform(1.0, 2.0)
            before = ledger(engine)[0]
            # Each kill waits until something was stored since the last one, so faults land
            # on a system that is making progress, not on one still restarting.
            wait_until(
                lambda due=due, before=before: (
                    time.monotonic() >= due and (run.done() or ledger(engine)[0] > before)
                ),
                timeout=60,
                interval=0.1,
            )
            current = worker.current
            pool = current.children()
            kind = rng.choice(["main"] + ["child"] * len(pool))
            # Make sure both kinds happen in every run.
            if n == kills - 1 and kinds["main"] == 0:
                kind = "main"
            elif n == kills - 1 and kinds["child"] == 0:
                kind = "child"
            kinds[kind] += 1
            if kind == "main":
                # Only the main process: its pool is orphaned, as after an OOM kill.
                kill_and_wait(current.pid)
                worker.start()
            else:
                kill_and_wait(rng.choice(pool))
        summary = run.wait(timeout=120)
    assert summary.errors == 0, summary.first_error
    check_invariants(
        f"worker-chaos-{count}",
        run=run,
        summary=summary,
        api=api,
        engine=engine,
        broker=broker,
        started=started,
        faults=kills,
        settle=settle,
    )
    # The pool replaces a killed process; then every process of the last worker runs.
    wait_until(
        lambda: (
            len(worker.current.children()) == worker.concurrency
            and all(alive(pid) for pid in [worker.current.pid, *worker.current.children()])
        ),
        timeout=10,
    )
    assert_still_processing(api.url)


# --- 2. broker outage -------------------------------------------------------------------------


@dataclass(frozen=True)
class Probe:
    """One POST /publish while the broker is down: how it was answered, and how fast."""

    status: int
    latency: float
    retry_after: str | None
    body: dict[str, Any]


def probe_publish(url: str, event: dict[str, Any]) -> Probe:
    """POST one event with a 1 s client timeout: a slow answer fails the test."""
    started = time.perf_counter()
    response = requests.post(f"{url}/publish", json=event, timeout=1.0)
    latency = time.perf_counter() - started
    return Probe(
        response.status_code, latency, response.headers.get("Retry-After"), response.json()
    )


@pytest.mark.parametrize("how", ["stop", "kill"])
def test_broker_outage_gives_fast_503s_and_recovers_without_restarts(
    how: str,
    api: Api,
    worker: Workers,
    broker: RedisServer,
    engine: Engine,
    clean: None,
) -> None:
    """Redis goes away mid-run: fast 503s meanwhile, then API and workers recover by themselves."""
    started = time.monotonic()
    current = worker.start()
    api_pids = sorted(api.worker_pids())
    probe_topic = f"probe-{uuid.uuid4().hex[:8]}"
    probes: list[Probe] = []
    with PacedPublisher(api.url, 3000, spread=6.0, max_retries=40) as run:
        wait_until(lambda: run.answered() >= 5 and ledger(engine)[0] >= 1, timeout=30)
        if how == "stop":
            broker.stop()
        else:
            broker.kill()
            # A killed Redis leaves its pidfile, and RedisServer.start() then fails reading
            # /proc/<dead pid>/cmdline (FileNotFoundError): remove it as a crash would need.
            (broker.datadir / "redis.pid").unlink(missing_ok=True)
        down_at = time.monotonic()

        ready = requests.get(f"{api.url}/ready", timeout=1.0)
        assert ready.status_code == 503, ready.text
        assert ready.json()["checks"]["broker"].startswith("down"), ready.text
        assert ready.json()["checks"]["database"] == "ok", ready.text
        assert ready.headers.get("Retry-After")
        figures = requests.get(f"{api.url}/stats", timeout=1.0)
        assert figures.status_code == 503 and "broker" in figures.json()["message"]

        # The outage lasts past one Retry-After, so every publisher thread meets a 503 and
        # backs off; probes measure how fast the API says so meanwhile.
        retry_after = int(ready.headers["Retry-After"])
        while time.monotonic() - down_at < retry_after + 1.5 or len(probes) < 50:
            probes.append(probe_publish(api.url, make_event(f"p-{len(probes)}", probe_topic)))
        broker.start()
        up_at = time.monotonic()
        summary = run.wait(timeout=90)
    assert not fatal_lines(worker), fatal_lines(worker)

    p99 = round(percentile([p.latency for p in probes], 99) * 1000, 1)
    assert {p.status for p in probes} == {503}
    assert all(p.retry_after == str(retry_after) for p in probes)
    assert all(p.body["code"] == 503 and "broker" in p.body["message"] for p in probes)
    assert summary.errors == 0, summary.first_error
    # Requests sent while the broker was down were answered 503, backed off, and accepted
    # once it was back.
    assert any(down_at <= s.started and s.finished > up_at for s in run.sent)
    check_invariants(
        f"broker-outage-{how}",
        run=run,
        summary=summary,
        api=api,
        engine=engine,
        broker=broker,
        started=started,
        faults=1,
        p99_503_ms=p99,
    )
    assert not stored_keys(engine, [probe_topic]), "an event answered 503 was stored"
    # Nothing was restarted: the same gunicorn workers and the same Celery worker recovered.
    assert sorted(api.worker_pids()) == api_pids
    assert worker.started == [current] and current.executor.running()
    assert_still_processing(api.url)
    wait_until(lambda: requests.get(f"{api.url}/ready", timeout=1.0).status_code == 200)


@pytest.mark.parametrize("how", ["stop", "kill"])
def test_worker_survives_losing_the_broker_with_a_task_in_flight(
    how: str,
    api: Api,
    worker: Workers,
    broker: RedisServer,
    engine: Engine,
    clean: None,
) -> None:
    """The broker goes away while a task runs: the worker reconnects, the batch is stored once."""
    started = time.monotonic()
    current = worker.start()
    lock = TableLock(engine)
    try:
        response = requests.post(
            f"{api.url}/publish", json=[make_event(f"f-{i}") for i in range(50)], timeout=10
        )
        assert response.status_code == 202, response.text
        lock.wait_for_blocked_tasks(1)
        if how == "stop":
            broker.stop()
        else:
            broker.kill()
            (broker.datadir / "redis.pid").unlink(missing_ok=True)
        # A worker that handles the loss retries the connection; one that does not gives up.
        wait_until(
            lambda: (
                "Cannot connect to" in worker.output() or "Unrecoverable error" in worker.output()
            ),
            timeout=30,
        )
    finally:
        lock.release()
    broker.start()
    crashed = "Unrecoverable error" in worker.output()
    try:
        if not crashed:
            wait_until(lambda: stats(api.url)["queued_events"] == 0, timeout=30)
    finally:
        figures = stats(api.url)
        report(
            f"broker-{how}-task-in-flight",
            events_sent=50,
            acknowledged=50,
            lost=50 - figures["unique_processed_db"],
            double_counted=max(0, figures["total_received_queued"] - 50),
            duration_s=time.monotonic() - started,
            faults=1,
        )
    assert not crashed and not fatal_lines(worker), fatal_lines(worker)
    assert worker.started == [current] and current.executor.running()
    assert (figures["unique_processed_db"], figures["total_received_queued"]) == (50, 50)
    assert_broker_drained(broker)
    assert_still_processing(api.url)


# --- 3. database outage -----------------------------------------------------------------------


class TestDatabaseOutage:
    """PostgreSQL of its own, so it can be stopped; the API and workers use it."""

    @pytest.fixture
    def postgres(self, scratch_dir: Path) -> Iterator[PostgresServer]:
        server = PostgresServer(
            scratch_dir / f"pg-faults-{uuid.uuid4().hex[:6]}",
            free_port(),
            find_pg_bindir(),
            durable=False,
        )
        server.start()
        server.create_database("aggregator")
        migrate(server.url("aggregator"))
        yield server
        server.stop()

    @pytest.fixture
    def fault_env(
        self, stack_env: dict[str, str], broker: RedisServer, postgres: PostgresServer
    ) -> dict[str, str]:
        return {**stack_env, "REDIS_URL": broker.url, "DATABASE_URL": postgres.url("aggregator")}

    @pytest.fixture
    def outage_engine(self, postgres: PostgresServer) -> Iterator[Engine]:
        engine = make_engine(postgres.url("aggregator"))
        yield engine
        engine.dispose()

    def test_database_outage_keeps_accepting_and_drains_exactly(
        self,
        postgres: PostgresServer,
        api: Api,
        worker: Workers,
        broker: RedisServer,
        outage_engine: Engine,
    ) -> None:
        """PostgreSQL stops mid-run: 202s go on, /stats says 503, workers retry, all drains."""
        started = time.monotonic()
        current = worker.start()
        api_pids = sorted(api.worker_pids())
        with PacedPublisher(api.url, 3000, spread=6.0, max_retries=20) as run:
            wait_until(lambda: run.answered() >= 5 and ledger(outage_engine)[0] >= 1, timeout=30)
            postgres.stop()
            answered_before = run.answered()
            retries_before = len(retried_tasks(worker.output()))

            # Publishing goes on: the API only needs the broker to answer 202.
            wait_until(lambda: run.answered() >= answered_before + 10, timeout=30)
            response = requests.get(f"{api.url}/stats", timeout=5)
            assert response.status_code == 503, response.text
            assert response.headers["Content-Type"].startswith("application/json")
            assert response.headers.get("Retry-After")
            body = response.json()
            assert body["code"] == 503 and "database" in body["message"], body
            assert "Traceback" not in response.text
            ready = requests.get(f"{api.url}/ready", timeout=5)
            assert ready.status_code == 503
            assert ready.json()["checks"]["database"].startswith("down"), ready.text

            # Workers retry with backoff, a task again and again, and keep the messages.
            def retried_three_times() -> bool:
                counts = Counter(retried_tasks(worker.output())[retries_before:])
                return bool(counts) and max(counts.values()) >= 3

            wait_until(retried_three_times, timeout=30)
            with redis.Redis.from_url(broker.url) as client:
                assert client.llen("celery") + client.hlen("unacked") > 0
            postgres.start()
            summary = run.wait(timeout=90)

        assert summary.errors == 0, summary.first_error
        check_invariants(
            "database-outage",
            run=run,
            summary=summary,
            api=api,
            engine=outage_engine,
            broker=broker,
            started=started,
            faults=1,
        )
        assert sorted(api.worker_pids()) == api_pids
        assert worker.started == [current] and current.executor.running()
        assert not fatal_lines(worker), fatal_lines(worker)
        assert_still_processing(api.url)


def retried_tasks(log: str) -> list[str]:
    """Return the task id of every retry the worker logged, in order."""
    return re.findall(r"store_batch\[(\w+)\] retry: Retry in", log)


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


# --- 5. slow worker ---------------------------------------------------------------------------


def test_task_outliving_the_visibility_timeout_runs_twice_and_counts_once(
    api: Api,
    worker: Workers,
    broker: RedisServer,
    engine: Engine,
    clean: None,
) -> None:
    """A task held past the visibility timeout is redelivered, runs twice, and counts once."""
    started = time.monotonic()
    worker.start()
    body = [make_event(f"s-{i}", topic="slow") for i in range(100)]
    body += [make_event(f"s-{i}", topic="slow") for i in range(10)]
    lock = TableLock(engine)
    try:
        response = requests.post(f"{api.url}/publish", json=body, timeout=10)
        assert response.status_code == 202, response.text
        lock.wait_for_blocked_tasks(1)
        # Past the visibility timeout Redis hands the message to the other pool process,
        # which then waits on the ledger row the first one claimed.
        lock.wait_for_blocked_tasks(2)
    finally:
        lock.release()
    wait_until(lambda: "replayed=True" in worker.output(), timeout=30)
    figures = stats(api.url)
    with engine.connect() as conn:
        ledger_rows = conn.execute(select(batches)).all()
    stored = stored_keys(engine, ["slow"])
    report(
        "slow-worker",
        events_sent=len(body),
        acknowledged=len(body),
        lost=100 - len(stored),
        double_counted=max(0, figures["total_received_queued"] - len(body)),
        duration_s=time.monotonic() - started,
        faults=1,
    )
    assert len(ledger_rows) == 1
    batch_id = ledger_rows[0].batch_id
    assert (ledger_rows[0].received, ledger_rows[0].stored, ledger_rows[0].duplicates) == (
        110,
        100,
        10,
    )
    log = worker.output()
    assert log.count(f"store_batch[{batch_id}] received") == 2
    assert re.search(
        rf"batch {batch_id} received=110 stored=100 duplicates=10 .*replayed=False", log
    )
    assert re.search(rf"batch {batch_id} received=110 stored=0 duplicates=0 .*replayed=True", log)
    assert len(stored) == 100 and max(stored.values()) == 1
    assert figures["total_received_queued"] == 110
    assert (figures["unique_processed_db"], figures["estimated_duplicate_dropped"]) == (100, 10)
    assert (figures["failed_events"], figures["queued_events"]) == (0, 0)
    assert_adds_up(figures)
    assert_broker_drained(broker)
    assert_still_processing(api.url)


# --- a worker killed while it sweeps for expired messages -------------------------------------


def sweep_lock_expiry(env: dict[str, str]) -> int:
    """Return how long a worker's broker channel keeps the sweep lock, as configured for it."""
    # A fresh process with the workers' environment, so it sees their settings.
    code = (
        "from tasks import celery_app\n"
        "with celery_app.connection_for_write() as conn:\n"
        "    print(conn.default_channel.unacked_mutex_expire)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return int(done.stdout)


def test_worker_killed_while_sweeping_does_not_stall_redelivery(
    api: Api,
    worker: Workers,
    broker: RedisServer,
    fault_env: dict[str, str],
    engine: Engine,
    clean: None,
) -> None:
    """kombu sweeps expired messages under a Redis lock (`unacked_mutex`).

    A worker SIGKILLed inside the sweep leaves that lock behind until it expires, and no
    worker restores anything before then. This sets the lock exactly as such a worker leaves
    it, with the expiry the workers are configured with, and kills a worker mid-batch: the
    batch must still be redelivered soon after the visibility timeout.
    """
    started = time.monotonic()
    current = worker.start()
    expiry = sweep_lock_expiry(fault_env)
    lock = TableLock(engine)
    try:
        response = requests.post(
            f"{api.url}/publish", json=[make_event(f"w-{i}") for i in range(50)], timeout=10
        )
        assert response.status_code == 202, response.text
        lock.wait_for_blocked_tasks(1)
        with redis.Redis.from_url(broker.url) as client:
            client.set("unacked_mutex", "token-of-a-killed-worker", px=expiry * 1000)
        current.kill_all()
    finally:
        lock.release()
    worker.start()
    deadline = int(fault_env["BROKER_VISIBILITY_TIMEOUT"]) + 15
    with contextlib.suppress(TimeoutError):
        wait_until(lambda: stats(api.url)["queued_events"] == 0, timeout=deadline)
    figures = stats(api.url)
    report(
        "worker-killed-while-sweeping",
        events_sent=50,
        acknowledged=50,
        lost=50 - figures["unique_processed_db"],
        double_counted=max(0, figures["total_received_queued"] - 50),
        duration_s=time.monotonic() - started,
        faults=1,
    )
    assert figures["queued_events"] == 0, (
        f"not redelivered within {deadline} s: the sweep lock a killed worker left behind"
        f" (unacked_mutex, {expiry} s) blocks every worker's sweep until it expires"
    )
    assert (figures["unique_processed_db"], figures["total_received_queued"]) == (50, 50)
    assert_broker_drained(broker)


# --- a worker killed between taking a message and recording it --------------------------------


def waiting_in_brpop(client: redis.Redis) -> bool:
    """Tell whether a worker's connection is blocked in BRPOP, waiting for the next message."""
    return any(c.get("cmd") == "brpop" and "b" in c.get("flags", "") for c in client.client_list())


def test_batch_taken_by_a_worker_killed_before_recording_it_is_not_lost(
    api: Api,
    worker: Workers,
    broker: RedisServer,
    fault_env: dict[str, str],
    engine: Engine,
    clean: None,
) -> None:
    """kombu takes a message off the queue with BRPOP, and only then records it as unacked.

    A worker killed in between (BRPOP answered, answer not handled yet) takes the message
    with it: it is neither on the queue nor in the unacked hash, so no sweep brings it back.
    Here the worker is frozen (SIGSTOP) while its BRPOP waits, a batch is published straight
    into that BRPOP, and the worker is killed: the batch must still be stored.
    """
    started = time.monotonic()
    current = worker.start()
    sent = 0
    with redis.Redis.from_url(broker.url) as client:
        for attempt in range(5):
            wait_until(lambda: waiting_in_brpop(client), timeout=10)
            os.kill(current.pid, signal.SIGSTOP)
            # BRPOP gives up after 1 s; only a freeze inside one catches the next message.
            if waiting_in_brpop(client):
                body = [make_event(f"b{attempt}-{i}") for i in range(50)]
                response = requests.post(f"{api.url}/publish", json=body, timeout=10)
                assert response.status_code == 202, response.text
                sent += len(body)
                if client.llen("celery") == 0:
                    break  # The frozen worker's BRPOP took it off the queue.
            os.kill(current.pid, signal.SIGCONT)
            wait_until(lambda: stats(api.url)["queued_events"] == 0, timeout=30)
        else:
            pytest.fail("the worker was never caught waiting in BRPOP")
        assert client.hlen("unacked") == 0  # Taken, and recorded nowhere.
    current.kill_all()
    worker.start()
    deadline = int(fault_env["BROKER_VISIBILITY_TIMEOUT"]) + 15
    with contextlib.suppress(TimeoutError):
        wait_until(lambda: stats(api.url)["queued_events"] == 0, timeout=deadline)
    figures = stats(api.url)
    report(
        "worker-killed-after-brpop",
        events_sent=sent,
        acknowledged=sent,
        lost=sent - figures["unique_processed_db"],
        double_counted=max(0, figures["total_received_queued"] - sent),
        duration_s=time.monotonic() - started,
        faults=1,
    )
    assert figures["queued_events"] == 0, (
        f"{figures['queued_events']} events answered 202 never stored: their message left the"
        " queue in the BRPOP answer of a worker killed before it recorded it in unacked"
    )
    assert (figures["unique_processed_db"], figures["total_received_queued"]) == (sent, sent)
    assert_broker_drained(broker)
