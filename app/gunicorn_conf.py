"""Gunicorn settings; the repository's gunicorn.conf.py loads them for the plain command."""

import os
import tempfile

from prometheus_client import multiprocess

from app.metric_files import file_id

bind = os.environ.get("GUNICORN_BIND", "127.0.0.1:8080")
# One gevent process per core serves many connections; 2 suits the 2-core
# machine the benchmarks run on (more processes only split group commits).
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
# gevent: each connection is a greenlet, so idle or slow clients cost no thread,
# concurrent small requests meet in group commit (tasks/acceptance.py), and a process
# does not spend its CPU on threads fighting for the GIL (gthread x16 cost ~1.8x
# the CPU per request on two cores; see docs/performance.md).
worker_class = os.environ.get("GUNICORN_WORKER_CLASS", "gevent")
worker_connections = int(os.environ.get("GUNICORN_WORKER_CONNECTIONS", "1000"))
# Only for GUNICORN_WORKER_CLASS=gthread.
threads = int(os.environ.get("GUNICORN_THREADS", "16"))
# Never preload: the app factory must run after the fork (one engine per process).
preload_app = False
timeout = 30
graceful_timeout = 10
keepalive = 5
accesslog = os.environ.get("GUNICORN_ACCESS_LOG", "-") or None
errorlog = "-"
# JSON lines for the error and access logs, like every other log line (app/logs.py);
# the level comes from LOG_LEVEL.
logger_class = "app.logs.GunicornLogger"
control_socket_disable = True

# Metrics of all workers add up only through a shared directory; make one if
# none was given. Set here, in the master, so every worker inherits it.
if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="aggregator-metrics-")


def post_worker_init(worker: object) -> None:
    """Under gevent, let psycopg2 wait for the database cooperatively.

    libpq blocks in C otherwise: one slow query (a /stats during an outage)
    would stall every connection the process serves.
    """
    if "gevent" in worker_class:
        from psycogreen.gevent import patch_psycopg

        patch_psycopg()


def child_exit(server: object, worker: object) -> None:
    """Fold a finished worker's live gauges out of /metrics."""
    # Its files are named after host and pid (app.metric_files), not the pid alone.
    multiprocess.mark_process_dead(file_id(worker.pid))  # type: ignore[attr-defined]
