"""The Celery application and the per-process database engine of its workers."""

from __future__ import annotations

import redis
from celery import Celery
from celery.signals import worker_process_init
from celery.signals import worker_ready
from sqlalchemy import Engine

from app.config import load_settings
from app.db import make_engine

celery_app = Celery("tasks", include=["tasks.ingest"])
celery_app.config_from_object("celery_config")

_engine: Engine | None = None
_redis: redis.Redis | None = None


@worker_process_init.connect
def _reset_after_fork(**_: object) -> None:
    """Give each prefork child its own engine; pooled connections never cross a fork."""
    global _engine, _redis
    _engine = None
    _redis = None


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
        settings = load_settings()
        _redis = redis.Redis.from_url(
            settings.redis_url,
            socket_timeout=settings.broker_timeout,
            socket_connect_timeout=settings.broker_timeout,
        )
    return _redis


@worker_ready.connect
def _start_resend_sweeper(**_: object) -> None:
    """Send again accepted batches the broker lost (see app.pending)."""
    from tasks.resend import start_sweeper

    settings = load_settings()
    start_sweeper(get_redis(), settings.resend_after, settings.restore_interval)
