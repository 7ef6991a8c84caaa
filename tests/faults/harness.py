"""The fault suite's harness: a publisher run that keeps every answer, workers, and the checks.

Each scenario publishes events with duplicates while a fault happens, waits until the system
settles and checks: every event answered 202 is stored exactly once, nothing never sent is
stored, /stats matches what was sent (within the publisher's `ambiguous` tolerance: only requests
that never got their 202), the broker holds no message, and a fresh batch is still processed
promptly. When RELIABILITY_REPORT names a file, each scenario appends one JSON line to it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from typing import Self

import orjson
import redis
import requests
from mirakuru.exceptions import ProcessFinishedWithError
from sqlalchemy import Engine
from sqlalchemy import func
from sqlalchemy import select

from aggregator_client.client import Client
from aggregator_client.events import batched
from aggregator_client.events import event_key
from aggregator_client.events import plan_events
from aggregator_client.events import run_prefix
from aggregator_client.events import run_topics
from aggregator_client.outcomes import PublishSummary
from aggregator_client.outcomes import RequestOutcome
from aggregator_client.outcomes import summarize
from aggregator_client.verify import VerifyResult
from aggregator_client.verify import wait_and_verify
from app.db import batches
from app.db import events
from app.db import pruned_batches
from scripts.services import LOOPBACK
from scripts.services import Place
from scripts.services import RedisServer
from scripts.stack import Api
from scripts.stack import Worker
from scripts.stack import alive
from scripts.stack import wait_until
from tasks.pending import PENDING_KEY
from tests.helpers import assert_adds_up
from tests.helpers import make_event
from tests.helpers import stats

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
    **measured: float | int | str,
) -> None:
    """Append this scenario's numbers as one JSON line to $RELIABILITY_REPORT, when it is set.

    `measured` adds what a scenario measures beyond the common fields (seconds to
    detect or recover, the most messages seen on the broker, ...).
    """
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
        **measured,
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
    """The client's own request path (plan_events, Client.publish_batch, summarize) in a thread.

    Client.publish returns counts only; the invariants need the keys each answer
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
        self.client = Client(url, timeout=timeout, max_retries=max_retries, concurrency=concurrency)
        self.concurrency = concurrency
        self.topics = run_topics(run_prefix(), 3)
        self.spread = spread
        self.events = plan_events(count, 0.1, self.topics, "publisher")
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

    def _send(self, index: int) -> None:
        due = self._started + index * self.spread / len(self.batches)
        if self._cancel.wait(max(0.0, due - time.monotonic())):
            return
        started = time.monotonic()
        outcome = self.client.publish_batch(self.batches[index])
        with self._lock:
            self.sent.append(Sent(started, time.monotonic(), outcome))

    def _run(self) -> None:
        try:
            with ThreadPoolExecutor(self.concurrency) as executor:
                futures = [executor.submit(self._send, index) for index in range(len(self.batches))]
                for future in futures:
                    future.result()
        except BaseException as exc:  # Re-raised in the test by wait().
            self._error = exc
        finally:
            self.client.close()
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
        return summarize(len(self.events), outcomes, self._elapsed, self.topics)

    def accepted_keys(self) -> set[Key]:
        return {event_key(e) for s in self.sent if s.outcome.accepted for e in s.outcome.events}

    def maybe_sent_keys(self) -> set[Key]:
        """Keys of failed requests that may still have reached the API (ambiguous attempts)."""
        return {
            event_key(e)
            for s in self.sent
            if s.outcome.possible_extra_acceptances
            for e in s.outcome.events
        }


# --- workers ------------------------------------------------------------------------------


class Workers:
    """The Celery workers of one test, sharing one log; every one started is cleaned up."""

    def __init__(
        self, env: dict[str, str], log: Path, concurrency: int = 2, place: Place = LOOPBACK
    ) -> None:
        self.env = env
        self.log = log
        self.concurrency = concurrency
        self.place = place
        self.started: list[Worker] = []
        self._offset = log.stat().st_size if log.exists() else 0

    @property
    def current(self) -> Worker:
        return self.started[-1]

    def start(self, **overrides: str) -> Worker:
        """Start one more worker; `overrides` add to (or replace) the test's environment."""
        env = {**self.env, **overrides}
        worker = Worker(
            env, self.log, concurrency=self.concurrency, name="fault", place=self.place
        ).start()
        self.started.append(worker)
        return worker

    def output(self) -> str:
        """Return what this test's workers have logged."""
        with open(self.log, "rb") as handle:
            handle.seek(self._offset)
            return handle.read().decode(errors="replace")

    def recent(self, lines: int = 30) -> str:
        """The last lines these workers logged, one short line each (for a failure message)."""
        shown = []
        for line in self.output().splitlines()[-lines:]:
            try:
                record = orjson.loads(line)
            except orjson.JSONDecodeError:
                shown.append(line[:160])
                continue
            shown.append(
                f"{record.get('time', '')[11:23]} {record.get('level', '')} "
                f"{record.get('logger', '')}: {str(record.get('message', ''))[:140]}"
            )
        return "\n".join(shown)

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


# --- checks ---------------------------------------------------------------------------------


def ledger(engine: Engine) -> tuple[int, int]:
    """Return the number of processed batches and the events they received (pruned ones too)."""
    with engine.connect() as conn:
        rows, received = conn.execute(
            select(func.count(), func.coalesce(func.sum(batches.c.received), 0))
        ).one()
        pruned_rows, pruned_received = conn.execute(
            select(
                func.coalesce(func.sum(pruned_batches.c.batches), 0),
                func.coalesce(func.sum(pruned_batches.c.received), 0),
            )
        ).one()
    return rows + int(pruned_rows), received + int(pruned_received)


def ledger_ids(engine: Engine) -> set[str]:
    with engine.connect() as conn:
        return set(conn.execute(select(batches.c.batch_id)).scalars())


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
        # Workers forget a batch's pending mark after commit (or their sweep does later).
        wait_until(
            lambda: (
                client.llen("celery") == 0
                and client.hlen("unacked") == 0
                and client.hlen(PENDING_KEY) == 0
            ),
            timeout=30,
        )


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
    with Client(api.url) as client:
        result = wait_and_verify(client, summary, timeout=settle, poll=0.2)
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
    assert (figures["failed_events"], figures["queued_events"]) == (0, 0), figures
    assert summary.sent <= figures["total_received_queued"] <= summary.sent + summary.ambiguous
    # Only this run's events are in the database, each once, and the counters say so.
    assert figures["unique_processed_db"] == len(stored) == event_count(engine)
    batch_rows, received = ledger(engine)
    assert received == figures["total_received_queued"]
    # Every batch a 202 named is in the ledger; others only where an answer was lost.
    answered = {s.outcome.batch_id for s in run.sent if s.outcome.accepted}
    maybe = sum(s.outcome.possible_extra_acceptances for s in run.sent)
    assert None not in answered
    assert answered <= ledger_ids(engine)
    assert len(answered) <= batch_rows <= len(answered) + maybe
    assert_broker_drained(broker)


def kill_and_wait(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not alive(pid), timeout=10)


def fatal_lines(workers: Workers) -> list[str]:
    """Return the lines where a worker gave up (Celery logs those as CRITICAL)."""
    return [line for line in workers.output().splitlines() if "CRITICAL" in line]


@dataclass(frozen=True)
class Probe:
    """One POST /publish while the broker is down: how it was answered, and how fast."""

    status: int
    latency: float
    retry_after: str | None
    body: dict[str, Any]


def probe_publish(url: str, event: dict[str, Any]) -> Probe:
    """POST one event and time the answer (the test judges the latency, not a client timeout)."""
    started = time.perf_counter()
    response = requests.post(f"{url}/publish", json=event, timeout=10)
    latency = time.perf_counter() - started
    return Probe(
        response.status_code, latency, response.headers.get("Retry-After"), response.json()
    )
