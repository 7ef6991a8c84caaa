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
- `aggregator:pending:sent` [batch id -> when it was last put on the queue, Redis time].
- `aggregator:pending:suspect` [batch id -> when it was first seen neither queued nor held].
- `aggregator:broker` [epoch, seq, accepted_events, allowed_events, run_id, backlog_bytes]:
  who this broker is, how far it got, how far it may go before PostgreSQL hears of it,
  and which Redis process was last checked against PostgreSQL; see tasks.broker_state.
- `aggregator:idempotency` [<client>:<key> -> "<fingerprint> <batch id> <events>"] and
  `aggregator:idempotency:expiry` [<client>:<key> -> when the record expires, Redis time].
  No key of ours has a TTL, so no `volatile-*` eviction policy can drop one: records
  expire through the scripts here, and their number has a budget (a 503 when spent).
- `aggregator:idem:<client>:<key>`: the records of earlier versions (with a TTL), still
  honoured until they expire.

Times stored in Redis are Redis's own (`TIME`), so no host's clock matters.

With replicas required (BROKER_MIN_REPLICAS), Scripts follows acceptance and
the broker check with WAIT on the same connection; a replay and the check
publish on `aggregator:replicated` (a channel nobody reads; the message is
replicated, so the WAIT after it covers everything written before).
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import Any

import redis
from redis.commands.core import Script

QUEUE_KEY = "celery"  # Celery's default queue; kombu's Redis transport names the list after it.
UNACKED_KEY = "unacked"  # kombu: delivery tag -> message held by a worker
UNACKED_INDEX_KEY = "unacked_index"  # kombu: delivery tag -> when it was delivered
PENDING_KEY = "aggregator:pending"
MESSAGE_KEY = "aggregator:pending:message"
SENT_KEY = "aggregator:pending:sent"
SUSPECT_KEY = "aggregator:pending:suspect"
STATE_KEY = "aggregator:broker"
IDEMPOTENCY_KEY = "aggregator:idempotency"
IDEMPOTENCY_EXPIRY_KEY = "aggregator:idempotency:expiry"
LEGACY_IDEMPOTENCY_PREFIX = "aggregator:idem:"

# Replaced by "<epoch>:<seq>" inside the acceptance script, so the worker learns
# which acceptance its message was (tasks.messages puts it in a header).
STAMP_PLACEHOLDER = "~aggregator-stamp~"
STAMP_HEADER = "aggregator_stamp"

# A channel nobody subscribes to: a message published on it inside a script is
# replicated, so a WAIT after a script that otherwise only read (a replay, the
# broker check) waits for everything the primary held when the script ran.
REPLICATION_MARK_CHANNEL = "aggregator:replicated"

# The id of the Redis process running a script: it changes with every start,
# so a broker restarted (or restored, or replaced, or failed over) is known.
_RUN_ID = "string.match(redis.call('INFO', 'server'), 'run_id:(%x+)')"
_NOW = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
"""

# Refusals come before the first write that grows memory, so a refused call
# leaves nothing behind (expired idempotency records aside: clearing them only
# frees memory, which Redis allows even at maxmemory).
_ACCEPT = (
    """
local state = redis.call('HMGET', KEYS[5], 'epoch', 'run_id', 'accepted_events',
  'allowed_events', 'backlog_bytes')
local epoch = state[1]
if not epoch then return {'NOEPOCH'} end
if state[2] ~= """
    + _RUN_ID
    + """ then return {'UNVERIFIED'} end
"""
    + _NOW
    + """
local records = tonumber(ARGV[8])
-- A few more expired records than this call adds, so they keep pace without a sweeper.
local expired = redis.call('ZRANGEBYSCORE', KEYS[7], '-inf', now, 'LIMIT', 0, records + 8)
if #expired > 0 then
  redis.call('HDEL', KEYS[6], unpack(expired))
  redis.call('ZREM', KEYS[7], unpack(expired))
end
local known = {}
for i = 1, records do
  local record = redis.call('HGET', KEYS[6], ARGV[7 + 2 * i]) or redis.call('GET', KEYS[7 + i])
  if record then
    known[#known + 1] = tostring(i)
    known[#known + 1] = record
  end
end
if #known > 0 then
  -- A replay is answered only once its record is on the replicas too: a write
  -- of this call (a message on a channel nobody reads; allowed at maxmemory)
  -- makes the caller's WAIT cover everything written before it.
  if ARGV[9 + 2 * records] ~= '' then redis.call('PUBLISH', ARGV[9 + 2 * records], '') end
  table.insert(known, 1, 'KNOWN')
  return known
end
if records > 0 then
  local held = redis.call('HLEN', KEYS[6])
  if held + records > tonumber(ARGV[7]) then return {'NOROOM', tostring(held)} end
end
local events = tonumber(ARGV[3])
if tonumber(state[3] or '0') + events > tonumber(state[4] or '0') then return {'CHECK'} end
local size = 2 * string.len(ARGV[2])
local backlog = tonumber(state[5] or '0')
if backlog > 0 and backlog + size > tonumber(ARGV[4]) then
  return {'FULL', tostring(backlog)}
end
local seq = redis.call('HINCRBY', KEYS[5], 'seq', 1)
local first, last = string.find(ARGV[2], ARGV[6], 1, true)
local message = string.sub(ARGV[2], 1, first - 1) .. epoch .. ':' .. seq
  .. string.sub(ARGV[2], last + 1)
redis.call('LPUSH', KEYS[1], message)
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
redis.call('HSET', KEYS[3], ARGV[1], message)
redis.call('ZADD', KEYS[4], now, ARGV[1])
redis.call('HINCRBY', KEYS[5], 'accepted_events', events)
redis.call('HINCRBY', KEYS[5], 'backlog_bytes', 2 * string.len(message))
local expires = now + tonumber(ARGV[5])
for i = 1, records do
  redis.call('HSET', KEYS[6], ARGV[7 + 2 * i], ARGV[8 + 2 * i])
  redis.call('ZADD', KEYS[7], expires, ARGV[7 + 2 * i])
end
return {'OK', epoch, tostring(seq)}
"""
)

# The backlog never goes below zero, even after its counter was lost and
# started again while older batches were still pending.
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
  if redis.call('HINCRBY', KEYS[4], 'backlog_bytes', -freed) < 0 then
    redis.call('HSET', KEYS[4], 'backlog_bytes', 0)
  end
end
return freed
"""

# A batch is resent only on evidence that the broker lost it: its message is
# neither on the queue nor held by a worker, on two sweeps at least ARGV[1]
# seconds apart (a worker between BRPOP and recording the message holds it in
# neither place for a moment). Whether it is on the queue comes from the
# caller's scan (queued_batches): one pass over the queue's tail per sweep,
# not a search of the whole queue per batch inside Redis.
_RESEND = (
    _NOW
    + """
local resent = {}
for i = 2, #ARGV, 2 do
  local id = ARGV[i]
  local message = redis.call('HGET', KEYS[3], id)
  if not message then
    redis.call('ZREM', KEYS[4], id)
    redis.call('ZREM', KEYS[5], id)
  elseif ARGV[i + 1] == '1' or redis.call('HEXISTS', KEYS[2], id) == 1 then
    redis.call('ZREM', KEYS[5], id)
  else
    local since = redis.call('ZSCORE', KEYS[5], id)
    if not since then
      redis.call('ZADD', KEYS[5], now, id)
    elseif now - tonumber(since) >= tonumber(ARGV[1]) then
      redis.call('LPUSH', KEYS[1], message)
      redis.call('ZADD', KEYS[4], now, id)
      redis.call('ZREM', KEYS[5], id)
      resent[#resent + 1] = id
    end
  end
end
return resent
"""
)

# One consistent reading for the broker check: identity, progress, allowance,
# and the id of the Redis process answering.
_READ_STATE = (
    """
local state = redis.call('HMGET', KEYS[1], 'epoch', 'seq', 'accepted_events',
  'allowed_events', 'run_id')
state[6] = """
    + _RUN_ID
    + """
-- As in _ACCEPT: a write of this call, so a WAIT after it covers what was read.
if ARGV[1] ~= '' then redis.call('PUBLISH', ARGV[1], '') end
return state
"""
)

# The check's verdict, applied only if the broker is still the one it read
# (same epoch or still none, same Redis process): set the epoch, mark this
# Redis process as checked, and let acceptances run up to ARGV[4] events.
# A broker given a new epoch because its state was gone gets its backlog
# counted again from the copies it still holds.
_SEAL = (
    """
local run = """
    + _RUN_ID
    + """
if run ~= ARGV[3] then return {0} end
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if (epoch or '') ~= ARGV[1] then return {0} end
if not epoch then
  local backlog = 0
  for _, id in ipairs(redis.call('HKEYS', KEYS[2])) do
    backlog = backlog + 2 * redis.call('HSTRLEN', KEYS[2], id)
  end
  redis.call('HSET', KEYS[1], 'backlog_bytes', backlog)
end
local accepted = tonumber(redis.call('HGET', KEYS[1], 'accepted_events') or '0')
local allowed = math.max(tonumber(ARGV[4]), accepted)
redis.call('HSET', KEYS[1], 'epoch', ARGV[2], 'run_id', run, 'allowed_events', allowed,
  'accepted_events', accepted)
return {1, tostring(allowed)}
"""
)

# Clears expired idempotency records when no acceptance does (an idle API).
_EXPIRE = (
    _NOW
    + """
local expired = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
if #expired > 0 then
  redis.call('HDEL', KEYS[1], unpack(expired))
  redis.call('ZREM', KEYS[2], unpack(expired))
end
return #expired
"""
)


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

    `status` is "OK" (written; epoch and seq set), or one of these, with nothing
    written: "KNOWN" (`known` maps request positions to the records already
    there), "FULL" (the backlog budget is spent), "NOROOM" (the idempotency
    records' budget is spent; `held` records), "NOEPOCH" (the broker has no
    epoch: its state is new or was lost), "UNVERIFIED" (this Redis process was
    never checked against PostgreSQL: it restarted, was restored, replaced or
    promoted) or "CHECK" (the batch would take acceptances past what
    PostgreSQL was last told to expect).
    """

    status: str
    epoch: str = ""
    seq: int = 0
    backlog_bytes: int = 0
    held: int = 0
    known: dict[int, IdempotencyRecord] | None = None


def idempotency_field(client_id: str, key: str) -> str:
    """Return the field of a client's idempotency record in the records' hash."""
    return f"{client_id}:{key}"


def idempotency_record(client: redis.Redis, client_id: str, key: str) -> IdempotencyRecord | None:
    """Return the record kept for a client's key, if any (tests and operators)."""
    field = idempotency_field(client_id, key)
    raw = client.hget(IDEMPOTENCY_KEY, field) or client.get(LEGACY_IDEMPOTENCY_PREFIX + field)
    return None if raw is None else IdempotencyRecord.decode(raw)


@dataclass(frozen=True)
class BrokerState:
    """The broker's identity and progress, as held in Redis.

    `run_id` is the Redis process last checked against PostgreSQL, `running`
    the one that answered; they differ after any restart or replacement.
    """

    epoch: str | None
    seq: int
    accepted_events: int
    allowed_events: int = 0
    run_id: str | None = None
    running: str = ""

    @property
    def verified(self) -> bool:
        return self.epoch is not None and self.run_id == self.running


def _text(value: Any) -> str:
    # Our clients return bytes (no decode_responses); the redis stubs allow str too.
    return value.decode() if isinstance(value, bytes) else str(value)


class NotReplicated(redis.exceptions.ConnectionError):
    """Fewer replicas than required confirmed a write in time (WAIT).

    The primary holds the write, but it would not survive a failover: answer
    as when the broker is away (503, retry). A ConnectionError, so every
    caller already treats it so.
    """


def _refused_without_replicas(error: redis.exceptions.ResponseError) -> bool:
    """Say whether a primary refused a write for want of replicas (`min-replicas-to-write`).

    Broker trouble, answered 503 like a WAIT not confirmed.
    """
    return str(error).startswith("NOREPLICAS")


class Scripts:
    """The Lua scripts, registered with one client (redis-py loads them by SHA on first use).

    With `min_replicas`, the scripts whose answer a caller relies on (accept,
    read_state) are followed, on the same connection and in the same round
    trip, by `WAIT min_replicas wait_timeout_ms`, and raise NotReplicated when
    fewer replicas confirm.
    """

    def __init__(
        self, client: redis.Redis, *, min_replicas: int = 0, wait_timeout_ms: int = 0
    ) -> None:
        self.client = client
        self.min_replicas = min_replicas
        self.wait_timeout_ms = wait_timeout_ms
        self._accept = client.register_script(_ACCEPT)
        self._forget = client.register_script(_FORGET)
        self._resend = client.register_script(_RESEND)
        self._read_state = client.register_script(_READ_STATE)
        self._seal = client.register_script(_SEAL)
        self._expire = client.register_script(_EXPIRE)

    def accept(
        self,
        batch_id: str,
        message: str,
        events: int,
        records: Sequence[tuple[str, IdempotencyRecord]],
        *,
        max_backlog_bytes: int,
        idempotency_ttl: int,
        max_idempotency_records: int,
    ) -> AcceptReply:
        """Queue a message and mark its batch pending, with its idempotency records, atomically.

        `records` pairs each record with its field (idempotency_field).
        """
        keys = [
            QUEUE_KEY,
            PENDING_KEY,
            MESSAGE_KEY,
            SENT_KEY,
            STATE_KEY,
            IDEMPOTENCY_KEY,
            IDEMPOTENCY_EXPIRY_KEY,
        ]
        keys += [LEGACY_IDEMPOTENCY_PREFIX + field for field, _ in records]
        args: list[str | int | float] = [
            batch_id,
            message,
            events,
            max_backlog_bytes,
            idempotency_ttl,
            STAMP_PLACEHOLDER,
            max_idempotency_records,
            len(records),
        ]
        for field, record in records:
            args += [field, record.encode()]
        args.append(REPLICATION_MARK_CHANNEL if self.min_replicas else "")
        reply = self._replicated(
            self._accept, keys, args, lambda reply: reply[0] in (b"OK", b"KNOWN")
        )
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
        if status == "NOROOM":
            return AcceptReply(status, held=int(reply[1]))
        return AcceptReply(status)

    def _replicated(
        self, script: Script, keys: list[str], args: list[Any], relied_on: Callable[[Any], bool]
    ) -> Any:
        """Run a script; with min_replicas WAIT after it, raising NotReplicated if too few confirm.

        `relied_on(reply)` says whether the reply is one the caller acts on
        (refusals wrote nothing worth waiting for).
        """
        if not self.min_replicas:
            try:
                return script(keys=keys, args=args)
            except redis.exceptions.ResponseError as exc:
                if _refused_without_replicas(exc):
                    raise NotReplicated(f"the broker refuses writes: {exc}") from exc
                raise
        for _ in range(2):
            # One connection, one round trip: WAIT counts the replicas that
            # hold this connection's writes, the script's included.
            pipe = self.client.pipeline(transaction=False)
            pipe.evalsha(script.sha, len(keys), *keys, *args)
            pipe.execute_command("WAIT", self.min_replicas, self.wait_timeout_ms)
            reply, acks = pipe.execute(raise_on_error=False)
            if isinstance(reply, redis.exceptions.NoScriptError):
                # A promoted replica has no scripts cached: load, then again.
                self.client.script_load(script.script)
                continue
            if isinstance(reply, redis.exceptions.ResponseError) and _refused_without_replicas(
                reply
            ):
                raise NotReplicated(f"the broker refuses writes: {reply}") from reply
            if isinstance(reply, Exception):
                raise reply
            if isinstance(acks, Exception):
                # WAIT refused: this connection reached a replica (a demoted primary).
                self.client.connection_pool.disconnect()
                raise NotReplicated(f"the broker refused WAIT: {acks}")
            if relied_on(reply) and int(acks) < self.min_replicas:
                raise NotReplicated(
                    f"{int(acks)} of {self.min_replicas} replica(s) confirmed the write within"
                    f" {self.wait_timeout_ms} ms"
                )
            return reply
        raise redis.exceptions.NoScriptError("the broker lost the script again")

    def forget(self, batch_ids: Iterable[str]) -> int:
        """Drop committed batches and their copies; return the backlog bytes freed."""
        ids = list(batch_ids)
        if not ids:
            return 0
        keys = [PENDING_KEY, MESSAGE_KEY, SENT_KEY, STATE_KEY, SUSPECT_KEY]
        return int(self._forget(keys=keys, args=ids))

    def resend_lost(
        self, batch_ids: Sequence[str], queued: AbstractSet[str], confirm_after: float
    ) -> list[str]:
        """Put back on the queue the batches that the broker lost; return their ids.

        `queued` holds the batches a scan just found on the queue (queued_batches).
        """
        if not batch_ids:
            return []
        keys = [QUEUE_KEY, UNACKED_KEY, MESSAGE_KEY, SENT_KEY, SUSPECT_KEY]
        args: list[str | float] = [confirm_after]
        for batch_id in batch_ids:
            args += [batch_id, "1" if batch_id in queued else "0"]
        reply = self._resend(keys=keys, args=args)
        return [_text(batch_id) for batch_id in reply]

    def read_state(self) -> BrokerState:
        """Read the broker's identity, progress and allowance in one step."""
        args = [REPLICATION_MARK_CHANNEL if self.min_replicas else ""]
        reply = self._replicated(self._read_state, [STATE_KEY], args, lambda _: True)
        epoch, seq, accepted, allowed, run_id, running = reply
        return BrokerState(
            _text(epoch) if epoch is not None else None,
            int(seq or 0),
            int(accepted or 0),
            int(allowed or 0),
            _text(run_id) if run_id is not None else None,
            _text(running),
        )

    def seal(self, found: BrokerState, epoch: str, allowed_events: int) -> int | None:
        """Apply a check's verdict to the broker it read; return the allowance, None if it moved.

        Sets `epoch` (the same, a new one, or a first one), marks the running
        Redis process as checked and lets acceptances run up to
        `allowed_events` (never below what was accepted already).
        """
        reply = self._seal(
            keys=[STATE_KEY, MESSAGE_KEY],
            args=[found.epoch or "", epoch, found.running, allowed_events],
        )
        return int(reply[1]) if int(reply[0]) else None

    def expire_idempotency(self, limit: int = 1000) -> int:
        """Delete up to `limit` expired idempotency records; return how many."""
        return int(self._expire(keys=[IDEMPOTENCY_KEY, IDEMPOTENCY_EXPIRY_KEY], args=[limit]))


def read_state(client: redis.Redis) -> BrokerState:
    """Read the broker's identity, progress and allowance."""
    return Scripts(client).read_state()


def redis_time(client: redis.Redis) -> float:
    """Return Redis's clock, the one every stored time is on."""
    seconds, micros = client.time()
    return seconds + micros / 1_000_000


def read_pending(client: redis.Redis) -> dict[str, int]:
    """Return every accepted, uncommitted batch id with its number of events."""
    return {_text(key): int(value) for key, value in client.hgetall(PENDING_KEY).items()}


def pending_events(client: redis.Redis, batch_id: str) -> int | None:
    """Return the number of events of a batch accepted and not yet committed, else None."""
    size = client.hget(PENDING_KEY, batch_id)
    return None if size is None else int(size)


def pending_from(client: redis.Redis, epoch: str) -> dict[str, int]:
    """Return the pending batches accepted in `epoch` (their copies carry its stamp), with sizes.

    Reads every copy; for the rare moment a broker's state is found lost.
    """
    pending = read_pending(client)
    marker = f'"{STAMP_HEADER}": "{epoch}:'
    found: dict[str, int] = {}
    for batch_id, message in client.hscan_iter(MESSAGE_KEY, count=100):
        if marker in _text(message) and _text(batch_id) in pending:
            found[_text(batch_id)] = pending[_text(batch_id)]
    return found


def oldest_pending_age(client: redis.Redis) -> float:
    """Seconds since the oldest pending batch was (last) put on the queue; 0 when none."""
    oldest = client.zrange(SENT_KEY, 0, 0, withscores=True)
    return max(0.0, redis_time(client) - float(oldest[0][1])) if oldest else 0.0


def overdue(client: redis.Redis, older_than: float, limit: int = 1000) -> list[str]:
    """Return up to `limit` pending batches last put on the queue over older_than seconds ago."""
    ids = client.zrangebyscore(
        SENT_KEY, "-inf", redis_time(client) - older_than, start=0, num=limit
    )
    return [_text(batch_id) for batch_id in ids]


_DELIVERY_TAG = '"delivery_tag": "'


# One read of the queue's tail returns about this many bytes (one message more at most):
# Redis copies the whole reply while it holds every other client, and a message can be
# as large as a request body (MAX_BODY_BYTES) and more.
SCAN_READ_BYTES = 4 * 1024 * 1024
SCAN_FIRST_READ = 4
SCAN_MAX_READ = 200


def queued_batches(client: redis.Redis, tail: int) -> set[str]:
    """Return the batch ids among the `tail` messages next in line on the queue.

    A message still queued after it was sent has only older (or restored)
    messages ahead of it, so the tail that holds every overdue batch is as long
    as the number of overdue batches. The scan reads ascending positions: pops
    at the tail and pushes at the head only make it see a message twice, never
    miss one that stays queued. Each read is sized from the messages read so far
    to return about SCAN_READ_BYTES, so no read holds Redis long whatever the
    messages weigh (200 messages of a 2 MiB batch each would be a 540 MB reply).
    """
    found: set[str] = set()
    start = max(0, client.llen(QUEUE_KEY) - tail)
    count = SCAN_FIRST_READ
    while True:
        messages = client.lrange(QUEUE_KEY, start, start + count - 1)
        size = 0
        for raw in messages:
            text = _text(raw)
            size += len(raw)
            at = text.rfind(_DELIVERY_TAG)
            if at >= 0:
                begin = at + len(_DELIVERY_TAG)
                found.add(text[begin : text.index('"', begin)])
        if len(messages) < count:
            return found
        start += count
        average = max(1, size // len(messages))
        count = max(1, min(SCAN_MAX_READ, SCAN_READ_BYTES // average))


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


@dataclass(frozen=True)
class BrokerMemory:
    """Redis's memory against its limit, what it evicted, and what our budgets hold."""

    used_bytes: int
    max_bytes: int  # 0: no maxmemory
    policy: str
    evicted_keys: int  # since the Redis process started
    backlog_bytes: int
    idempotency_records: int


def broker_memory(client: redis.Redis) -> BrokerMemory:
    """Read memory, eviction and budget figures (for /metrics and /ready)."""
    pipe = client.pipeline(transaction=False)
    pipe.info("memory")
    pipe.info("stats")
    pipe.hget(STATE_KEY, "backlog_bytes")
    pipe.hlen(IDEMPOTENCY_KEY)
    memory, stats, backlog, records = pipe.execute()
    return BrokerMemory(
        used_bytes=int(memory.get("used_memory", 0)),
        max_bytes=int(memory.get("maxmemory", 0)),
        policy=str(memory.get("maxmemory_policy", "unknown")),
        evicted_keys=int(stats.get("evicted_keys", 0)),
        backlog_bytes=int(backlog or 0),
        idempotency_records=int(records),
    )


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
        IDEMPOTENCY_KEY,
        IDEMPOTENCY_EXPIRY_KEY,
    )
    client.hset(STATE_KEY, "backlog_bytes", 0)
