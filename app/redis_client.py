"""The Redis client every process builds from settings: the API's and the workers'.

One Redis (REDIS_URL), or a replicated one found through Sentinel
(BROKER_SENTINELS, BROKER_SENTINEL_MASTER): then every connection asks the
Sentinels for the primary when it connects, so after a failover the next
command reaches the promoted replica without a restart. A connection that
finds its server demoted (READONLY) is closed and raises ConnectionError,
which the API answers 503 and workers retry.
"""

from __future__ import annotations

import socket
from typing import Any
from urllib.parse import unquote
from urllib.parse import urlsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from redis.sentinel import Sentinel

from app.config import Settings

# A peer that vanishes without a word (a silent partition: packets dropped, no
# RST) is noticed within seconds instead of never: keepalive probes on an idle
# connection, and TCP_USER_TIMEOUT for data sent and never acknowledged.
KEEPALIVE_IDLE = 5
KEEPALIVE_INTERVAL = 1
KEEPALIVE_COUNT = 3
USER_TIMEOUT_MS = 8000


def keepalive_options() -> dict[int, int]:
    """Return the TCP options (setsockopt IPPROTO_TCP) every broker connection gets."""
    options: dict[int, int] = {}
    for name, value in (
        ("TCP_KEEPIDLE", KEEPALIVE_IDLE),
        ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL),
        ("TCP_KEEPCNT", KEEPALIVE_COUNT),
        ("TCP_USER_TIMEOUT", USER_TIMEOUT_MS),
    ):
        # Linux has all four; other systems some of them.
        if hasattr(socket, name):
            options[getattr(socket, name)] = value
    return options


def database_number(redis_url: str) -> int:
    """Return the database number REDIS_URL names (0 when it names none)."""
    path = urlsplit(redis_url).path.strip("/")
    return int(path) if path.isdigit() else 0


def sentinel_manager(settings: Settings, **connection: Any) -> Sentinel:
    """Return a Sentinel client for BROKER_SENTINELS; `connection` applies to the data nodes."""
    sentinel_kwargs: dict[str, Any] = {
        "socket_timeout": settings.broker_timeout,
        "socket_connect_timeout": settings.broker_timeout,
        "socket_keepalive": True,
        "socket_keepalive_options": keepalive_options(),
        "retry": Retry(NoBackoff(), 0),
    }
    if settings.broker_sentinel_password:
        sentinel_kwargs["password"] = settings.broker_sentinel_password
    return Sentinel(list(settings.broker_sentinels), sentinel_kwargs=sentinel_kwargs, **connection)


def make_redis(settings: Settings) -> redis.Redis:
    """Return a Redis client that fails within broker_timeout instead of retrying quietly."""
    # redis-py retries timeouts by default, which turns a 0.5 s timeout into
    # several seconds during a stall; callers decide what to do instead.
    options: dict[str, Any] = {
        "socket_timeout": settings.broker_timeout,
        "socket_connect_timeout": settings.broker_timeout,
        "socket_keepalive": True,
        "socket_keepalive_options": keepalive_options(),
        "retry": Retry(NoBackoff(), 0),
    }
    if not settings.broker_sentinels:
        return redis.Redis.from_url(settings.redis_url, **options)
    # REDIS_URL still says which database, and the data nodes' credentials.
    parts = urlsplit(settings.redis_url)
    if parts.username:
        options["username"] = unquote(parts.username)
    if parts.password:
        options["password"] = unquote(parts.password)
    options["db"] = database_number(settings.redis_url)
    return sentinel_manager(settings).master_for(settings.broker_sentinel_master, **options)
