r"""Locust load test: single and batched publishes with a known share of duplicates.

Always bounded, headless, with the host given (the API must already run):

    locust -f locustfile.py --headless -u 50 -r 10 -t 30s --stop-timeout 10 \
        --host http://127.0.0.1:8080 --csv reports/locust --html reports/locust.html

(--stop-timeout lets each user finish its request in flight; a request killed after
the server accepted it would be stored but missing from the tally.)
Or let `python -m bench.loadtest` start a stack of its own and run exactly that.

Only a 202 counts as a success. Every DUPLICATE_EVERY-th event a user publishes re-sends
an event that user already had accepted, so once users are warmed up about 1 in
DUPLICATE_EVERY (10%) of the events are duplicates; the tally counts them exactly.
Topics carry a per-run prefix, so this run's counters can be told apart in GET /stats/topics.
At the end the tally of events answered 202 is logged; with LOCUST_VERIFY=1 the
listener then polls GET /stats/topics until the run's topics are drained and compares
stored and duplicates with the tally (exit code 1 on a mismatch).

Environment: API_TOKEN (bearer token, optional), LOCUST_RUN_ID (topic prefix; default
random per process), LOCUST_VERIFY=1, LOCUST_VERIFY_TIMEOUT (seconds, default 120).
Verification needs the single-process runner: each process keeps its own tally.
"""

from __future__ import annotations

import logging
import os
import random
import time
import uuid
from collections.abc import Callable
from datetime import UTC
from datetime import datetime
from typing import Any

from locust import User
from locust import between
from locust import events
from locust import task
from locust.env import Environment
from locust.runners import MasterRunner

from aggregator_client.client import Client
from aggregator_client.client import ClientError
from aggregator_client.outcomes import RequestOutcome

RUN_ID = os.environ.get("LOCUST_RUN_ID") or f"locust-{uuid.uuid4().hex[:8]}"
TOPICS = tuple(f"{RUN_ID}.{name}" for name in ("orders", "payments", "auth", "audit"))
DUPLICATE_EVERY = 10
BATCH_SIZE = 100
# Events kept per user as candidates for re-sending; bounds memory on long runs.
POOL_SIZE = 1000
# Retries of a request (429, 502-504 or a lost connection), with its Idempotency-Key.
RETRIES = 3

logger = logging.getLogger(__name__)


class Tally:
    """Events this process had answered 202: every copy, and distinct (topic, event_id)."""

    def __init__(self) -> None:
        self.total = 0
        self.keys: set[tuple[str, str]] = set()
        self.failed_requests = 0

    def accept(self, batch: list[dict[str, Any]]) -> None:
        """Count events the API accepted."""
        self.total += len(batch)
        self.keys.update((event["topic"], event["event_id"]) for event in batch)

    @property
    def unique(self) -> int:
        return len(self.keys)

    @property
    def duplicates(self) -> int:
        return self.total - self.unique


TALLY = Tally()


class ApiUser(User):
    """A user with its own aggregator_client Client: the same client the CLI and tests use."""

    abstract = True

    def on_start(self) -> None:
        token = os.environ.get("API_TOKEN") or None
        self.api = Client(self.host or "", token, max_retries=RETRIES, concurrency=1)

    def on_stop(self) -> None:
        self.api.close()

    def record(self, kind: str, name: str, seconds: float, error: str | None) -> None:
        """Report one request to Locust's statistics."""
        self.environment.events.request.fire(
            request_type=kind,
            name=name,
            response_time=seconds * 1000,
            response_length=0,
            exception=Exception(error) if error else None,
            context={},
        )

    def timed(self, name: str, call: Callable[[], Any]) -> None:
        """Run one read through the client and report its time and any error."""
        started = time.perf_counter()
        error = None
        try:
            call()
        except ClientError as exc:
            error = str(exc)
        self.record("GET", name, time.perf_counter() - started, error)


class Publisher(ApiUser):
    """Base for publishing users: builds events, re-sends some, counts only 202s."""

    abstract = True

    def on_start(self) -> None:
        super().on_start()
        self.sent = 0
        self.pool: list[dict[str, Any]] = []

    def next_event(self) -> dict[str, Any]:
        """Return a new event, or every DUPLICATE_EVERY-th time one already accepted."""
        self.sent += 1
        if self.sent % DUPLICATE_EVERY == 0 and self.pool:
            return random.choice(self.pool)
        return {
            "topic": random.choice(TOPICS),
            "event_id": str(uuid.uuid4()),
            "timestamp": datetime.now(UTC).isoformat(),
            "source": "locust",
            "payload": {"n": self.sent, "level": random.choice(("info", "warn", "error"))},
        }

    def publish(self, batch: list[dict[str, Any]], name: str) -> None:
        """Publish through the client and tally the batch only when the API answers 202.

        The client retries 429, 502-504 and lost connections (after any Retry-After)
        with the same Idempotency-Key, so a request accepted although its answer was
        lost counts once.
        The time reported is the whole request, retries included.
        """
        outcome = self.api.publish_batch(batch, as_object=len(batch) == 1)
        self.record("POST", name, outcome.latency, outcome.error)
        self._settle(outcome)

    def _settle(self, outcome: RequestOutcome) -> None:
        if not outcome.accepted:
            TALLY.failed_requests += 1
            return
        TALLY.accept(outcome.events)
        # Only accepted events may be re-sent: a re-send of a rejected one is no duplicate.
        self.pool.extend(outcome.events[: POOL_SIZE - len(self.pool)])


class SingleEventPublisher(Publisher):
    """Publishes one event object per request."""

    weight = 5
    wait_time = between(0.05, 0.2)

    @task
    def publish_one(self) -> None:
        self.publish([self.next_event()], name="/publish [1 event]")


class BatchPublisher(Publisher):
    """Publishes arrays of BATCH_SIZE events per request."""

    weight = 5
    wait_time = between(0.2, 0.5)

    @task
    def publish_batch(self) -> None:
        # A batch never holds the same event twice: duplicates come from earlier batches.
        batch: list[dict[str, Any]] = []
        seen: set[str] = set()
        while len(batch) < BATCH_SIZE:
            event = self.next_event()
            if event["event_id"] not in seen:
                seen.add(event["event_id"])
                batch.append(event)
        self.publish(batch, name=f"/publish [{BATCH_SIZE} events]")


class Reader(ApiUser):
    """Reads back this run's events and the counters now and then."""

    weight = 1
    wait_time = between(1, 2)

    @task(3)
    def read_events(self) -> None:
        pages = self.api.pages(topic=random.choice(TOPICS), limit=50)
        self.timed("/events?topic=[run]", lambda: next(pages))

    @task(1)
    def read_stats(self) -> None:
        self.timed("/stats", self.api.stats)


def run_counters(client: Client) -> dict[str, int]:
    """Sum stored, duplicates and failed over this run's topics from GET /stats/topics."""
    topics = {row["topic"]: row for row in client.topic_stats(f"{RUN_ID}.")}
    sums = {"stored": 0, "duplicates": 0, "failed": 0}
    for topic in TOPICS:
        for key in sums:
            sums[key] += topics.get(topic, {}).get(key, 0)
    return sums


def verify(environment: Environment) -> bool:
    """Poll /stats/topics until every accepted event is counted, then compare with the tally."""
    timeout = float(os.environ.get("LOCUST_VERIFY_TIMEOUT", "120"))
    deadline = time.monotonic() + timeout
    counters: dict[str, int] = {}
    client = Client(environment.host or "", os.environ.get("API_TOKEN") or None, max_retries=3)
    while True:
        try:
            counters = run_counters(client)
        except ClientError as exc:
            logger.warning("verify: GET /stats failed: %s", exc)
        if counters and sum(counters.values()) >= TALLY.total:
            break
        if time.monotonic() >= deadline:
            logger.error("verify: gave up after %.0f s waiting for the queue to drain", timeout)
            break
        time.sleep(0.5)
    client.close()
    expected = {"stored": TALLY.unique, "duplicates": TALLY.duplicates, "failed": 0}
    ok = counters == expected
    log = logger.info if ok else logger.error
    verdict = "OK" if ok else "MISMATCH"
    log("verify: run %s expected %s, /stats has %s: %s", RUN_ID, expected, counters, verdict)
    if not ok and TALLY.failed_requests:
        # A request that failed after its batch was queued (a timeout, say) is stored
        # but not in the tally, so failures make an exact match impossible to promise.
        logger.error("verify: %d publish requests failed", TALLY.failed_requests)
    return ok


@events.test_stop.add_listener
def report(environment: Environment, **_: Any) -> None:
    """Print the tally and, with LOCUST_VERIFY=1, check it against GET /stats."""
    if isinstance(environment.runner, MasterRunner):
        return  # The workers hold the tallies.
    logger.info(
        "tally: run %s had %d events answered 202, %d unique, %d duplicates",
        RUN_ID,
        TALLY.total,
        TALLY.unique,
        TALLY.duplicates,
    )
    if os.environ.get("LOCUST_VERIFY") == "1" and not verify(environment):
        environment.process_exit_code = 1
