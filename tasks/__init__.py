"""The Celery application and the per-process database engine and Redis client of its workers."""

from __future__ import annotations

import redis
from celery import Celery
from celery.signals import worker_process_init
from celery.signals import worker_ready
from redis.backoff import NoBackoff
from redis.retry import Retry
from sqlalchemy import Engine

from app.config import Settings
from app.config import load_settings
from app.db import make_engine
from tasks.pending import Scripts

celery_app = Celery("tasks", include=["tasks.ingest"])
celery_app.config_from_object("celery_config")

_engine: Engine | None = None
_redis: redis.Redis | None = None
_scripts: Scripts | None = None


def make_redis(settings: Settings) -> redis.Redis:
    """Return a Redis client that fails within broker_timeout instead of retrying quietly."""
    # redis-py retries timeouts by default, which turns a 0.5 s timeout into
    # several seconds during a stall; callers decide what to do instead.
    return redis.Redis.from_url(
        settings.redis_url,
        socket_timeout=settings.broker_timeout,
        socket_connect_timeout=settings.broker_timeout,
        retry=Retry(NoBackoff(), 0),
    )


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
        _engine = make_engine(settings.database_url, pool_size=2)
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
    """In the worker's main process: leases, the resend sweep and the broker watchdog."""
    from tasks.broker import start_leases
    from tasks.broker_state import Watchdog
    from tasks.broker_state import broker_name
    from tasks.resend import start_sweeper

    settings = load_settings()
    start_leases(get_redis(), settings.visibility_timeout / 3)
    start_sweeper(get_engine(), get_redis(), settings.resend_after, settings.restore_interval)
    Watchdog(
        get_engine(), get_redis(), broker_name(settings.redis_url), settings.broker_check_interval
    ).start()
