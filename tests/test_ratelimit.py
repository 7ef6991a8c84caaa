"""Rate budgets shared by processes through a real Redis, with a clock the test moves."""

from __future__ import annotations

import time

import redis

from app.ratelimit import KEY_PREFIX
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


def test_a_client_gets_its_amount_per_window_then_a_wait_until_the_next(
    quiet_broker: redis.Redis,
) -> None:
    clock = Clock(1_000_000.25)
    limiter = budget(quiet_broker, clock, amount=5, period=2)
    assert [limiter.charge("a") for _ in range(5)] == [None] * 5
    assert limiter.charge("a") == 2  # the window ends at 1,000,002
    assert limiter.charge("b") is None  # another client has its own budget
    clock.now = 1_000_002.0
    assert limiter.charge("a") is None


def test_processes_share_one_budget_through_redis(quiet_broker: redis.Redis) -> None:
    clock = Clock()
    first, second = budget(quiet_broker, clock), budget(quiet_broker, clock)
    for _ in range(6):
        assert first.charge("a") is None
    first.sync()  # sends its 6
    assert first.charge("a") is None  # a 7th, not sent yet
    second.sync()  # nothing spent there yet: nothing to learn either
    assert second.charge("a") is None
    second.sync()  # sends 1, learns 6 + 1
    # It spends the rest as it knows it; the unsent 7th of the other process is
    # the overshoot one sync interval allows.
    assert [second.charge("a") for _ in range(4)] == [None] * 3 + [1]
    second.sync()  # sends 3: 10 in Redis
    first.sync()  # sends its 1, learns 11
    assert first.charge("a") is not None
    assert second.charge("a") is not None
    assert int(quiet_broker.get(f"{KEY_PREFIX}budget:a:1000000")) == 11  # type: ignore[arg-type]


def test_a_sync_under_way_still_counts_what_it_carries(quiet_broker: redis.Redis) -> None:
    clock = Clock()
    limiter = budget(quiet_broker, clock, amount=3)
    for _ in range(3):
        limiter.charge("a")
    stalled = redis.Redis(port=1, socket_connect_timeout=0.2)
    limiter._redis = stalled  # the sync fails: what it carried is spent all the same
    limiter.sync()
    assert limiter.charge("a") is not None
    limiter._redis = quiet_broker
    limiter.sync()
    assert int(quiet_broker.get(f"{KEY_PREFIX}budget:a:1000000")) == 3  # type: ignore[arg-type]


def test_within_a_sync_interval_a_process_admits_no_more_than_the_budget(
    quiet_broker: redis.Redis,
) -> None:
    clock = Clock()
    limiter = budget(quiet_broker, clock, amount=10)
    admitted = sum(limiter.charge("a") is None for _ in range(50))
    assert admitted == 10


def test_weighted_charges_and_one_larger_than_the_budget(quiet_broker: redis.Redis) -> None:
    clock = Clock()
    limiter = budget(quiet_broker, clock, amount=10)
    assert limiter.charge("a", cost=8) is None
    assert limiter.charge("a", cost=3) is not None
    assert limiter.charge("a", cost=2) is None
    clock.now += 1
    # Larger than the whole budget: it passes only into an unused window.
    assert limiter.charge("a", cost=50) is None
    assert limiter.charge("a", cost=1) is not None


def test_keys_expire_with_their_window(quiet_broker: redis.Redis) -> None:
    clock = Clock()
    limiter = budget(quiet_broker, clock, amount=10, period=5)
    limiter.charge("a")
    limiter.sync()
    key = f"{KEY_PREFIX}budget:a:{int(clock.now // 5) * 5}"
    assert 0 < quiet_broker.ttl(key) <= 6


def test_without_redis_the_budget_is_kept_locally_and_charging_never_waits(
    quiet_broker: redis.Redis,
) -> None:
    clock = Clock()
    unreachable = redis.Redis(port=1, socket_connect_timeout=0.2)
    limiter = budget(unreachable, clock, amount=3)
    limiter.sync()
    assert [limiter.charge("a") for _ in range(4)][-1] is not None


def test_the_background_thread_shares_the_budget(quiet_broker: redis.Redis) -> None:
    limiter = RateBudget(quiet_broker, 1_000_000, 60, sync_interval=0.01)
    limiter.start_syncing()
    limiter.charge("bg", cost=5)
    window = int(time.time() // 60) * 60
    wait_until(lambda: quiet_broker.get(f"{KEY_PREFIX}budget:bg:{window}") == b"5", timeout=5)
