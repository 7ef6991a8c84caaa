"""Tasks that persist published events."""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Any

import orjson
import redis
from celery import Task
from celery.exceptions import Reject
from celery.utils.log import get_task_logger
from structlog.contextvars import bind_contextvars

from app.config import load_settings
from app.instruments import TASK_DURATION
from app.instruments import TASK_OUTCOMES
from app.schemas import MAX_BATCH
from app.schemas import queued_problems
from app.store.ledger import store_exactly_once
from tasks import celery_app
from tasks import get_engine
from tasks import get_scripts
from tasks.messages import STAMP_HEADER
from tasks.messages import parse_stamp

logger = get_task_logger(__name__)
_settings = load_settings()


class Backoff:
    """Waits after consecutive failures in this process: doubling, capped, reset by success."""

    def __init__(self, cap: float, first: float = 0.25) -> None:
        self._cap = cap
        self._first = first
        self._failures = 0
        self._lock = threading.Lock()

    def failed(self) -> float:
        with self._lock:
            self._failures += 1
            return min(self._cap, self._first * 2 ** (self._failures - 1))

    def succeeded(self) -> None:
        with self._lock:
            self._failures = 0


_backoff = Backoff(_settings.retry_backoff_max)
# The most events a task holds: a group closes once it holds
# GROUP_COMMIT_MAX_EVENTS, and a request of MAX_BATCH is a task of its own.
MAX_TASK_EVENTS = _settings.group_commit_max_events + MAX_BATCH
MAX_BATCH_ID = 200


def refusal(batch_id: Any, events: Any) -> str | None:
    """Say why a task's arguments are not what the API queues, or return None."""
    if type(batch_id) is not str or not 1 <= len(batch_id) <= MAX_BATCH_ID:
        return f"batch id must be 1 to {MAX_BATCH_ID} characters"
    problems = queued_problems(events, MAX_TASK_EVENTS)
    if not problems:
        return None
    return orjson.dumps(problems, default=repr, option=orjson.OPT_NON_STR_KEYS).decode()[:2000]


# No Celery retry: a retry publishes a new message, and when that publish fails
# Celery deletes the original (Reject with requeue=False), losing a batch that
# was answered 202. Instead, any failure waits out a capped backoff here and
# hands the same message back to the queue; data the database refuses is
# dead-lettered inside store_exactly_once, so what is left (database or network down,
# a deploy in progress) is worth waiting out. If even the hand-back fails, the
# message stays in kombu's unacked hash and comes back after the visibility timeout.
@celery_app.task(name="tasks.ingest.store_batch", bind=True)
def store_batch(self: Task, batch_id: str, events: list[dict[str, Any]]) -> None:
    """Store one accepted batch exactly once."""
    # Every line below (and Celery's own for this task) carries the batch id as a field.
    bind_contextvars(batch_id=batch_id)
    # A second layer behind the API's validation: a task queued some other way
    # (Flower, anyone with the broker's password) is refused whole, never stored.
    reason = refusal(batch_id, events)
    if reason is not None:
        logger.error("batch %r refused, nothing stored: %s", batch_id, reason)
        if type(batch_id) is str:
            # Accepted by an API of another version, it would wait as queued forever.
            with contextlib.suppress(redis.RedisError):
                get_scripts().forget([batch_id])
        return
    epoch, seq = parse_stamp(self.request.get(STAMP_HEADER))
    try:
        with TASK_DURATION.time():
            outcome = store_exactly_once(get_engine(), batch_id, events, epoch=epoch, seq=seq)
    except Exception as exc:
        wait = _backoff.failed()
        logger.warning(
            "batch %s not stored (%s: %s); back on the queue in %.2f s",
            batch_id,
            type(exc).__name__,
            str(exc).splitlines()[0] if str(exc) else "",
            wait,
        )
        time.sleep(wait)
        raise Reject(f"{type(exc).__name__}", requeue=True) from None
    _backoff.succeeded()
    if not outcome.replayed:
        TASK_OUTCOMES.labels("stored").inc(outcome.stored)
        TASK_OUTCOMES.labels("duplicate").inc(outcome.duplicates)
        TASK_OUTCOMES.labels("failed").inc(outcome.failed)
    try:
        get_scripts().forget([batch_id])
    except redis.RedisError:
        # The resend sweep recognises a committed batch by its ledger row and forgets it.
        logger.warning("batch %s committed; could not clear its pending mark", batch_id)
    logger.info(
        "batch %s received=%d stored=%d duplicates=%d failed=%d replayed=%s",
        batch_id,
        outcome.received,
        outcome.stored,
        outcome.duplicates,
        outcome.failed,
        outcome.replayed,
        extra={
            "received": outcome.received,
            "stored": outcome.stored,
            "duplicates": outcome.duplicates,
            "failed": outcome.failed,
            "replayed": outcome.replayed,
        },
    )
