"""Celery settings (lowercase, loaded with config_from_object); values come from app.config."""

from typing import Any

from redis.backoff import NoBackoff
from redis.retry import Retry

from app.config import load_settings
from app.redis_client import database_number
from app.redis_client import keepalive_options

_settings = load_settings()

broker_url = _settings.redis_url
# kombu's Redis transport with fixes for a broker in trouble and leases (tasks/broker.py).
broker_transport = "tasks.broker:Transport"
_sentinel_options: dict[str, Any] = {}
if _settings.broker_sentinels:
    # The same transport, finding the primary through Sentinel. One URL, no
    # alternates (kombu would switch to an alternate by its scheme, dropping
    # our transport): the Sentinels are a transport option. The URL keeps
    # REDIS_URL's credentials and database; its host is not used.
    host, port = _settings.broker_sentinels[0]
    credentials = _settings.redis_url.split("://", 1)[1].rpartition("@")[0]
    broker_url = (
        f"sentinel://{credentials + '@' if credentials else ''}{host}:{port}"
        f"/{database_number(_settings.redis_url)}"
    )
    broker_transport = "tasks.broker:SentinelTransport"
    _sentinel_kwargs: dict[str, Any] = {
        "socket_timeout": _settings.broker_timeout,
        "socket_connect_timeout": _settings.broker_timeout,
        "socket_keepalive": True,
        "socket_keepalive_options": keepalive_options(),
        # One try per Sentinel: redis-py's default retries a silent one (its host gone)
        # three more times before asking the next, and kombu asks them afresh, in the
        # configured order, for every new connection (a heartbeat's included).
        "retry": Retry(NoBackoff(), 0),
    }
    if _settings.broker_sentinel_password:
        _sentinel_kwargs["password"] = _settings.broker_sentinel_password
    _sentinel_options = {
        "master_name": _settings.broker_sentinel_master,
        "sentinels": _settings.broker_sentinels,
        "sentinel_kwargs": _sentinel_kwargs,
    }
broker_connection_retry_on_startup = True
# Workers keep trying to reach the broker for as long as it is away, first
# within a fraction of a second (Celery's own waits are 2, 4, 6 s).
broker_connection_max_retries = None
worker_consumer = "tasks.consumer:QuickReconnectConsumer"
broker_transport_options = {
    # A message held by a worker that died comes back this long after its lease
    # was last renewed (live workers renew theirs, tasks.broker).
    "visibility_timeout": _settings.visibility_timeout,
    "unacked_restore_interval": _settings.restore_interval,
    # Scan on every sweep, so restore_interval alone sets how fast we recover.
    "unacked_restore_throttle": 1,
    # The sweep lock: a worker killed mid-sweep must not block every sweep for
    # 300 s. Safe to keep short: each restore runs in a WATCH transaction.
    "unacked_mutex_expire": 5,
    "socket_connect_timeout": _settings.broker_timeout,
    "socket_keepalive": True,
    # A silent partition (no RST) ends the connection within seconds (app.redis_client).
    "socket_keepalive_options": keepalive_options(),
    "health_check_interval": 10,
    **_sentinel_options,
}
# The API does not publish through Celery (tasks.acceptance pushes the message
# itself); for anyone who does, a dead broker must fail fast, not hang in retries.
task_publish_retry_policy = {
    "max_retries": 1,
    "interval_start": 0,
    "interval_step": 0.1,
    "interval_max": 0.1,
}

# msgpack: half the CPU of json to encode a 500-event task in the API, and
# less to decode in the worker (bench/e2e.py); task arguments stay JSON-shaped.
task_serializer = "msgpack"
accept_content = ["msgpack", "json"]
task_ignore_result = True

# At-least-once delivery: a message is acknowledged only after its batch has
# committed, and a worker killed mid-task hands its message back to the queue.
# The ledger claim comes first, so a redelivered batch costs one statement.
task_acks_late = True
task_reject_on_worker_lost = True
worker_prefetch_multiplier = 1
# A pool process that hangs (or is stopped) holding a batch would keep it for
# ever: its main process goes on renewing the message's lease. At the soft limit
# the task hands its batch back (tasks.ingest); at the hard limit the main
# process kills the pool process and, because acks_on_timeout is off, hands the
# message back instead of acknowledging it (Celery's default acks a timed-out
# task, which with acks_late would drop a batch answered 202). Handing back
# removes the message from the ones this process holds, so its lease stops.
task_soft_time_limit = _settings.task_soft_time_limit
task_time_limit = _settings.task_time_limit
task_acks_on_timeout = False
# A task whose broker connection dropped cannot acknowledge anymore; stop it
# and let redelivery run it again instead of finishing it for nothing.
worker_cancel_long_running_tasks_on_connection_loss = True

worker_hijack_root_logger = True
# Task events cost three broker messages per task; Flower turns them on
# (enable_events) while it watches, so they are only paid for when used.
worker_send_task_events = False
task_send_sent_event = False

# Retention (app.retention): `celery -A tasks:celery_app beat` (or a worker started
# with -B) sends it every RETENTION_INTERVAL; it also keeps daily partitions
# ready when retention is off. An advisory lock lets only one run act at a time.
beat_schedule = {
    "retention": {"task": "tasks.retention.run", "schedule": float(_settings.retention_interval)}
}
