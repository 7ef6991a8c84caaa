"""Settings for every process, read from environment variables in one place."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from dataclasses import field

DEFAULT_DATABASE_URL = "postgresql+psycopg2://postgres@127.0.0.1:5432/aggregator"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


class SettingsError(ValueError):
    """An environment variable holds a value we cannot use."""


@dataclass(frozen=True)
class Settings:
    """Typed configuration shared by the API, the worker, migrations and the CLI."""

    database_url: str = DEFAULT_DATABASE_URL
    redis_url: str = DEFAULT_REDIS_URL
    # Broker: how long a fetched but unacknowledged message stays invisible
    # before Redis hands it to another worker (covers a SIGKILLed worker).
    visibility_timeout: int = 300
    # How often workers sweep for messages whose visibility timeout passed.
    restore_interval: int = 10
    # An accepted batch still not stored this long after it was sent is sent
    # again (kombu can lose a message whose worker dies as it fetches it).
    # Unset, it is three visibility timeouts.
    resend_after: int = 900
    # Seconds a publish may take before the API answers 503.
    broker_timeout: float = 0.5
    retry_after: int = 2
    # Worker retries on database outages: exponential backoff capped here.
    # Kept well below visibility_timeout, so a retry held in memory is never
    # redelivered as a second copy.
    retry_backoff_max: int = 30
    # Request bodies above this get 413 before they are read (1,000 events of a
    # few KiB each fit comfortably).
    max_body_bytes: int = 8 * 1024 * 1024
    # A client that stops sending its body for this long is cut off, so slow
    # clients cannot hold the server's threads.
    body_read_timeout: float = 10.0
    pool_size: int = 5
    # Requests with fewer events than this wait up to linger_ms for other
    # requests of the same process and share one task with them.
    group_commit_below: int = 100
    group_commit_max_events: int = 1000
    group_commit_linger_ms: float = 2.0
    api_tokens: tuple[str, ...] = field(default=())
    # Requests per client (token, or address without tokens), counted in Redis.
    # Flask-Limiter notation; empty turns limiting off.
    rate_limit: str = "5000 per second"


def _int(environ: Mapping[str, str], name: str, default: int) -> int:
    raw = environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name} must be an integer, got {raw!r}") from None
    if value <= 0:
        raise SettingsError(f"{name} must be positive, got {value}")
    return value


def _float(environ: Mapping[str, str], name: str, default: float) -> float:
    raw = environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{name} must be a number, got {raw!r}") from None
    if value <= 0:
        raise SettingsError(f"{name} must be positive, got {value}")
    return value


def _url(environ: Mapping[str, str], name: str, default: str, schemes: tuple[str, ...]) -> str:
    value = environ.get(name) or default
    if not value.startswith(schemes):
        raise SettingsError(f"{name} must start with one of {schemes}, got {value!r}")
    return value


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Build Settings from the environment, failing loudly on malformed values."""
    env = os.environ if environ is None else environ
    database_url = _url(env, "DATABASE_URL", DEFAULT_DATABASE_URL, ("postgresql",))
    # Plain postgresql:// URLs would pick SQLAlchemy's default driver; we ship psycopg2.
    if database_url.startswith("postgresql://"):
        database_url = "postgresql+psycopg2://" + database_url[len("postgresql://") :]
    tokens = tuple(t.strip() for t in env.get("API_TOKENS", "").split(",") if t.strip())
    return Settings(
        database_url=database_url,
        redis_url=_url(env, "REDIS_URL", DEFAULT_REDIS_URL, ("redis://", "rediss://", "unix://")),
        visibility_timeout=_int(env, "BROKER_VISIBILITY_TIMEOUT", Settings.visibility_timeout),
        restore_interval=_int(env, "BROKER_RESTORE_INTERVAL", Settings.restore_interval),
        resend_after=_int(env, "BROKER_RESEND_AFTER", 0)
        or 3 * _int(env, "BROKER_VISIBILITY_TIMEOUT", Settings.visibility_timeout),
        broker_timeout=_float(env, "BROKER_TIMEOUT", Settings.broker_timeout),
        retry_after=_int(env, "RETRY_AFTER", Settings.retry_after),
        retry_backoff_max=_int(env, "TASK_RETRY_BACKOFF_MAX", Settings.retry_backoff_max),
        max_body_bytes=_int(env, "MAX_BODY_BYTES", Settings.max_body_bytes),
        body_read_timeout=_float(env, "BODY_READ_TIMEOUT", Settings.body_read_timeout),
        pool_size=_int(env, "DB_POOL_SIZE", Settings.pool_size),
        group_commit_below=_int(env, "GROUP_COMMIT_BELOW", Settings.group_commit_below),
        group_commit_max_events=_int(
            env, "GROUP_COMMIT_MAX_EVENTS", Settings.group_commit_max_events
        ),
        group_commit_linger_ms=_float(
            env, "GROUP_COMMIT_LINGER_MS", Settings.group_commit_linger_ms
        ),
        api_tokens=tokens,
        rate_limit=env.get("RATE_LIMIT", Settings.rate_limit).strip(),
    )
