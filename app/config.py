"""Settings for every process, read from environment variables in one place."""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from dataclasses import field
from ipaddress import IPv4Network
from ipaddress import IPv6Network
from ipaddress import ip_network
from typing import Literal

DEFAULT_DATABASE_URL = "postgresql+psycopg2://postgres@127.0.0.1:5432/aggregator"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


class SettingsError(ValueError):
    """An environment variable holds a value we cannot use."""


# What a token may do: publish events, read events and counters, administer
# (replay dead letters, acknowledge broker data loss).
SCOPES = ("publish", "read", "admin")
DEFAULT_SCOPES = frozenset({"publish", "read"})
MIN_TOKEN_LENGTH = 32
# Token characters: printable ASCII but space and the separators , : +
_TOKEN_CHARS = frozenset(chr(c) for c in range(0x21, 0x7F)) - set(",:+")
# A token is refused as a placeholder or as guessable when it holds one of
# these words (any case) standing alone (between the token's ends or characters
# that are neither letters nor digits), has fewer than MIN_DISTINCT_CHARACTERS
# different characters, or repeats a sequence of REPEAT_LENGTH characters.
# Random tokens pass: `openssl rand -hex 32` can hold none of the words; a
# url-safe one holds "todo" or "your" inside its letters by chance about once
# in 23,000, so a word only counts where a placeholder puts it (odds about
# 1 in 10^7), and a repeat of 8 characters has odds below 1 in 10^7.
PLACEHOLDER_WORDS = (
    "replace",
    "change",
    "changeme",
    "example",
    "placeholder",
    "sample",
    "dummy",
    "your",
    "secret",
    "password",
    "token",
    "todo",
    "fixme",
)
# A word counts where it stands alone: each side is the token's end or a
# character that is neither letter nor digit.
_PLACEHOLDER_PATTERNS = {
    word: re.compile(rf"(?:^|[^a-z0-9]){word}(?:$|[^a-z0-9])") for word in PLACEHOLDER_WORDS
}
MIN_DISTINCT_CHARACTERS = 10
REPEAT_LENGTH = 8
TOKEN_RULE = (
    f"at least {MIN_TOKEN_LENGTH} characters, {MIN_DISTINCT_CHARACTERS} of them different,"
    f" no sequence of {REPEAT_LENGTH} characters repeated, none of the words"
    f" {', '.join(PLACEHOLDER_WORDS)}; make one with `openssl rand -hex 32`"
)


def weak_token_reason(secret: str) -> str | None:
    """Say why a token looks like a placeholder or is easy to guess, or return None."""
    lowered = secret.lower()
    for word in PLACEHOLDER_WORDS:
        if _PLACEHOLDER_PATTERNS[word].search(lowered):
            return f"contains {word!r}, as placeholders do"
    if len(set(secret)) < MIN_DISTINCT_CHARACTERS:
        return f"has only {len(set(secret))} different characters"
    seen: set[str] = set()
    for start in range(len(secret) - REPEAT_LENGTH + 1):
        part = secret[start : start + REPEAT_LENGTH]
        if part in seen:
            return f"repeats {part!r}"
        seen.add(part)
    return None


@dataclass(frozen=True)
class ApiToken:
    """A bearer token and the scopes it grants."""

    secret: str = field(repr=False)
    scopes: frozenset[str]


def parse_tokens(raw: str) -> tuple[ApiToken, ...]:
    """Parse API_TOKENS: comma-separated `<token>` or `<token>:<scope>+<scope>...` entries.

    A token without scopes may publish and read; `admin` is only ever granted
    by name. Blank entries, short or weak tokens (TOKEN_RULE) and unknown
    scopes are errors.
    """
    if not raw.strip():
        return ()
    tokens: list[ApiToken] = []
    for position, entry in enumerate(raw.split(","), start=1):
        secret, separator, scope_text = entry.strip().partition(":")
        if not secret:
            raise SettingsError(f"API_TOKENS entry {position} is blank")
        if len(secret) < MIN_TOKEN_LENGTH:
            raise SettingsError(
                f"API_TOKENS entry {position} has {len(secret)} characters;"
                f" tokens need at least {MIN_TOKEN_LENGTH} (e.g. `openssl rand -hex 32`)"
            )
        if not set(secret) <= _TOKEN_CHARS:
            raise SettingsError(
                f"API_TOKENS entry {position}: tokens are printable ASCII without space , : +"
            )
        if weak := weak_token_reason(secret):
            raise SettingsError(f"API_TOKENS entry {position} {weak}; tokens need {TOKEN_RULE}")
        scopes = frozenset(scope_text.split("+")) if separator else DEFAULT_SCOPES
        unknown = sorted(scopes - set(SCOPES))
        if unknown:
            raise SettingsError(
                f"API_TOKENS entry {position}: unknown scope(s) {', '.join(unknown)};"
                f" scopes are {', '.join(SCOPES)}"
            )
        if any(token.secret == secret for token in tokens):
            raise SettingsError(f"API_TOKENS entry {position} repeats an earlier token")
        tokens.append(ApiToken(secret, scopes))
    return tuple(tokens)


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def load_log_level(environ: Mapping[str, str] | None = None) -> str:
    """Return LOG_LEVEL (default INFO) as a logging level name, failing loudly on others.

    Read on its own as well, so gunicorn's master can set up its logs before
    (and regardless of) the rest of the settings.
    """
    env = os.environ if environ is None else environ
    level = env.get("LOG_LEVEL", "").strip().upper() or "INFO"
    if level not in LOG_LEVELS:
        raise SettingsError(f"LOG_LEVEL must be one of {', '.join(LOG_LEVELS)}, got {level!r}")
    return level


def _flag(environ: Mapping[str, str], name: str) -> bool:
    raw = environ.get(name, "").strip().lower()
    if raw in ("", "0", "false", "no"):
        return False
    if raw in ("1", "true", "yes"):
        return True
    raise SettingsError(f"{name} must be 1 or 0, got {raw!r}")


@dataclass(frozen=True)
class DbTimeouts:
    """PostgreSQL's limits on each session of one kind of process, in seconds."""

    # Any one statement, lock waits included.
    statement: float
    # Waiting for a lock (a row, a table, the log's advisory lock).
    lock: float
    # A transaction left open with nothing running: its process stopped, hung or
    # forgot it. PostgreSQL ends the session, which releases the log's lock.
    idle_in_transaction: float


@dataclass(frozen=True)
class DbNetwork:
    """libpq's limits on each connection's network, so a silent partition becomes an error.

    A peer that vanishes without a reset (a cut link, a dead host, packets
    dropped) otherwise leaves a COMMIT or a read waiting for the kernel's
    retransmissions, about 15 minutes. With these a connection is given up
    within about tcp_user_timeout_ms (unacknowledged data) or keepalives_idle +
    interval * count seconds (waiting for a reply), and the caller retries.
    0 leaves a keepalive or tcp_user_timeout at the system's default.
    """

    # Per host tried (libpq multi-host URLs try each in turn).
    connect_timeout: int = 5
    keepalives_idle: int = 5
    keepalives_interval: int = 2
    keepalives_count: int = 3
    tcp_user_timeout_ms: int = 8000

    def connect_args(self) -> dict[str, int]:
        """Return the libpq connection parameters that apply these limits."""
        limits = {
            "keepalives_idle": self.keepalives_idle,
            "keepalives_interval": self.keepalives_interval,
            "keepalives_count": self.keepalives_count,
            "tcp_user_timeout": self.tcp_user_timeout_ms,
        }
        # A 0 is left out, not passed: libpq hands it to setsockopt, and Linux
        # refuses TCP_KEEPIDLE 0 (the connection fails: "Invalid argument").
        return {
            "connect_timeout": self.connect_timeout,
            "keepalives": 1,
            **{name: value for name, value in limits.items() if value},
        }


@dataclass(frozen=True)
class Settings:
    """Typed configuration shared by the API, the worker and migrations."""

    database_url: str = DEFAULT_DATABASE_URL
    redis_url: str = DEFAULT_REDIS_URL
    # Broker: a message held by a worker whose main process died is handed to
    # another worker this long after the dead one last renewed its lease (live
    # workers renew theirs every third of it, tasks.broker).
    visibility_timeout: int = 30
    # How often workers sweep for such messages, and for lost batches.
    restore_interval: int = 5
    # A batch pending this long is checked for evidence that the broker lost
    # it (its message neither queued nor held) and then sent again.
    resend_after: int = 30
    # How often workers compare the broker's epoch and sequence with the
    # checkpoint in PostgreSQL, to notice lost broker data.
    broker_check_interval: float = 2.0
    # Accepting stops (503) while the unstored backlog on the broker (messages
    # and their resend copies) is above this, well before Redis's maxmemory.
    max_backlog_bytes: int = 256 * 1024 * 1024
    # How long a request's idempotency record is kept.
    idempotency_ttl: int = 24 * 3600
    # Records kept at most (about 300 bytes of Redis memory each): beyond it a
    # publish with a new key gets 503 rather than a record Redis might drop.
    idempotency_max_records: int = 1_000_000
    # Connect and read timeout towards Redis (API and workers); a publish whose
    # Redis call takes longer is answered 503.
    broker_timeout: float = 0.5
    # A replicated broker: Sentinels (host, port) that name the primary of
    # `broker_sentinel_master`; empty: REDIS_URL is the broker (one Redis).
    broker_sentinels: tuple[tuple[str, int], ...] = ()
    broker_sentinel_master: str = ""
    broker_sentinel_password: str = field(default="", repr=False)
    # Replicas that must hold an acceptance (Redis WAIT) before the API answers
    # 202, and how long to wait for them, in milliseconds, before answering 503.
    broker_min_replicas: int = 0
    broker_wait_timeout_ms: int = 250
    retry_after: int = 2
    # While the database is away a worker waits before handing a batch back
    # to the queue, doubling the wait up to this many seconds.
    retry_backoff_max: int = 30
    # A task still running this long gets SoftTimeLimitExceeded and hands its
    # batch back to the queue; one still running at the hard limit (a pool
    # process hung or stopped) is killed and its message handed back. Healthy
    # batches take milliseconds; a database outage is waited out in rounds of at
    # most retry_backoff_max, each of which ends by handing the batch back.
    task_soft_time_limit: int = 120
    task_time_limit: int = 150
    # Request bodies above this get 413 before they are read (1,000 events of up
    # to ~2 KiB each). It also bounds how long one acceptance holds Redis: a
    # 2 MiB batch ~30 ms, an 8 MiB one ~160 ms, a group of small ones no more.
    max_body_bytes: int = 2 * 1024 * 1024
    # A client that stops sending its body for this long is cut off, so slow
    # clients cannot hold the server's threads.
    body_read_timeout: float = 10.0
    pool_size: int = 5
    # Connections per API process for NDJSON exports and waiting followers, apart
    # from the pool above, so they never take the ones pages, /stats and /ready need.
    stream_pool_size: int = 2
    # NDJSON exports one API process streams at once; more get 503. A stalled
    # export holds no connection, only up to one page in memory.
    max_exports: int = 16
    # PostgreSQL limits per session (DbTimeouts). The API's statements are reads
    # of a page or a few counters. A worker's longest stores the largest batch
    # (1,000 events of 8 KB: 0.13 s median, 0.2 s at most on a loaded 2-core
    # machine, `python -m bench.store --sizes 1000 --payload-bytes 8000`), after
    # waiting for the log's lock behind the others. Lock waits give up before
    # the statement limit, and idle transactions end well before lock waits do,
    # so the others wait out a stopped lock holder instead of failing.
    statement_timeout: float = 10.0
    worker_statement_timeout: float = 30.0
    lock_timeout: float = 10.0
    idle_in_transaction_timeout: float = 5.0
    # Connect, keepalive and TCP_USER_TIMEOUT limits of every connection (DbNetwork).
    db_network: DbNetwork = DbNetwork()
    # A page of GET /events stops after this many bytes of payloads (the cursor
    # continues), so one request cannot make the server hold 64 MB.
    events_page_max_bytes: int = 4 * 1024 * 1024
    # Requests of one API process that may wait for new events at once
    # (GET /events?wait=N); more get 503, so followers never hold every
    # connection of a process that publishers need.
    max_followers: int = 64
    # Requests with fewer events than this wait up to linger_ms for other
    # requests of the same process and share one task with them.
    group_commit_below: int = 100
    group_commit_max_events: int = 1000
    group_commit_linger_ms: float = 2.0
    api_tokens: tuple[ApiToken, ...] = field(default=())
    # Without tokens the API refuses to start unless this says it may run open.
    auth_disabled: bool = False
    # Budget per client (token, or address when auth is disabled) across
    # endpoints: a request costs 1, a publish one per event. Notation of the
    # `limits` library; empty turns limiting off.
    rate_limit: str = "50000 per second"
    # Failed authentications per client address before it gets 429.
    auth_failure_limit: str = "20 per minute"
    # Proxies in front whose X-Forwarded-For to trust for the client address
    # (1 behind the compose nginx); 0 trusts none.
    proxy_hops: int = 0
    # Peers whose X-Forwarded-For is trusted (addresses or networks): the proxy's.
    # A request from any other peer is taken at its own address, whatever it says.
    trusted_proxies: tuple[IPv4Network | IPv6Network, ...] = ()
    # Bodies over 64 KiB (or of unknown length) one API process holds at once; more
    # wait up to large_body_wait seconds for a slot, then get 503. Bounds memory.
    max_large_bodies: int = 4
    large_body_wait: float = 5.0
    # Topics whose events may come without an event_id: the API derives one from
    # the event's content (aggregator_client.event_ids, docs/event-ids.md). Exact names,
    # prefixes ending in "*", or "*" for every topic; empty: every event needs one.
    derive_event_id_topics: tuple[str, ...] = ()
    # Lowest level written to the logs (app.logs), for the API and the worker alike.
    log_level: str = "INFO"
    # A worker touches this file every few seconds from its consumer's loop, so
    # a healthcheck can read the file's age instead of starting a Celery client
    # (`celery inspect ping`); empty: no file.
    liveness_file: str = ""
    # Events are kept at least this many days (whole UTC days of stored_at are
    # dropped, so up to one day more); None keeps them for ever.
    retention_days: int | None = None
    # Dedup keys are kept this many days after the later of when an event was
    # stored and its own timestamp (never fewer than retention_days); an event
    # re-sent after its key is gone is stored and counted stored_after_horizon.
    dedup_horizon_days: int | None = None
    # Oldest whole days of events are dropped while events' partitions take
    # more than this many bytes on disk (RETENTION_MAX_BYTES); None: no cap.
    retention_max_bytes: int | None = None
    # Topics kept for other numbers of days than retention_days
    # (RETENTION_TOPIC_DAYS="debug=3,audit=365"): shorter ones are deleted
    # (DELETE in batches), longer ones keep their partitions; a longer topic's
    # keys are kept at least its days.
    retention_topic_days: tuple[tuple[str, int], ...] = ()
    # How often the beat schedules a retention run (app.retention), in seconds.
    retention_interval: int = 3600
    # Daily partitions of events kept ready ahead of today.
    partitions_ahead: int = 3
    # Batch ledger rows are kept this many days after they were processed (at
    # least MIN_LEDGER_RETENTION_DAYS, and a day past IDEMPOTENCY_TTL and the
    # broker's redelivery and resend delays); pruned
    # rows are folded into per-epoch totals (app.store.housekeeping). None: kept.
    ledger_retention_days: int | None = None
    # Dead letters are kept this many days after they failed, replayed or not.
    dead_letter_retention_days: int | None = None
    # Broker checkpoints not checked for this many days (a broker no process
    # uses any more), and acknowledged broker losses, are pruned.
    broker_checkpoint_retention_days: int | None = None

    def db_timeouts(self, process: Literal["api", "worker"]) -> DbTimeouts:
        """Return the session limits of the API's or a worker's connections."""
        statement = self.statement_timeout if process == "api" else self.worker_statement_timeout
        return DbTimeouts(statement, self.lock_timeout, self.idle_in_transaction_timeout)


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


def _count(environ: Mapping[str, str], name: str, default: int) -> int:
    raw = environ.get(name)
    if raw is None or raw == "":
        return default
    if not raw.isdigit():
        raise SettingsError(f"{name} must be 0 or a positive integer, got {raw!r}")
    return int(raw)


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


def _networks(environ: Mapping[str, str], name: str) -> tuple[IPv4Network | IPv6Network, ...]:
    raw = environ.get(name, "")
    networks = []
    for entry in raw.split(","):
        if not entry.strip():
            continue
        try:
            networks.append(ip_network(entry.strip(), strict=False))
        except ValueError:
            raise SettingsError(
                f"{name}: {entry.strip()!r} is not an address or network (e.g. 10.0.0.5,"
                " 172.18.0.0/16)"
            ) from None
    return tuple(networks)


def _topic_patterns(environ: Mapping[str, str], name: str) -> tuple[str, ...]:
    patterns = []
    for entry in environ.get(name, "").split(","):
        pattern = entry.strip()
        if not pattern:
            continue
        if "*" in pattern[:-1]:
            raise SettingsError(
                f"{name}: {pattern!r} has a '*' before its end; give topic names, prefixes"
                " ending in '*' (orders.*), or '*' for every topic"
            )
        patterns.append(pattern)
    return tuple(patterns)


def _days(environ: Mapping[str, str], name: str) -> int | None:
    raw = environ.get(name, "").strip()
    if raw in ("", "off"):
        return None
    if not raw.isdigit() or int(raw) == 0:
        raise SettingsError(f"{name} must be a positive number of days or 'off', got {raw!r}")
    return int(raw)


def _retention(environ: Mapping[str, str]) -> tuple[int | None, int | None]:
    """Return RETENTION_DAYS and DEDUP_HORIZON_DAYS (which defaults to it), checked together."""
    retention = _days(environ, "RETENTION_DAYS")
    horizon = _days(environ, "DEDUP_HORIZON_DAYS")
    if horizon is None:
        return retention, retention
    if retention is None:
        raise SettingsError(
            "DEDUP_HORIZON_DAYS needs RETENTION_DAYS: keys are only pruned once their events"
            " are gone, so without retention they are kept for ever"
        )
    if horizon < retention:
        raise SettingsError(
            f"DEDUP_HORIZON_DAYS ({horizon}) must be at least RETENTION_DAYS ({retention}):"
            " a stored event's key must outlive it, or a re-send would be stored twice"
        )
    return retention, horizon


# Size suffixes RETENTION_MAX_BYTES takes (powers of 1024).
_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


def _max_bytes(environ: Mapping[str, str]) -> int | None:
    """Return RETENTION_MAX_BYTES: a number of bytes, optionally with k, m, g or t (1024s)."""
    raw = environ.get("RETENTION_MAX_BYTES", "").strip().lower()
    if raw in ("", "off"):
        return None
    number, unit = raw.rstrip("kmgtb"), raw[len(raw.rstrip("kmgtb")) :].rstrip("b")
    if not number.isdigit() or int(number) == 0 or unit not in _SIZE_UNITS:
        raise SettingsError(
            "RETENTION_MAX_BYTES must be a positive size such as 500m or 200g, or 'off',"
            f" got {raw!r}"
        )
    return int(number) * _SIZE_UNITS[unit]


def _topic_days(environ: Mapping[str, str]) -> tuple[tuple[str, int], ...]:
    """Return RETENTION_TOPIC_DAYS as (topic, days) pairs, sorted by topic.

    Without RETENTION_DAYS every other topic is kept for ever, so each listed
    topic is kept less and deleted past its days.
    """
    found: dict[str, int] = {}
    for entry in environ.get("RETENTION_TOPIC_DAYS", "").split(","):
        if not entry.strip():
            continue
        topic, _, days = entry.strip().rpartition("=")
        if not topic.strip() or not days.strip().isdigit() or int(days) == 0:
            raise SettingsError(
                f"RETENTION_TOPIC_DAYS: {entry.strip()!r} is not topic=days (a positive number)"
            )
        found[topic.strip()] = int(days)
    return tuple(sorted(found.items()))


# A ledger row is what makes a second copy of its batch a no-op; see
# app.store.housekeeping for every way a copy can still arrive and why a week
# (and a day past IDEMPOTENCY_TTL) outlasts them all.
MIN_LEDGER_RETENTION_DAYS = 7
# A checkpoint of a broker every process stopped using for a holiday is kept.
MIN_CHECKPOINT_RETENTION_DAYS = 7


def _housekeeping(
    environ: Mapping[str, str], copies_for: int
) -> tuple[int | None, int | None, int | None]:
    """Return LEDGER_, DEAD_LETTER_ and BROKER_CHECKPOINT_RETENTION_DAYS, checked.

    `copies_for` is the longest, in seconds, a copy of a processed batch can
    still arrive by a configured path (IDEMPOTENCY_TTL, BROKER_VISIBILITY_TIMEOUT,
    BROKER_RESEND_AFTER): the ledger keeps its rows a day past it, and a week at least.
    """
    ledger = _days(environ, "LEDGER_RETENTION_DAYS")
    letters = _days(environ, "DEAD_LETTER_RETENTION_DAYS")
    checkpoints = _days(environ, "BROKER_CHECKPOINT_RETENTION_DAYS")
    least = max(MIN_LEDGER_RETENTION_DAYS, -(-copies_for // 86_400) + 1)
    if ledger is not None and ledger < least:
        raise SettingsError(
            f"LEDGER_RETENTION_DAYS ({ledger}) must be at least {least}: a ledger row makes a"
            " redelivered or resent copy of its batch a no-op, and must outlive every copy"
            " (IDEMPOTENCY_TTL, BROKER_VISIBILITY_TIMEOUT, BROKER_RESEND_AFTER, a day past"
            " the longest, and a week at least; see docs/retention.md)"
        )
    if checkpoints is not None and checkpoints < MIN_CHECKPOINT_RETENTION_DAYS:
        raise SettingsError(
            f"BROKER_CHECKPOINT_RETENTION_DAYS ({checkpoints}) must be at least"
            f" {MIN_CHECKPOINT_RETENTION_DAYS}: a broker's checkpoint is how a loss of its"
            " data is noticed when it is used again"
        )
    return ledger, letters, checkpoints


def _addresses(environ: Mapping[str, str], name: str) -> tuple[tuple[str, int], ...]:
    addresses = []
    for entry in environ.get(name, "").split(","):
        if not entry.strip():
            continue
        host, _, port = entry.strip().rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise SettingsError(
                f"{name}: {entry.strip()!r} is not host:port (e.g. 10.0.0.5:26379,10.0.0.6:26379)"
            )
        addresses.append((host.strip("[]"), int(port)))
    return tuple(addresses)


def _db_network(environ: Mapping[str, str]) -> DbNetwork:
    connect_timeout = _int(environ, "DB_CONNECT_TIMEOUT", DbNetwork.connect_timeout)
    if connect_timeout < 2:
        # libpq treats a connect_timeout of 1 as 2 anyway; say so rather than surprise.
        raise SettingsError(f"DB_CONNECT_TIMEOUT must be at least 2 seconds, got {connect_timeout}")
    return DbNetwork(
        connect_timeout=connect_timeout,
        keepalives_idle=_count(environ, "DB_KEEPALIVES_IDLE", DbNetwork.keepalives_idle),
        keepalives_interval=_count(
            environ, "DB_KEEPALIVES_INTERVAL", DbNetwork.keepalives_interval
        ),
        keepalives_count=_count(environ, "DB_KEEPALIVES_COUNT", DbNetwork.keepalives_count),
        tcp_user_timeout_ms=_count(environ, "DB_TCP_USER_TIMEOUT", DbNetwork.tcp_user_timeout_ms),
    )


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
    soft_limit = _int(env, "TASK_SOFT_TIME_LIMIT", Settings.task_soft_time_limit)
    hard_limit = _int(env, "TASK_TIME_LIMIT", Settings.task_time_limit)
    if hard_limit <= soft_limit:
        # The soft limit is what lets a task hand its batch back cleanly; at or
        # past the hard limit it never fires.
        raise SettingsError(
            f"TASK_TIME_LIMIT ({hard_limit}) must be above TASK_SOFT_TIME_LIMIT ({soft_limit})"
        )
    retention_days, dedup_horizon_days = _retention(env)
    retention_topic_days = _topic_days(env)
    idempotency_ttl = _int(env, "IDEMPOTENCY_TTL", Settings.idempotency_ttl)
    visibility_timeout = _int(env, "BROKER_VISIBILITY_TIMEOUT", Settings.visibility_timeout)
    resend_after = _int(env, "BROKER_RESEND_AFTER", Settings.resend_after)
    ledger_days, dead_letter_days, checkpoint_days = _housekeeping(
        env, max(idempotency_ttl, visibility_timeout, resend_after)
    )
    proxy_hops = _count(env, "PROXY_HOPS", Settings.proxy_hops)
    trusted_proxies = _networks(env, "TRUSTED_PROXIES")
    if proxy_hops and not trusted_proxies:
        raise SettingsError(
            "PROXY_HOPS needs TRUSTED_PROXIES: the proxy's addresses or networks, so that only"
            " the proxy can name a client's address in X-Forwarded-For"
        )
    sentinels = _addresses(env, "BROKER_SENTINELS")
    sentinel_master = env.get("BROKER_SENTINEL_MASTER", "").strip()
    if bool(sentinels) != bool(sentinel_master):
        raise SettingsError(
            "BROKER_SENTINELS and BROKER_SENTINEL_MASTER go together: the Sentinels' addresses"
            " and the name they know the broker's primary by"
        )
    # Durable on two nodes by default once the broker is replicated.
    min_replicas = _count(env, "BROKER_MIN_REPLICAS", 1 if sentinels else 0)
    broker_timeout = _float(env, "BROKER_TIMEOUT", Settings.broker_timeout)
    wait_timeout_ms = _int(env, "BROKER_WAIT_TIMEOUT", Settings.broker_wait_timeout_ms)
    if min_replicas and wait_timeout_ms >= broker_timeout * 1000:
        # WAIT is answered within its timeout; the client must not give up first.
        raise SettingsError(
            f"BROKER_WAIT_TIMEOUT ({wait_timeout_ms} ms) must be below BROKER_TIMEOUT"
            f" ({broker_timeout} s)"
        )
    return Settings(
        database_url=database_url,
        redis_url=_url(env, "REDIS_URL", DEFAULT_REDIS_URL, ("redis://", "rediss://", "unix://")),
        visibility_timeout=visibility_timeout,
        restore_interval=_int(env, "BROKER_RESTORE_INTERVAL", Settings.restore_interval),
        resend_after=resend_after,
        broker_check_interval=_float(env, "BROKER_CHECK_INTERVAL", Settings.broker_check_interval),
        max_backlog_bytes=_int(env, "BROKER_MAX_BACKLOG_BYTES", Settings.max_backlog_bytes),
        idempotency_ttl=idempotency_ttl,
        idempotency_max_records=_int(
            env, "IDEMPOTENCY_MAX_RECORDS", Settings.idempotency_max_records
        ),
        broker_timeout=broker_timeout,
        broker_sentinels=sentinels,
        broker_sentinel_master=sentinel_master,
        broker_sentinel_password=env.get("BROKER_SENTINEL_PASSWORD", ""),
        broker_min_replicas=min_replicas,
        broker_wait_timeout_ms=wait_timeout_ms,
        retry_after=_int(env, "RETRY_AFTER", Settings.retry_after),
        retry_backoff_max=_int(env, "TASK_RETRY_BACKOFF_MAX", Settings.retry_backoff_max),
        task_soft_time_limit=soft_limit,
        task_time_limit=hard_limit,
        max_body_bytes=_int(env, "MAX_BODY_BYTES", Settings.max_body_bytes),
        body_read_timeout=_float(env, "BODY_READ_TIMEOUT", Settings.body_read_timeout),
        pool_size=_int(env, "DB_POOL_SIZE", Settings.pool_size),
        stream_pool_size=_int(env, "DB_STREAM_POOL_SIZE", Settings.stream_pool_size),
        max_exports=_int(env, "MAX_EXPORTS", Settings.max_exports),
        statement_timeout=_float(env, "DB_STATEMENT_TIMEOUT", Settings.statement_timeout),
        worker_statement_timeout=_float(
            env, "WORKER_STATEMENT_TIMEOUT", Settings.worker_statement_timeout
        ),
        lock_timeout=_float(env, "DB_LOCK_TIMEOUT", Settings.lock_timeout),
        idle_in_transaction_timeout=_float(
            env, "DB_IDLE_IN_TRANSACTION_TIMEOUT", Settings.idle_in_transaction_timeout
        ),
        db_network=_db_network(env),
        max_followers=_int(env, "MAX_FOLLOWERS", Settings.max_followers),
        events_page_max_bytes=_int(env, "EVENTS_PAGE_MAX_BYTES", Settings.events_page_max_bytes),
        group_commit_below=_int(env, "GROUP_COMMIT_BELOW", Settings.group_commit_below),
        group_commit_max_events=_int(
            env, "GROUP_COMMIT_MAX_EVENTS", Settings.group_commit_max_events
        ),
        group_commit_linger_ms=_float(
            env, "GROUP_COMMIT_LINGER_MS", Settings.group_commit_linger_ms
        ),
        api_tokens=parse_tokens(env.get("API_TOKENS", "")),
        auth_disabled=_flag(env, "AUTH_DISABLED"),
        rate_limit=env.get("RATE_LIMIT", Settings.rate_limit).strip(),
        auth_failure_limit=env.get("AUTH_FAILURE_LIMIT", Settings.auth_failure_limit).strip(),
        proxy_hops=proxy_hops,
        trusted_proxies=trusted_proxies,
        max_large_bodies=_int(env, "MAX_LARGE_BODIES", Settings.max_large_bodies),
        large_body_wait=_float(env, "LARGE_BODY_WAIT", Settings.large_body_wait),
        derive_event_id_topics=_topic_patterns(env, "DERIVE_EVENT_ID_TOPICS"),
        log_level=load_log_level(env),
        liveness_file=env.get("WORKER_LIVENESS_FILE", "").strip(),
        retention_days=retention_days,
        dedup_horizon_days=dedup_horizon_days,
        retention_topic_days=retention_topic_days,
        retention_max_bytes=_max_bytes(env),
        retention_interval=_int(env, "RETENTION_INTERVAL", Settings.retention_interval),
        partitions_ahead=_int(env, "PARTITIONS_AHEAD", Settings.partitions_ahead),
        ledger_retention_days=ledger_days,
        dead_letter_retention_days=dead_letter_days,
        broker_checkpoint_retention_days=checkpoint_days,
    )


def load_metrics_instance(environ: Mapping[str, str] | None = None) -> str:
    """Return METRICS_INSTANCE, or this host's name, to tell hosts' metric files apart.

    Read on its own, at import, because prometheus_client names a process's files
    before any Settings exist. Containers sharing one metrics directory reuse pids
    (each has its own 1, 7, ...); host names are unique per container, except with
    `network_mode: host`, hence the override.
    """
    env = os.environ if environ is None else environ
    raw = env.get("METRICS_INSTANCE", "").strip()
    if raw:
        if not re.fullmatch(r"[A-Za-z0-9.-]+", raw):
            raise SettingsError(f"METRICS_INSTANCE may hold letters, digits, . and -, got {raw!r}")
        return raw
    # prometheus_client splits file names at "_": keep the host name free of it.
    return re.sub(r"[^A-Za-z0-9.-]", "-", socket.gethostname()) or "host"


@dataclass(frozen=True)
class ServerSettings:
    """Gunicorn's options (app/gunicorn_conf.py applies them)."""

    bind: str = "127.0.0.1:8080"
    workers: int = 2
    worker_class: str = "gevent"
    worker_connections: int = 1000
    # Only for worker_class gthread.
    threads: int = 16
    # "-" is stdout; None turns the access log off.
    access_log: str | None = "-"


def load_server_settings(environ: Mapping[str, str] | None = None) -> ServerSettings:
    """Build gunicorn's options from GUNICORN_* and WEB_CONCURRENCY."""
    env = os.environ if environ is None else environ
    return ServerSettings(
        bind=env.get("GUNICORN_BIND") or ServerSettings.bind,
        workers=_int(env, "WEB_CONCURRENCY", ServerSettings.workers),
        worker_class=env.get("GUNICORN_WORKER_CLASS") or ServerSettings.worker_class,
        worker_connections=_int(
            env, "GUNICORN_WORKER_CONNECTIONS", ServerSettings.worker_connections
        ),
        threads=_int(env, "GUNICORN_THREADS", ServerSettings.threads),
        access_log=env.get("GUNICORN_ACCESS_LOG", "-") or None,
    )


def metrics_directory(environ: Mapping[str, str] | None = None) -> str | None:
    """Return PROMETHEUS_MULTIPROC_DIR: where every process writes its metric files, if set.

    prometheus_client reads the variable itself too; this is for our own choices
    (multiprocess file names, the /metrics collector).
    """
    env = os.environ if environ is None else environ
    return env.get("PROMETHEUS_MULTIPROC_DIR") or None
