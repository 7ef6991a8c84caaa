"""Bookkeeping of batches accepted by the API but not yet committed by a worker.

The API records a batch here only after it is on the broker, and a worker
forgets it after its transaction committed. /stats counts a recorded batch as
queued unless the ledger already holds it, so neither order of those two steps
can count a batch twice or leave it out once it is processed.

The record also keeps the batch itself. kombu's Redis transport moves a message
from the queue to its unacked set in two steps, and a worker killed between
them takes the message with it; a batch still recorded long after it was sent
is sent again from here (tasks.resend), and the ledger makes that harmless.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import msgpack
import redis

PENDING_KEY = "aggregator:pending"  # batch id -> number of events
PAYLOAD_KEY = "aggregator:pending:payload"  # batch id -> the events, msgpack
SENT_KEY = "aggregator:pending:sent"  # batch id -> when it was last sent (sorted set)


def record(client: redis.Redis, batch_id: str, events: list[dict[str, Any]]) -> None:
    """Remember that this batch is on the queue, with its events."""
    pipe = client.pipeline(transaction=True)
    pipe.hset(PENDING_KEY, batch_id, len(events))
    pipe.hset(PAYLOAD_KEY, batch_id, msgpack.packb(events))
    pipe.zadd(SENT_KEY, {batch_id: time.time()})
    pipe.execute()


def forget(client: redis.Redis, batch_ids: Iterable[str]) -> None:
    """Drop batches that the ledger holds."""
    ids = list(batch_ids)
    if ids:
        pipe = client.pipeline(transaction=True)
        pipe.hdel(PENDING_KEY, *ids)
        pipe.hdel(PAYLOAD_KEY, *ids)
        pipe.zrem(SENT_KEY, *ids)
        pipe.execute()


def read(client: redis.Redis) -> dict[str, int]:
    """Return every recorded batch id with its size."""
    return {key.decode(): int(value) for key, value in client.hgetall(PENDING_KEY).items()}


def overdue(client: redis.Redis, older_than: float) -> list[str]:
    """Return the batches sent more than older_than seconds ago and still not forgotten."""
    ids = client.zrangebyscore(SENT_KEY, "-inf", time.time() - older_than)
    return [batch_id.decode() for batch_id in ids]


def payload(client: redis.Redis, batch_id: str) -> list[dict[str, Any]] | None:
    """Return a recorded batch's events, or None if it was forgotten meanwhile."""
    packed = client.hget(PAYLOAD_KEY, batch_id)
    return None if packed is None else msgpack.unpackb(packed)


def mark_sent(client: redis.Redis, batch_id: str) -> None:
    """Restart a recorded batch's clock after sending it again."""
    client.zadd(SENT_KEY, {batch_id: time.time()}, xx=True)
