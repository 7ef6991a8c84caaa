"""Gunicorn settings; the repository's gunicorn.conf.py loads them for the plain command."""

import os
import tempfile
import time
from http import HTTPStatus
from typing import Any

import orjson
from gunicorn import util
from gunicorn.http import parser
from prometheus_client import multiprocess

from app.config import load_server_settings
from app.config import metrics_directory
from app.metric_files import file_id

_server = load_server_settings()
bind = _server.bind
# One gevent process per core serves many connections; 2 suits the 2-core
# machine the benchmarks run on (more processes only split group commits).
workers = _server.workers
# gevent: each connection is a greenlet, so idle or slow clients cost no thread,
# concurrent small requests meet in group commit (tasks/acceptance.py), and a process
# does not spend its CPU on threads fighting for the GIL (gthread x16 cost ~1.8x
# the CPU per request on two cores; see docs/performance.md).
worker_class = _server.worker_class
worker_connections = _server.worker_connections
# Only for GUNICORN_WORKER_CLASS=gthread.
threads = _server.threads
# Never preload: the app factory must run after the fork (one engine per process).
preload_app = False
timeout = 30
graceful_timeout = 10
keepalive = 5
accesslog = _server.access_log
errorlog = "-"
# JSON lines for the error and access logs, like every other log line (app/logs.py);
# the level comes from LOG_LEVEL.
logger_class = "app.logs.GunicornLogger"
control_socket_disable = True

# Metrics of all workers add up only through a shared directory; make one if
# none was given. Set here, in the master, so every worker (and prometheus_client
# in it) inherits it: the one place that writes the environment.
if metrics_directory() is None:
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


def write_json_error(sock: Any, status_int: int, reason: str, mesg: str) -> None:
    """Answer what gunicorn refuses itself (414, 431, 400 ...) in the API's one JSON shape."""
    try:
        status = HTTPStatus(status_int).phrase
    except ValueError:
        status = reason
    body = orjson.dumps({"code": status_int, "status": status, "message": mesg or reason})
    head = (
        f"HTTP/1.1 {status_int} {reason}\r\n"
        "Connection: close\r\n"
        "Content-Type: application/json\r\n"
        "X-Content-Type-Options: nosniff\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    util.write_nonblock(sock, head.encode("latin-1") + body)


# gunicorn's workers call util.write_error for requests they refuse before the
# app sees them (a request line over limit_request_line, too many headers, a bad
# chunk); its answer is an HTML page. Replaced here, in the master, so every
# worker inherits it.
util.write_error = write_json_error


# Before reading the next request on a keep-alive connection, gunicorn discards
# what the app left unread of the last body. Its gthread worker bounds that
# (64 KiB, then the connection closes); its gevent worker reads the rest of
# the body, however large, 1 KiB per step: every publish refused before its
# body was read (401, 429, 503 for want of a slot) cost up to MAX_BODY_BYTES of that.
# Bounded here as gthread does it: 64 KiB (gunicorn's cap) within DRAIN_SECONDS, then the
# connection closes, so a sender still writing such a body may meet a reset first.
DRAIN_SECONDS = 2.0
_drain_unbounded = parser.Parser.finish_body


def _drain_bounded(self: Any, deadline: float | None = None, max_bytes: int | None = None) -> bool:
    if deadline is None:
        deadline = time.monotonic() + DRAIN_SECONDS
    return bool(_drain_unbounded(self, deadline, max_bytes))


parser.Parser.finish_body = _drain_bounded
