"""The Celery application and the per-process database engine and Redis client of its workers."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import redis
from celery import Celery
from celery import bootsteps
from celery.signals import celeryd_after_setup
from celery.signals import celeryd_init
from celery.signals import setup_logging
from celery.signals import task_prerun
from celery.signals import worker_process_init
from celery.signals import worker_ready
from celery.signals import worker_shutting_down
from sqlalchemy import Engine
from structlog.contextvars import bind_contextvars
from structlog.contextvars import clear_contextvars

from app.config import load_log_level
from app.config import load_settings
from app.db import make_engine
from app.logs import configure_logging
from app.redis_client import make_redis
from tasks.pending import Scripts

celery_app = Celery("tasks", include=["tasks.ingest", "tasks.retention"])
celery_app.config_from_object("celery_config")

# How often a worker touches WORKER_LIVENESS_FILE; a healthcheck allows several misses.
LIVENESS_INTERVAL = 5.0

logger = logging.getLogger(__name__)

_engine: Engine | None = None
_redis: redis.Redis | None = None
_scripts: Scripts | None = None


# Celery's setup_logging signal: when anyone handles it, Celery installs none of
# its text handlers (and leaves stdout alone). celeryd_init comes earlier, before
# the worker's first warnings; LOG_LEVEL decides, not --loglevel.
@celeryd_init.connect
@setup_logging.connect
def _log_json(**_: object) -> None:
    """Log JSON lines (app.logs) in the worker and its pool processes."""
    configure_logging(load_log_level())


@celeryd_after_setup.connect
def _no_banner(sender: str, instance: Any, **_: object) -> None:
    """Say the worker is starting in one log line instead of the text banner."""
    # The banner is printed, not logged; quiet is what --quiet sets.
    instance.quiet = True
    logger.info(
        "%s starting", sender, extra={"hostname": sender, "concurrency": instance.concurrency}
    )


@worker_ready.connect
def _quiet_shutdown(sender: Any, **_: object) -> None:
    """Replace Celery's SIGTERM handler with the same one minus its printed text line."""
    # Installed just before the worker is ready; _log_shutdown says it instead.
    # Imported here: the API imports this package too and has no use for it.
    from celery.apps.worker import install_worker_term_handler

    install_worker_term_handler(sender.controller, verbose=False)


@worker_shutting_down.connect
def _log_shutdown(sender: str, sig: str, how: str, **_: object) -> None:
    logger.info("%s: %s shutdown (%s)", sender, how, sig, extra={"signal": sig})


@task_prerun.connect
def _task_context(task_id: str, task: Any, **_: object) -> None:
    """Tag every line a task logs with its id and name (and nothing of the task before)."""
    clear_contextvars()
    bind_contextvars(task_id=task_id, task=task.name)


@worker_process_init.connect
def _reset_after_fork(**_: object) -> None:
    """Give each prefork child its own engine; pooled connections never cross a fork."""
    global _engine, _redis, _scripts
    _engine = None
    _redis = None
    _scripts = None


def get_engine() -> Engine:
    """Return this process's engine, creating it on first use (after any fork)."""
    global _engine
    if _engine is None:
        settings = load_settings()
        _engine = make_engine(
            settings.database_url,
            pool_size=2,
            timeouts=settings.db_timeouts("worker"),
            network=settings.db_network,
        )
    return _engine


def get_redis() -> redis.Redis:
    """Return this process's Redis client for the accepted-batches bookkeeping."""
    global _redis
    if _redis is None:
        _redis = make_redis(load_settings())
    return _redis


def get_scripts() -> Scripts:
    """Return this process's Lua scripts on its Redis client (registered once, not per task)."""
    global _scripts
    if _scripts is None:
        _scripts = Scripts(get_redis())
    return _scripts


@worker_ready.connect
def _start_main_process_threads(**_: object) -> None:
    """In the worker's main process: leases, the primary watch (with Sentinels), the resend
    sweep and the broker watchdog."""
    from tasks.broker import start_leases
    from tasks.broker import start_primary_watch
    from tasks.broker_state import Watchdog
    from tasks.broker_state import broker_name
    from tasks.resend import start_sweeper

    settings = load_settings()
    start_leases(get_redis(), settings.visibility_timeout / 3)
    start_primary_watch(get_redis(), settings.broker_check_interval)
    start_sweeper(get_engine(), get_redis(), settings.resend_after, settings.restore_interval)
    Watchdog(
        get_engine(),
        get_redis(),
        broker_name(settings.redis_url, settings.broker_sentinel_master),
        settings.broker_check_interval,
        min_replicas=settings.broker_min_replicas,
        wait_timeout_ms=settings.broker_wait_timeout_ms,
    ).start()


class LivenessFile(bootsteps.StartStopStep):
    """Touch WORKER_LIVENESS_FILE every few seconds from the consumer's own event loop.

    The file goes stale when the consumer stops looping (stuck, or without its broker),
    so its age is a healthcheck that costs a `stat` instead of a Celery client.
    """

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        configured = load_settings().liveness_file
        self.path = Path(configured) if configured else None
        self.timer_entry: Any = None

    def start(self, parent: Any) -> None:
        if self.path is not None:
            self.path.touch()
            self.timer_entry = parent.timer.call_repeatedly(LIVENESS_INTERVAL, self.path.touch)

    def stop(self, parent: Any) -> None:
        if self.timer_entry is not None:
            self.timer_entry.cancel()
            self.timer_entry = None


celery_app.steps["consumer"].add(LivenessFile)
