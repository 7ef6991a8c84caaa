"""Putting accepted batches on the broker."""

from __future__ import annotations

import logging
import uuid
from typing import Any

import redis

from app import pending
from tasks.ingest import store_batch

logger = logging.getLogger(__name__)


def enqueue(client: redis.Redis, events: list[dict[str, Any]]) -> str:
    """Send one batch to the workers as one task; raise if the broker did not take it."""
    batch_id = uuid.uuid4().hex
    # The task id is the batch id, so Flower and the ledger name the same thing.
    store_batch.apply_async(args=(batch_id, events), task_id=batch_id)
    try:
        pending.record(client, batch_id, len(events))
    except redis.RedisError:
        # The batch is on the queue and will be stored and counted; only the
        # queued figure of /stats misses it until then. 202 is still the truth.
        logger.warning("batch %s enqueued; could not mark it pending", batch_id)
    return batch_id
