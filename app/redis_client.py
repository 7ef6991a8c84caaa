"""The Redis client every process builds from settings: the API's and the workers'."""

from __future__ import annotations

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from app.config import Settings


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
