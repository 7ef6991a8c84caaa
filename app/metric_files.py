"""Names of the files processes write their metrics to, in the directory they share.

prometheus_client names a process's files after its pid (counter_7.db). Containers
sharing one directory (compose's metrics volume) each count pids from 1, and two
processes mapping one file overwrite each other's counts. Naming the files after
host and pid (counter_<host>-7.db) keeps each process to its own files, while the
API's MultiProcessCollector still adds up the one flat directory.
"""

from __future__ import annotations

import os

from prometheus_client import values

from app.config import load_metrics_instance
from app.config import metrics_directory

INSTANCE = load_metrics_instance()


def file_id(pid: int | None = None) -> str:
    """Return what names a process's metric files: `<instance>-<pid>`, this process's by default."""
    return f"{INSTANCE}-{os.getpid() if pid is None else pid}"


def install() -> None:
    """Make every metric created from now on write to files named by file_id.

    Only in multiprocess mode. Decided here rather than by prometheus_client's own
    choice at import: gunicorn's master imports it before app/gunicorn_conf.py sets
    PROMETHEUS_MULTIPROC_DIR, and its workers would inherit in-memory values that
    /metrics (reading the directory) never shows.
    """
    if metrics_directory() is not None:
        values.ValueClass = values.MultiProcessValue(file_id)
