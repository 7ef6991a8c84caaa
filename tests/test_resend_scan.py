"""The resend sweep's scan of the queue's tail: every queued batch found, no read holds Redis long.

Real messages (the API's own) on a private Redis no worker reads; the client only
records how many bytes each LRANGE returned, since Redis copies the whole reply
while every other client waits.
"""

from __future__ import annotations

from typing import Any

import pytest
import redis

from tasks.messages import build_message
from tasks.pending import QUEUE_KEY
from tasks.pending import SCAN_FIRST_READ
from tasks.pending import SCAN_READ_BYTES
from tasks.pending import queued_batches


class CountingRedis(redis.Redis):
    """A client that notes the size of each LRANGE reply."""

    replies: list[int]

    def lrange(self, *args: Any, **kwargs: Any) -> Any:
        messages = super().lrange(*args, **kwargs)
        self.replies.append(sum(len(message) for message in messages))
        return messages


def counting(broker: redis.Redis) -> CountingRedis:
    where = broker.connection_pool.connection_kwargs
    client = CountingRedis(host=where["host"], port=where["port"], db=where.get("db", 0))
    client.replies = []
    return client


def queue(broker: redis.Redis, ids: list[str], payload_bytes: int) -> int:
    """Push one message per id (first id first in line) carrying about `payload_bytes`.

    Return the largest message's size.
    """
    each = min(payload_bytes, 8000)
    events = [
        {
            "topic": "scan",
            "event_id": str(n),
            "timestamp": "2026-12-05T00:00:00Z",
            "source": "s",
            "payload": {"text": "x" * each},
        }
        for n in range(max(1, payload_bytes // each))
    ]
    largest = 0
    for batch_id in ids:
        message = build_message(batch_id, events)
        largest = max(largest, len(message))
        broker.lpush(QUEUE_KEY, message)  # workers pop from the right: first in line
    return largest


@pytest.mark.parametrize(
    ("messages", "payload_bytes"),
    [(450, 10), (40, 1_000_000)],
    ids=["small-messages", "one-megabyte-messages"],
)
def test_the_scan_finds_every_batch_of_the_tail_in_bounded_reads(
    quiet_broker: redis.Redis, messages: int, payload_bytes: int
) -> None:
    ids = [f"b{n:04d}" for n in range(messages)]
    largest = queue(quiet_broker, ids, payload_bytes)
    client = counting(quiet_broker)
    try:
        # The whole queue, then only the tail: the ones first in line.
        assert queued_batches(client, tail=messages) == set(ids)
        assert queued_batches(client, tail=25) == set(ids[:25])
        assert max(client.replies) <= max(SCAN_READ_BYTES, SCAN_FIRST_READ * largest) + largest
    finally:
        client.close()


def test_large_messages_are_read_a_few_at_a_time(quiet_broker: redis.Redis) -> None:
    largest = queue(quiet_broker, [f"big{n}" for n in range(30)], 1_000_000)
    client = counting(quiet_broker)
    try:
        assert len(queued_batches(client, tail=30)) == 30
    finally:
        client.close()
    # After the first read (a few messages), each returns about SCAN_READ_BYTES, not 200 messages.
    assert all(reply <= SCAN_READ_BYTES + largest for reply in client.replies[1:])
    assert len(client.replies) > 3
