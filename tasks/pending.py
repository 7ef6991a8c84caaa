"""The broker's Redis keys: accepted batches, idempotency records, the broker epoch, kombu's queue.

This is the only module that knows these key names. Every change that must be
all-or-nothing runs as one Lua script: Redis runs a script atomically, and with
`appendfsync always` it writes the script's effects to the AOF and fsyncs before
it answers, so an answer means the whole step is durable. A script that would
grow memory past `maxmemory` is refused at its first write, before it changed
anything, and the scripts check everything else (epoch, idempotency records,
backlog budget) before their first write.

Keys (values in brackets):
- kombu's queue list `celery` [message], its `unacked` hash [delivery tag -> message]
  and `unacked_index` sorted set [delivery tag -> delivery time].
- `aggregator:pending` [batch id -> number of events]: accepted, not yet committed.
- `aggregator:pending:message` [batch id -> the broker message]: the copy kept for resending.
- `aggregator:pending:sent` [batch id -> when it was last put on the queue].
- `aggregator:pending:suspect` [batch id -> when it was first seen neither queued nor held].
- `aggregator:broker` [epoch, seq, accepted_events, backlog_bytes]: who this broker is and
  how far it got; see tasks.broker_state.
- `aggregator:idem:<client>:<key>` ["<fingerprint> <batch id> <events>"], with a TTL.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis

QUEUE_KEY = "celery"  # Celery's default queue; kombu's Redis transport names the list after it.
UNACKED_KEY = "unacked"  # kombu: delivery tag -> message held by a worker
UNACKED_INDEX_KEY = "unacked_index"  # kombu: delivery tag -> when it was delivered
PENDING_KEY = "aggregator:pending"
MESSAGE_KEY = "aggregator:pending:message"
SENT_KEY = "aggregator:pending:sent"
SUSPECT_KEY = "aggregator:pending:suspect"
STATE_KEY = "aggregator:broker"
IDEMPOTENCY_PREFIX = "aggregator:idem:"

# Replaced by "<epoch>:<seq>" inside the acceptance script, so the worker learns
# which acceptance its message was (tasks.messages puts it in a header).
STAMP_PLACEHOLDER = "~aggregator-stamp~"

_ACCEPT = """
local epoch = redis.call('HGET', KEYS[5], 'epoch')
if not epoch then return {'NOEPOCH'} end
local known = {}
for i = 6, #KEYS do
  local record = redis.call('GET', KEYS[i])
  if record then
    known[#known + 1] = tostring(i - 5)
    known[#known + 1] = record
  end
end
if #known > 0 then
  table.insert(known, 1, 'KNOWN')
  return known
end
local size = 2 * string.len(ARGV[2])
local backlog = tonumber(redis.call('HGET', KEYS[5], 'backlog_bytes') or '0')
if backlog > 0 and backlog + size > tonumber(ARGV[5]) then
  return {'FULL', tostring(backlog)}
end
local seq = redis.call('HINCRBY', KEYS[5], 'seq', 1)
local first, last = string.find(ARGV[2], ARGV[7], 1, true)
local message = string.sub(ARGV[2], 1, first - 1) .. epoch .. ':' .. seq
  .. string.sub(ARGV[2], last + 1)
redis.call('LPUSH', KEYS[1], message)
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
redis.call('HSET', KEYS[3], ARGV[1], message)
redis.call('ZADD', KEYS[4], ARGV[4], ARGV[1])
redis.call('HINCRBY', KEYS[5], 'accepted_events', ARGV[3])
redis.call('HINCRBY', KEYS[5], 'backlog_bytes', 2 * string.len(message))
for i = 6, #KEYS do
  redis.call('SET', KEYS[i], ARGV[i + 2], 'EX', ARGV[6])
end
return {'OK', epoch, tostring(seq)}
"""

_FORGET = """
local freed = 0
for _, id in ipairs(ARGV) do
  freed = freed + 2 * redis.call('HSTRLEN', KEYS[2], id)
  redis.call('HDEL', KEYS[1], id)
  redis.call('HDEL', KEYS[2], id)
  redis.call('ZREM', KEYS[3], id)
  redis.call('ZREM', KEYS[5], id)
end
if freed > 0 and redis.call('HEXISTS', KEYS[4], 'backlog_bytes') == 1 then
  redis.call('HINCRBY', KEYS[4], 'backlog_bytes', -freed)
end
return freed
"""

# A batch is resent only on evidence that the broker lost it: its message is
# neither on the queue nor held by a worker, on two sweeps at least
# ARGV[2] seconds apart (a worker between BRPOP and recording the message
# holds it in neither place for a moment).
_RESEND = """
local resent = {}
for i = 3, #ARGV do
  local id = ARGV[i]
  local message = redis.call('HGET', KEYS[3], id)
  if not message then
    redis.call('ZREM', KEYS[4], id)
    redis.call('ZREM', KEYS[5], id)
  elseif redis.call('HEXISTS', KEYS[2], id) == 1 or redis.call('LPOS', KEYS[1], message) then
    redis.call('ZREM', KEYS[5], id)
  else
    local since = redis.call('ZSCORE', KEYS[5], id)
    if not since then
      redis.call('ZADD', KEYS[5], ARGV[1], id)
    elseif tonumber(ARGV[1]) - tonumber(since) >= tonumber(ARGV[2]) then
      redis.call('LPUSH', KEYS[1], message)
      redis.call('ZADD', KEYS[4], ARGV[1], id)
      redis.call('ZREM', KEYS[5], id)
      resent[#resent + 1] = id
    end
  end
end
return resent
"""

_INIT_EPOCH = """
if redis.call('HEXISTS', KEYS[1], 'epoch') == 1 then return 0 end
redis.call('HSET', KEYS[1], 'epoch', ARGV[1])
return 1
"""

_ROTATE_EPOCH = """
if redis.call('HGET', KEYS[1], 'epoch') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'epoch', ARGV[2])
return 1
"""


@dataclass(frozen=True)
class IdempotencyRecord:
    """What the first accepted request with a key was answered."""

    fingerprint: str
    batch_id: str
    accepted: int

    def encode(self) -> str:
        return f"{self.fingerprint} {self.batch_id} {self.accepted}"

    @classmethod
    def decode(cls, raw: bytes | str) -> IdempotencyRecord:
        text = raw.decode() if isinstance(raw, bytes) else raw
        fingerprint, batch_id, accepted = text.split(" ")
        return cls(fingerprint, batch_id, int(accepted))


@dataclass(frozen=True)
class AcceptReply:
    """The acceptance script's answer.

    `status` is "OK" (written; epoch and seq set), "KNOWN" (nothing written:
    `known` maps request positions to the records already there), "FULL"
    (nothing written: the backlog budget is spent) or "NOEPOCH" (nothing
    written: the broker has no epoch, so its state is new or was lost).
    """

    status: str
    epoch: str = ""
    seq: int = 0
    backlog_bytes: int = 0
    known: dict[int, IdempotencyRecord] | None = None


def idempotency_key(client_id: str, key: str) -> str:
    """Return the Redis key of a client's idempotency record."""
    return f"{IDEMPOTENCY_PREFIX}{client_id}:{key}"


class Scripts:
    """The Lua scripts, registered with one client (redis-py loads them by SHA on first use)."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self._accept = client.register_script(_ACCEPT)
        self._forget = client.register_script(_FORGET)
        self._resend = client.register_script(_RESEND)
        self._init_epoch = client.register_script(_INIT_EPOCH)
        self._rotate_epoch = client.register_script(_ROTATE_EPOCH)

    def accept(
        self,
        batch_id: str,
        message: str,
        events: int,
        records: Sequence[tuple[str, IdempotencyRecord]],
        *,
        max_backlog_bytes: int,
        idempotency_ttl: int,
    ) -> AcceptReply:
        """Queue a message and mark its batch pending, with its idempotency records, atomically."""
        keys = [QUEUE_KEY, PENDING_KEY, MESSAGE_KEY, SENT_KEY, STATE_KEY]
        keys += [redis_key for redis_key, _ in records]
        args: list[str | int | float] = [
            batch_id,
            message,
            events,
            time.time(),
            max_backlog_bytes,
            idempotency_ttl,
            STAMP_PLACEHOLDER,
        ]
        args += [record.encode() for _, record in records]
        reply = self._accept(keys=keys, args=args)
        status = reply[0].decode()
        if status == "OK":
            return AcceptReply(status, epoch=reply[1].decode(), seq=int(reply[2]))
        if status == "KNOWN":
            pairs = reply[1:]
            known = {
                int(pairs[i]) - 1: IdempotencyRecord.decode(pairs[i + 1])
                for i in range(0, len(pairs), 2)
            }
            return AcceptReply(status, known=known)
        if status == "FULL":
            return AcceptReply(status, backlog_bytes=int(reply[1]))
        return AcceptReply(status)

    def forget(self, batch_ids: Iterable[str]) -> int:
        """Drop committed batches and their copies; return the backlog bytes freed."""
        ids = list(batch_ids)
        if not ids:
            return 0
        keys = [PENDING_KEY, MESSAGE_KEY, SENT_KEY, STATE_KEY, SUSPECT_KEY]
        return int(self._forget(keys=keys, args=ids))

    def resend_lost(self, batch_ids: Sequence[str], confirm_after: float) -> list[str]:
        """Put back on the queue the batches that the broker lost; return their ids."""
        if not batch_ids:
            return []
        keys = [QUEUE_KEY, UNACKED_KEY, MESSAGE_KEY, SENT_KEY, SUSPECT_KEY]
        reply = self._resend(keys=keys, args=[time.time(), confirm_after, *batch_ids])
        return [batch_id.decode() for batch_id in reply]

    def init_epoch(self, epoch: str) -> bool:
        """Give a broker without state its epoch; False if it has one already."""
        return bool(self._init_epoch(keys=[STATE_KEY], args=[epoch]))

    def rotate_epoch(self, old: str, new: str) -> bool:
        """Replace the epoch, unless someone replaced it first."""
        return bool(self._rotate_epoch(keys=[STATE_KEY], args=[old, new]))


@dataclass(frozen=True)
class BrokerState:
    """The broker's identity and progress, as held in Redis."""

    epoch: str | None
    seq: int
    accepted_events: int
    backlog_bytes: int


def _text(value: Any) -> str:
    # Our clients return bytes (no decode_responses); the redis stubs allow str too.
    return value.decode() if isinstance(value, bytes) else str(value)


def read_state(client: redis.Redis) -> BrokerState:
    """Read the broker's epoch, sequence, accepted events and backlog."""
    epoch, seq, accepted, backlog = client.hmget(
        STATE_KEY, ["epoch", "seq", "accepted_events", "backlog_bytes"]
    )
    return BrokerState(
        _text(epoch) if epoch is not None else None,
        int(seq or 0),
        int(accepted or 0),
        int(backlog or 0),
    )


def read_pending(client: redis.Redis) -> dict[str, int]:
    """Return every accepted, uncommitted batch id with its number of events."""
    return {_text(key): int(value) for key, value in client.hgetall(PENDING_KEY).items()}


def oldest_pending_age(client: redis.Redis) -> float:
    """Seconds since the oldest pending batch was (last) put on the queue; 0 when none."""
    oldest = client.zrange(SENT_KEY, 0, 0, withscores=True)
    return max(0.0, time.time() - float(oldest[0][1])) if oldest else 0.0


def overdue(client: redis.Redis, older_than: float) -> list[str]:
    """Return the pending batches last put on the queue more than older_than seconds ago."""
    ids = client.zrangebyscore(SENT_KEY, "-inf", time.time() - older_than)
    return [_text(batch_id) for batch_id in ids]


@dataclass(frozen=True)
class QueueDepth:
    """Messages on the broker, by state, and batches accepted but not committed."""

    ready: int
    unacked: int
    pending: int


def queue_depth(client: redis.Redis) -> QueueDepth:
    """Count messages waiting, messages held by workers, and pending batches."""
    pipe = client.pipeline(transaction=False)
    pipe.llen(QUEUE_KEY)
    pipe.hlen(UNACKED_KEY)
    pipe.hlen(PENDING_KEY)
    ready, unacked, pending = pipe.execute()
    return QueueDepth(ready, unacked, pending)


def redis_time(client: redis.Redis) -> float:
    """Return Redis's clock, the one every stored time is on."""
    seconds, micros = client.time()
    return seconds + micros / 1_000_000


def refresh_leases(client: redis.Redis, delivery_tags: Sequence[str]) -> float:
    """Mark messages a live worker holds as just delivered; return the Redis time used.

    Delivery times, leases and the sweep that ages them all read Redis's clock, so a
    worker whose own clock is off neither ages others' leases nor keeps its own.
    """
    now = redis_time(client)
    if delivery_tags:
        client.zadd(UNACKED_INDEX_KEY, dict.fromkeys(delivery_tags, now), xx=True)
    return now


def forget_everything(client: redis.Redis) -> None:
    """Delete every key of ours and kombu's (tests start each case from an empty broker)."""
    client.delete(
        QUEUE_KEY,
        UNACKED_KEY,
        UNACKED_INDEX_KEY,
        PENDING_KEY,
        MESSAGE_KEY,
        SENT_KEY,
        SUSPECT_KEY,
    )
    client.hset(STATE_KEY, "backlog_bytes", 0)
