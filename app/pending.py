"""Bookkeeping of batches accepted by the API but not yet committed by a worker.

The API records a batch here only after it is on the broker, and a worker
forgets it after its transaction committed. /stats counts a recorded batch as
queued unless the ledger already holds it, so neither order of those two steps
can count a batch twice or leave it out once it is processed.
"""

from __future__ import annotations

from collections.abc import Iterable

import redis

PENDING_KEY = "aggregator:pending"


def record(client: redis.Redis, batch_id: str, size: int) -> None:
    """Remember that a batch of `size` events is on the queue."""
    client.hset(PENDING_KEY, batch_id, size)


def forget(client: redis.Redis, batch_ids: Iterable[str]) -> None:
    """Drop batches that the ledger holds."""
    ids = list(batch_ids)
    if ids:
        client.hdel(PENDING_KEY, *ids)


def read(client: redis.Redis) -> dict[str, int]:
    """Return every recorded batch id with its size."""
    return {key.decode(): int(value) for key, value in client.hgetall(PENDING_KEY).items()}
