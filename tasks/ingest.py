"""Tasks that persist published events."""

from __future__ import annotations

from typing import Any

import redis
from celery.utils.log import get_task_logger

from app import pending
from app.config import load_settings
from app.metrics import TASK_DURATION
from app.metrics import TASK_OUTCOMES
from app.store import run_in_transaction
from app.store import store_batch as store_batch_in
from tasks import celery_app
from tasks import get_engine
from tasks import get_redis

logger = get_task_logger(__name__)
_settings = load_settings()


# Any failure is retried with capped backoff and never acknowledged as done:
# data the database refuses is dead-lettered inside store_batch, so what is
# left (database or network down, a deploy in progress) is worth waiting out.
@celery_app.task(
    name="tasks.ingest.store_batch",
    autoretry_for=(Exception,),
    retry_backoff=True,
    retry_backoff_max=_settings.retry_backoff_max,
    retry_jitter=True,
    max_retries=None,
)
def store_batch(batch_id: str, events: list[dict[str, Any]]) -> None:
    """Store one accepted batch exactly once."""
    with TASK_DURATION.time():
        outcome = run_in_transaction(
            get_engine(), lambda conn: store_batch_in(conn, batch_id, events)
        )
    if not outcome.replayed:
        TASK_OUTCOMES.labels("stored").inc(outcome.stored)
        TASK_OUTCOMES.labels("duplicate").inc(outcome.duplicates)
        TASK_OUTCOMES.labels("failed").inc(outcome.failed)
    try:
        pending.forget(get_redis(), [batch_id])
    except redis.RedisError:
        # /stats recognises a committed batch by its ledger row and cleans up.
        logger.warning("batch %s committed; could not clear its pending mark", batch_id)
    logger.info(
        "batch %s received=%d stored=%d duplicates=%d failed=%d replayed=%s",
        batch_id,
        outcome.received,
        outcome.stored,
        outcome.duplicates,
        outcome.failed,
        outcome.replayed,
    )
