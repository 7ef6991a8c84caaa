"""Prometheus instruments that the API and the workers update; no Flask, so workers can import it.

Processes write to PROMETHEUS_MULTIPROC_DIR, in files named after host and pid
(app.metric_files), so /metrics (app.metrics) adds up every gunicorn worker and
every Celery process sharing the directory, across containers too.
"""

from __future__ import annotations

from prometheus_client import Counter
from prometheus_client import Histogram

from app import metric_files

# Every series of the aggregator starts so; dashboards and alerts rely on it.
PREFIX = "aggregator_"

# Before the first metric below is created: it decides where their values live.
metric_files.install()

REQUESTS = Counter(
    "aggregator_http_requests_total", "HTTP requests answered.", ["endpoint", "method", "status"]
)
LATENCY = Histogram(
    "aggregator_http_request_duration_seconds",
    "Time to answer an HTTP request.",
    ["endpoint"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
ACCEPTED = Counter("aggregator_events_accepted_total", "Events answered 202 by /publish.")
REPLAYS = Counter(
    "aggregator_idempotent_replays_total",
    "Publish requests answered from an earlier acceptance with the same Idempotency-Key.",
)
TASK_EVENTS = Histogram(
    "aggregator_task_events",
    "Events per task put on the broker.",
    buckets=(1, 2, 5, 10, 25, 50, 100, 250, 500, 1000),
)
TASK_DURATION = Histogram(
    "aggregator_task_duration_seconds",
    "Time a worker spent storing one batch (transaction included).",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
TASK_OUTCOMES = Counter(
    "aggregator_worker_events_total", "Events handled by workers, by outcome.", ["outcome"]
)
