"""GET /metrics: request timing, the instruments' series and exact counters read at scrape time.

The instruments (app.instruments) live in files every process shares, and
/metrics adds them up; it shows only the aggregator_* series: anything else in
the directory is some library's.
"""

from __future__ import annotations

import importlib.metadata
import time
from collections.abc import Iterator
from typing import Protocol

import redis
from flask import Flask
from flask import Response
from flask import g
from flask import request
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client import REGISTRY
from prometheus_client import CollectorRegistry
from prometheus_client import generate_latest
from prometheus_client import multiprocess
from prometheus_client.core import CounterMetricFamily
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.core import Metric
from prometheus_client.registry import Collector
from sqlalchemy import Engine
from sqlalchemy.exc import InterfaceError
from sqlalchemy.exc import OperationalError

from app.broker_log import loss_summary
from app.config import metrics_directory
from app.instruments import LATENCY
from app.instruments import PREFIX
from app.instruments import REQUESTS
from app.store.counters import read_totals
from app.store.dead_letters import replay_counts
from app.store.ledger import log_lock_age

DATABASE_ERRORS = (OperationalError, InterfaceError)


class QueueDepth(Protocol):
    """Messages on the broker by state, and batches accepted but not stored."""

    @property
    def ready(self) -> int: ...

    @property
    def unacked(self) -> int: ...

    @property
    def pending(self) -> int: ...


class BrokerMemory(Protocol):
    """Redis's memory and evictions, and what the broker's budgets hold."""

    @property
    def used_bytes(self) -> int: ...

    @property
    def max_bytes(self) -> int: ...

    @property
    def policy(self) -> str: ...

    @property
    def evicted_keys(self) -> int: ...

    @property
    def backlog_bytes(self) -> int: ...

    @property
    def idempotency_records(self) -> int: ...


class QueueReadings(Protocol):
    """What /metrics reads from the broker: tasks.acceptance.Intake, which the app holds."""

    def depth(self) -> QueueDepth: ...

    def backlog_age(self) -> float: ...

    def persistence(self) -> str: ...

    def memory(self) -> BrokerMemory: ...

    def budgets(self) -> tuple[int, int]: ...


class ScrapeTimeCollector(Collector):
    """Exact counters from the ledger and the queue depth from Redis, read at scrape time."""

    def __init__(self, engine: Engine, queue: QueueReadings) -> None:
        self._engine = engine
        self._queue = queue

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        # Each source on its own: the broker's backlog matters most exactly while
        # the database is down, so one source failing must not fail the scrape.
        yield build_info()
        up = GaugeMetricFamily(
            "aggregator_dependency_up", "Whether a scrape could read it.", labels=["dependency"]
        )
        try:
            yield from self._from_database()
            up.add_metric(["database"], 1)
        except DATABASE_ERRORS:
            up.add_metric(["database"], 0)
        try:
            yield from self._from_broker()
            up.add_metric(["broker"], 1)
        except redis.RedisError:
            up.add_metric(["broker"], 0)
        yield up

    def _from_database(self) -> list[GaugeMetricFamily | CounterMetricFamily]:
        with self._engine.connect() as conn:
            totals = read_totals(conn)
            replays = replay_counts(conn)
            losses = loss_summary(conn)
            lock_age = log_lock_age(conn)
        # By each event's first outcome, so every series only grows (a replay
        # moves an event from failed to stored in /stats, which a counter must
        # not show as failed going down) and sum() is what was processed.
        events = CounterMetricFamily(
            "aggregator_events",
            "Events processed, by first outcome (exact, from the ledger; disjoint;"
            " replays of failed events are aggregator_dead_letter_replays_total).",
            labels=["outcome"],
        )
        for outcome, total in (
            ("stored", totals.stored - replays["stored"]),
            ("duplicate", totals.duplicates - replays["duplicate"]),
            ("failed", totals.failed + replays["stored"] + replays["duplicate"]),
        ):
            events.add_metric([outcome], total)
        replayed = CounterMetricFamily(
            "aggregator_dead_letter_replays",
            "Failed events replayed, by what the replay did (stored, duplicate).",
            labels=["result"],
        )
        for result, count in replays.items():
            replayed.add_metric([result], count)
        lost = CounterMetricFamily(
            "aggregator_broker_data_loss",
            "Losses of broker data detected (flushed, replaced, or restored from an older copy).",
        )
        lost.add_metric([], losses["detected"])
        unacknowledged = GaugeMetricFamily(
            "aggregator_broker_data_loss_unacknowledged",
            "Detected losses of broker data not yet acknowledged by an operator.",
        )
        unacknowledged.add_metric([], losses["unacknowledged"])
        held = GaugeMetricFamily(
            "aggregator_log_lock_held_seconds",
            "How long the transaction holding the log's write lock has been open (0 when"
            " free); every store waits behind it.",
        )
        held.add_metric([], lock_age)
        return [events, replayed, lost, unacknowledged, held]

    def _from_broker(self) -> list[GaugeMetricFamily | CounterMetricFamily]:
        figures = self._queue.depth()
        queue = GaugeMetricFamily(
            "aggregator_broker_messages", "Messages on the broker, by state.", labels=["state"]
        )
        queue.add_metric(["ready"], figures.ready)
        queue.add_metric(["unacked"], figures.unacked)
        marks = GaugeMetricFamily("aggregator_pending_batches", "Batches accepted, not stored.")
        marks.add_metric([], figures.pending)
        mode = GaugeMetricFamily(
            "aggregator_broker_persistence",
            "What a 202 survives: 1 for the broker's AOF fsync policy"
            " (always, everysec: up to one second lost on a crash, none, unknown).",
            labels=["appendfsync"],
        )
        mode.add_metric([self._queue.persistence()], 1)
        lag = GaugeMetricFamily(
            "aggregator_backlog_age_seconds",
            "Age of the oldest batch accepted (202) and not yet stored: the pipeline's lag.",
        )
        lag.add_metric([], self._queue.backlog_age())
        return [queue, marks, mode, lag, *self._memory()]

    def _memory(self) -> list[GaugeMetricFamily | CounterMetricFamily]:
        memory = self._queue.memory()
        max_backlog, max_records = self._queue.budgets()
        used = GaugeMetricFamily(
            "aggregator_broker_memory_bytes",
            "Redis's memory: used, and its maxmemory (0: none).",
            labels=["kind"],
        )
        used.add_metric(["used"], memory.used_bytes)
        used.add_metric(["max"], memory.max_bytes)
        evicted = CounterMetricFamily(
            "aggregator_broker_evicted_keys",
            "Keys Redis evicted since it started (none of ours can be: any is a misconfiguration).",
            labels=["policy"],
        )
        evicted.add_metric([memory.policy], memory.evicted_keys)
        budgets = GaugeMetricFamily(
            "aggregator_broker_budget",
            "What the broker's budgets hold, and their limits (503 when one is spent).",
            labels=["budget", "kind"],
        )
        budgets.add_metric(["backlog_bytes", "used"], memory.backlog_bytes)
        budgets.add_metric(["backlog_bytes", "max"], max_backlog)
        budgets.add_metric(["idempotency_records", "used"], memory.idempotency_records)
        budgets.add_metric(["idempotency_records", "max"], max_records)
        return [used, evicted, budgets]


def build_info() -> GaugeMetricFamily:
    """aggregator_build_info{version} 1, so dashboards can tell deployments apart."""
    try:
        version = importlib.metadata.version("log-aggregator")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    info = GaugeMetricFamily(
        "aggregator_build_info", "The running version (always 1).", labels=["version"]
    )
    info.add_metric([version], 1)
    return info


class OwnSeries(Collector):
    """The aggregator_* families of a source, and nothing else.

    Whatever else writes to the shared directory (Flower's flower_* series, when
    it is given the directory) or sits in the default registry (process_*,
    python_*) is not the aggregator's to expose.
    """

    def __init__(self, source: Collector) -> None:
        self._source = source

    def collect(self) -> Iterator[Metric]:
        return (family for family in self._source.collect() if family.name.startswith(PREFIX))


def _source() -> Collector:
    if metrics_directory() is not None:
        return multiprocess.MultiProcessCollector(None)
    return REGISTRY


# Label values must come from a fixed set: any other method a client sends
# would otherwise add a series (2,000 made-up methods made 2,000 series).
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def method_label(method: str) -> str:
    """Return the method, or "other" for anything outside the standard set."""
    return method if method in METHODS else "other"


def init_metrics(app: Flask) -> None:
    """Time every request and serve GET /metrics (after app.api.attach_queue)."""
    # On the probe's connections: a scrape must not wait behind busy readers.
    exact = ScrapeTimeCollector(app.extensions["probe_engine"], app.extensions["intake"])

    @app.before_request
    def _start_timer() -> None:
        g.started = time.perf_counter()

    @app.after_request
    def _observe(response: Response) -> Response:
        endpoint = request.endpoint or "unmatched"
        if "started" in g:
            LATENCY.labels(endpoint).observe(time.perf_counter() - g.started)
        REQUESTS.labels(endpoint, method_label(request.method), str(response.status_code)).inc()
        return response

    @app.get("/metrics")
    def metrics() -> Response:
        """Expose metrics in the Prometheus text format."""
        registry = CollectorRegistry(auto_describe=False)
        registry.register(OwnSeries(_source()))
        registry.register(exact)
        return Response(generate_latest(registry), mimetype=CONTENT_TYPE_LATEST)
