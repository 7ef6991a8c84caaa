"""Rate budgets over a sliding window, shared by processes through a real Redis; a test clock."""

from __future__ import annotations

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from app.ratelimit import KEY_PREFIX
from app.ratelimit import SLICES
from app.ratelimit import RateBudget
from scripts.stack import wait_until


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def budget(client: redis.Redis, clock: Clock, amount: int = 10, period: int = 1) -> RateBudget:
    # No background thread: each test calls sync() where a process's thread would.
    return RateBudget(client, amount, period, clock=clock)


def unreachable() -> redis.Redis:
    # No retries: redis-py's default would take seconds to give up.
    return redis.Redis(port=1, socket_connect_timeout=0.2, retry=Retry(NoBackoff(), 0))


def stored(client: redis.Redis, client_id: str = "a") -> int:
    """Sum every slice counter of one client in Redis."""
    keys = list(client.scan_iter(f"{KEY_PREFIX}budget:{client_id}:*"))
    return sum(int(value) for value in client.mget(keys) if value is not None) if keys else 0


def test_a_client_gets_its_amount_in_any_period_then_a_wait(quiet_broker: redis.Redis) -> None:
    clock = Clock(1_000_000.25)
    limiter = budget(quiet_broker, clock, amount=5, period=2)
    assert [limiter.charge("a") for _ in range(5)] == [None] * 5
    wait = limiter.charge("a")
    assert wait is not None and 2 <= wait <= 3  # until what was spent at .25 leaves the window
    assert limiter.charge("b") is None  # another client has its own budget
    clock.now += 1.9
    assert limiter.charge("a") is not None  # still within 2 s of the spending
    clock.now += 0.3
    assert limiter.charge("a") is None


def test_a_window_boundary_does_not_double_the_budget(quiet_broker: redis.Redis) -> None:
    # Fixed windows let a client spend its budget at the end of one window and
    # again at the start of the next: twice the budget within one second.
    clock = Clock(1_000_000.9)
    limiter = budget(quiet_broker, clock, amount=10)
    assert all(limiter.charge("a") is None for _ in range(10))
    clock.now = 1_000_001.05
    assert limiter.charge("a") is not None
    clock.now = 1_000_001.95
    assert limiter.charge("a") is None


def test_processes_share_one_budget_through_redis(quiet_broker: redis.Redis) -> None:
    clock = Clock()
    first, second = budget(quiet_broker, clock), budget(quiet_broker, clock)
    admitted = 0
    for _ in range(12):
        for limiter in (first, second):
            admitted += limiter.charge("a") is None
        first.sync()
        second.sync()
    assert admitted == 10
    assert stored(quiet_broker) == 10


def test_small_charges_are_admitted_locally_between_syncs(quiet_broker: redis.Redis) -> None:
    clock = Clock()
    limiter = budget(quiet_broker, clock, amount=100_000)
    assert limiter.charge("a") is None  # reserved in Redis: nothing known yet
    limiter.sync()  # learns the window and takes its share (at most 5% of the budget)
    assert stored(quiet_broker) == 1
    assert all(limiter.charge("a") is None for _ in range(100))
    assert stored(quiet_broker) == 1  # not sent yet: no round trip per charge
    limiter.sync()
    assert stored(quiet_broker) == 101


def test_a_charge_above_the_local_share_is_reserved_in_redis_first(
    quiet_broker: redis.Redis,
) -> None:
    clock = Clock()
    first = budget(quiet_broker, clock, amount=1000)
    second = budget(quiet_broker, clock, amount=1000)
    first.charge("a")
    second.charge("a")
    first.sync()
    second.sync()
    assert first.charge("a", cost=600) is None
    assert stored(quiet_broker) == 602  # there before the charge returned
    assert second.charge("a", cost=600) is not None  # the other process sees it at once
    assert second.charge("a", cost=398) is None
    assert stored(quiet_broker) == 1000


def test_a_sync_under_way_still_counts_what_it_carries(quiet_broker: redis.Redis) -> None:
    clock = Clock()
    limiter = budget(quiet_broker, clock, amount=100)
    limiter.charge("a")
    limiter.sync()  # a local share of 5
    assert all(limiter.charge("a") is None for _ in range(5))
    stalled = unreachable()
    limiter._redis = stalled  # the sync fails: what it carried is spent all the same
    limiter.sync()
    assert limiter.charge("a", cost=95) is not None
    limiter._redis = quiet_broker
    limiter.sync()
    assert stored(quiet_broker) == 6
    assert limiter.charge("a", cost=94) is None


def test_weighted_charges(quiet_broker: redis.Redis) -> None:
    clock = Clock()
    limiter = budget(quiet_broker, clock, amount=10)
    assert limiter.charge("a", cost=8) is None
    assert limiter.charge("a", cost=3) is not None
    assert limiter.charge("a", cost=2) is None
    clock.now += 2
    assert limiter.charge("a", cost=50) is not None  # never fits: callers refuse it first


def test_keys_expire_with_their_window(quiet_broker: redis.Redis) -> None:
    clock = Clock()
    limiter = budget(quiet_broker, clock, amount=10, period=5)
    limiter.charge("a")
    (key,) = quiet_broker.scan_iter(f"{KEY_PREFIX}budget:a:*")
    assert 5 < quiet_broker.ttl(key) <= 5 + 2 * 5 / SLICES + 2


def test_without_redis_the_budget_is_kept_locally_and_charging_never_waits(
    quiet_broker: redis.Redis,
) -> None:
    clock = Clock()
    limiter = budget(unreachable(), clock, amount=3)
    limiter.sync()
    assert [limiter.charge("a") for _ in range(4)][-1] is not None


def test_the_background_thread_shares_the_budget(quiet_broker: redis.Redis) -> None:
    limiter = RateBudget(quiet_broker, 1_000_000, 60, sync_interval=0.01)
    limiter.start_syncing()
    limiter.charge("bg", cost=5)
    limiter.charge("bg", cost=5)
    wait_until(lambda: stored(quiet_broker, "bg") == 10, timeout=5)
    wait_until(lambda: quiet_broker.zcard(f"{KEY_PREFIX}budget:processes") == 1, timeout=5)
