"""Tasks that persist published events."""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Any

import orjson
import redis
from billiard.einfo import ExceptionInfo
from billiard.einfo import ExceptionWithTraceback
from celery import Task
from celery.exceptions import Reject
from celery.exceptions import SoftTimeLimitExceeded
from celery.utils.log import get_task_logger
from celery.worker.request import Request
from structlog.contextvars import bind_contextvars

from app.config import load_settings
from app.instruments import TASK_DURATION
from app.instruments import TASK_OUTCOMES
from app.schemas import MAX_BATCH
from app.schemas import MAX_BATCH_ID
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


def refusal(batch_id: Any, events: Any) -> str | None:
    """Say why a task's arguments are not what the API queues, or return None."""
    if type(batch_id) is not str or not 1 <= len(batch_id) <= MAX_BATCH_ID:
        return f"batch id must be 1 to {MAX_BATCH_ID} characters"
    problems = queued_problems(events, MAX_TASK_EVENTS)
    if not problems:
        return None
    return orjson.dumps(problems, default=repr, option=orjson.OPT_NON_STR_KEYS).decode()[:2000]


class HandBackOnSoftLimit(Request):
    """Celery's request, handing the message back when the soft time limit strikes anywhere.

    Celery counts SoftTimeLimitExceeded as a failure and acknowledges the message.
    store_batch turns it into a hand-back itself, but the limit can also strike in
    Celery's own code around the task (measured: while it recorded the task's
    Reject), where only this, in the worker's main process, can still hand it back.
    """

    def on_failure(
        self, exc_info: ExceptionInfo, send_failed_event: bool = True, return_ok: bool = False
    ) -> None:
        exc = exc_info.exception
        if isinstance(exc, ExceptionWithTraceback):
            exc = exc.exc
        if isinstance(exc, SoftTimeLimitExceeded):
            logger.warning("task %s hit the soft time limit; back on the queue", self.id)
            try:
                raise Reject("SoftTimeLimitExceeded", requeue=True)
            except Reject:
                exc_info = ExceptionInfo()
        super().on_failure(exc_info, send_failed_event=send_failed_event, return_ok=return_ok)


class StoreTask(Task):
    """The task class of store_batch (Celery's documented way to give it its own request)."""

    Request = HandBackOnSoftLimit


# No Celery retry: a retry publishes a new message, and when that publish fails
# Celery deletes the original (Reject with requeue=False), losing a batch that
# was answered 202. Instead, any failure waits out a capped backoff here and
# hands the same message back to the queue; data the database refuses is
# dead-lettered inside store_exactly_once, so what is left (database or network down,
# a deploy in progress) is worth waiting out. If even the hand-back fails, the
# message stays in kombu's unacked hash and comes back after the visibility timeout.
@celery_app.task(name="tasks.ingest.store_batch", bind=True, base=StoreTask)
def store_batch(self: Task, batch_id: str, events: list[dict[str, Any]]) -> None:
    """Store one accepted batch exactly once."""
    # Every line below (and Celery's own for this task) carries the batch id as a field.
    bind_contextvars(batch_id=batch_id)
    try:
        _store(batch_id, events, self.request.get(STAMP_HEADER))
    except SoftTimeLimitExceeded:
        # The soft time limit can strike anywhere, the backoff wait included.
        # Left to Celery it would count as a failure and acknowledge the message;
        # the transaction has rolled back (or committed, and a copy then costs one
        # statement), so the batch goes back to the queue at once.
        logger.warning("batch %s hit the soft time limit; back on the queue", batch_id)
        raise Reject("SoftTimeLimitExceeded", requeue=True) from None


def _store(batch_id: str, events: list[dict[str, Any]], stamp: str | None) -> None:
    """Store the batch once, or wait out a failure and hand it back to the queue."""
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
    epoch, seq = parse_stamp(stamp)
    try:
        with TASK_DURATION.time():
            outcome = store_exactly_once(get_engine(), batch_id, events, epoch=epoch, seq=seq)
    except SoftTimeLimitExceeded:
        raise  # Not an outage: no backoff (store_batch hands the batch back).
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
