"""Per-client rate budgets shared by every process, over a sliding window.

A budget is `amount` units per `period` seconds, in any period: the window is
cut into `SLICES` slices and a charge counts against the current slice and the
`SLICES` before it (so the window is always at least one period long, and a
client that spends steadily can count on about SLICES / (SLICES + 1) of its
amount, 95%).

Processes share a client's spending through Redis without a round trip per
request: each process counts locally, and a background thread of the process,
every `sync_interval` seconds, adds what each client spent here since the last
sync to the client's slice counters in Redis and reads back the whole window
(one pipeline for all clients that spent). Between two syncs a process admits
locally at most its share of what the window had left at its last sync, and
all processes' shares together are at most `LOCAL_SHARE` (5%) of the budget:
the live processes of a budget register at every sync, and each takes its
part. A charge above that share (a large batch, or a client spending fast)
reserves its cost in Redis first, one round trip. What no process knows of yet
is then at most those shares, so the budget holds across processes to within
about 5% however late the syncs (`python -m bench.ratelimit` measures it), and
a stalled or lost Redis only stops the sharing: each process then keeps to the
budget on its own.

Owns the Redis keys `aggregator:rate:<budget name>:<client>:<slice>` and
`aggregator:rate:<budget name>:processes`.
"""

from __future__ import annotations

import math
import os
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from dataclasses import field

import redis
from limits import parse

KEY_PREFIX = "aggregator:rate:"
# Slices per period: the window's granularity (a period of 1 s moves in 50 ms steps).
SLICES = 20
# Clients remembered per process before idle ones are dropped.
MAX_TRACKED = 10_000
# A process that has not synced for this many sync intervals no longer counts as live;
# an idle process (no client charged) still registers every HEARTBEAT_ROUNDS syncs.
LIVE_INTERVALS = 40
HEARTBEAT_ROUNDS = 10
# The part of a budget all processes together may admit between two syncs
# without asking Redis (the rest is reserved in Redis first).
LOCAL_SHARE = 0.05


@dataclass
class _Slice:
    shared: int = 0  # the slice's total in Redis at the last sync, ours included
    sending: int = 0  # spent here, on its way to Redis
    unsent: int = 0  # spent here since the last sync

    def total(self) -> int:
        return self.shared + self.sending + self.unsent


@dataclass
class _Client:
    slices: dict[int, _Slice] = field(default_factory=dict)
    # What this process may admit without asking Redis, valid for one sync round.
    allowance: float = 0.0
    allowance_round: int = -1
    since_sync: int = 0
    # Charged since the last sync: the next sync refreshes this client's view.
    active: bool = False


class RateBudget:
    """`amount` units per client in any `period` seconds, shared by processes through Redis."""

    def __init__(
        self,
        client: redis.Redis,
        amount: int,
        period: int,
        sync_interval: float = 0.05,
        clock: Callable[[], float] = time.time,
        name: str = "budget",
    ) -> None:
        self._redis = client
        self._key_prefix = f"{KEY_PREFIX}{name}:"
        self._processes_key = f"{KEY_PREFIX}{name}:processes"
        self._process_id = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.amount = amount
        self.period = period
        self._width = period / SLICES
        self._sync_interval = sync_interval
        self._clock = clock
        self._clients: dict[str, _Client] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._round = 0
        self._idle_rounds = 0
        self._processes = 1

    @classmethod
    def from_notation(cls, client: redis.Redis, notation: str, name: str) -> RateBudget:
        """Build from a rate such as "5000 per second" or "5 per 2 seconds"."""
        item = parse(notation)
        return cls(client, item.amount, item.get_expiry(), name=name)

    def describe(self) -> str:
        """Say the budget in words, for refusals."""
        return f"{self.amount} per {self.period} s"

    def charge(self, client_id: str, cost: int = 1) -> float | None:
        """Spend `cost` of the client's budget; return None, or seconds to wait when refused.

        A cost larger than the whole budget can never pass: callers refuse it
        first, naming the budget.
        """
        now = self._clock()
        current = self._slice_of(now)
        with self._lock:
            client = self._client(client_id, current)
            client.active = True
            spent = self._spent(client, current)
            if spent + cost > self.amount:
                return self._wait(client, current, now, cost)
            if client.allowance_round == self._round and (
                client.since_sync + cost <= client.allowance
            ):
                client.slices.setdefault(current, _Slice()).unsent += cost
                client.since_sync += cost
                return None
        return self._reserve(client_id, cost, now, current)

    def exhausted(self, client_id: str) -> float | None:
        """Return seconds to wait if the client has spent its whole budget, else None."""
        now = self._clock()
        current = self._slice_of(now)
        with self._lock:
            client = self._client(client_id, current)
            if self._spent(client, current) < self.amount:
                return None
            return self._wait(client, current, now, 1)

    def start_syncing(self) -> None:
        """Sync in a background thread of this process (create_app runs after gunicorn's fork)."""
        if self._thread is not None:  # _run never returns
            return
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="rate-sync", daemon=True)
                self._thread.start()

    def sync(self) -> None:
        """Send what was spent here since the last sync and learn every process's spending."""
        now = self._clock()
        current = self._slice_of(now)
        with self._lock:
            active = [
                (client_id, client, self._take_unsent(client))
                for client_id, client in self._clients.items()
                if client.active
            ]
            for _, client, _ in active:
                client.active = False
        self._idle_rounds = 0 if active else self._idle_rounds + 1
        if not active and self._idle_rounds % HEARTBEAT_ROUNDS:
            return
        pipe = self._redis.pipeline(transaction=False)
        pipe.zadd(self._processes_key, {self._process_id: now})
        live_for = LIVE_INTERVALS * self._sync_interval
        pipe.zremrangebyscore(self._processes_key, "-inf", now - live_for)
        pipe.zcard(self._processes_key)
        pipe.expire(self._processes_key, math.ceil(live_for) + 1)
        for client_id, _, taken in active:
            for index, units in taken.items():
                pipe.incrby(self._key(client_id, index), units)
                pipe.expire(self._key(client_id, index), self._ttl())
            pipe.mget(self._window_keys(client_id, current))
        try:
            replies = pipe.execute()
        except redis.RedisError:
            # Redis away: keep counting locally (what was taken is spent all the same).
            with self._lock:
                for _, client, taken in active:
                    for index, units in taken.items():
                        slot = client.slices.setdefault(index, _Slice())
                        slot.sending -= units
                        slot.unsent += units
                    client.active = True
                    client.allowance = max(0.0, self.amount - self._spent(client, current))
                    client.allowance_round = self._round + 1
                    client.since_sync = 0
                self._round += 1
            return
        processes = max(1, int(replies[2]))
        position = 4
        with self._lock:
            self._processes = processes
            for _, client, taken in active:
                position += 2 * len(taken)
                totals = replies[position]
                position += 1
                for index, units in taken.items():
                    client.slices.setdefault(index, _Slice()).sending -= units
                self._learn(client, current, totals)
                # Charges made during the round trip count against the new share.
                client.since_sync = sum(s.unsent for s in client.slices.values())
                remaining = self.amount - self._spent(client, current) + client.since_sync
                client.allowance = self._share(remaining, processes)
                client.allowance_round = self._round + 1
            self._round += 1

    def _share(self, remaining: int, processes: int) -> float:
        # What others admit locally is what no process knows of yet: keeping the
        # sum of every process's share to a small part of the budget keeps the
        # overshoot to that part, however late the syncs. A process that has
        # not yet seen the others register takes a share as if alone: still
        # small.
        return max(0, min(remaining, self.amount * LOCAL_SHARE)) / processes

    def _reserve(self, client_id: str, cost: int, now: float, current: int) -> float | None:
        """Spend `cost` in Redis first: for charges above this process's share."""
        key = self._key(client_id, current)
        pipe = self._redis.pipeline(transaction=False)
        pipe.incrby(key, cost)
        pipe.expire(key, self._ttl())
        pipe.mget(self._window_keys(client_id, current))
        try:
            _, _, totals = pipe.execute()
        except redis.RedisError:
            # Redis away: decide on what this process knows.
            with self._lock:
                client = self._client(client_id, current)
                if self._spent(client, current) + cost > self.amount:
                    return self._wait(client, current, now, cost)
                client.slices.setdefault(current, _Slice()).unsent += cost
                return None
        with self._lock:
            client = self._client(client_id, current)
            self._learn(client, current, totals)
            if self._spent(client, current) <= self.amount:
                # The round trip may have crossed into a later slice (a busy
                # process resumes this greenlet late): move the cost there, so it
                # leaves the window no earlier than the request it admitted.
                later = self._slice_of(self._clock())
                if later != current:
                    client.slices[current].unsent -= cost
                    client.slices.setdefault(later, _Slice()).unsent += cost
                    client.active = True
                return None
        try:
            self._redis.decrby(key, cost)
        except redis.RedisError:
            pass  # Counted as spent: refusing too much is the safe side.
        with self._lock:
            client = self._client(client_id, current)
            slot = client.slices.get(current)
            if slot is not None:
                slot.shared = max(0, slot.shared - cost)
            return self._wait(client, current, now, cost)

    def _learn(self, client: _Client, current: int, totals: list[bytes | None]) -> None:
        for index, total in zip(self._window(current), totals, strict=True):
            if total is None:
                continue
            # Units on their way here may be in the total already: counting them
            # twice until the sync's reply errs on the side of refusing.
            slot = client.slices.setdefault(index, _Slice())
            slot.shared = max(slot.shared, int(total))

    def _take_unsent(self, client: _Client) -> dict[int, int]:
        taken = {}
        for index, slot in client.slices.items():
            if slot.unsent:
                taken[index] = slot.unsent
                slot.sending += slot.unsent
                slot.unsent = 0
        return taken

    def _run(self) -> None:
        while True:
            time.sleep(self._sync_interval)
            try:
                self.sync()
            except Exception:  # Never let the limiter's thread die; the next round retries.
                continue

    def _slice_of(self, now: float) -> int:
        return int(now // self._width)

    def _window(self, current: int) -> range:
        return range(current - SLICES, current + 1)

    def _window_keys(self, client_id: str, current: int) -> list[str]:
        return [self._key(client_id, index) for index in self._window(current)]

    def _key(self, client_id: str, index: int) -> str:
        return f"{self._key_prefix}{client_id}:{index}"

    def _ttl(self) -> int:
        return math.ceil(self.period + 2 * self._width) + 1

    def _spent(self, client: _Client, current: int) -> int:
        oldest = current - SLICES
        return sum(slot.total() for index, slot in client.slices.items() if index >= oldest)

    def _wait(self, client: _Client, current: int, now: float, cost: int) -> float:
        """Seconds until enough of the oldest slices leave the window for `cost` to fit."""
        oldest = current - SLICES
        excess = self._spent(client, current) + cost - self.amount
        for index in sorted(i for i in client.slices if i >= oldest):
            excess -= client.slices[index].total()
            if excess <= 0:
                # Slice `index` leaves the window when slice index + SLICES + 1 begins.
                return max(1.0, math.ceil((index + SLICES + 1) * self._width - now))
        return float(max(1, math.ceil(self.period)))

    def _client(self, client_id: str, current: int) -> _Client:
        client = self._clients.get(client_id)
        if client is None:
            if len(self._clients) >= MAX_TRACKED:
                self._clients = {
                    key: known
                    for key, known in self._clients.items()
                    if any(index >= current - SLICES for index in known.slices)
                }
            client = self._clients[client_id] = _Client()
        else:
            stale = [index for index in client.slices if index < current - SLICES]
            for index in stale:
                if not client.slices[index].sending and not client.slices[index].unsent:
                    del client.slices[index]
        return client
