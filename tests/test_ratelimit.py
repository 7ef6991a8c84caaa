"""Rate budgets shared by processes through a real Redis, with a clock the test moves."""

from __future__ import annotations

import redis

from app.ratelimit import KEY_PREFIX
from app.ratelimit import RateBudget


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def budget(client: redis.Redis, clock: Clock, amount: int = 10, period: int = 1) -> RateBudget:
    return RateBudget(client, amount, period, sync_interval=0.05, clock=clock)


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
    clock.now += 0.06
    assert first.charge("a") is None  # sends its 6, learns 6, spends a 7th locally
    # The other process learns the 6 and spends the rest as it knows it (the 7th
    # it cannot know yet: one sync interval of one process is the overshoot).
    assert [second.charge("a") for _ in range(5)] == [None] * 4 + [1]
    clock.now += 0.06
    assert second.charge("a") is not None  # sends its 4: 10 in Redis
    assert first.charge("a") is not None  # sends its 1, learns 11
    assert int(quiet_broker.get(f"{KEY_PREFIX}a:1000000")) == 11  # type: ignore[arg-type]


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
    clock.now += 0.06
    limiter.charge("a")
    key = f"{KEY_PREFIX}a:{int(clock.now // 5) * 5}"
    assert 0 < quiet_broker.ttl(key) <= 6


def test_without_redis_the_budget_is_kept_locally(quiet_broker: redis.Redis) -> None:
    clock = Clock()
    unreachable = redis.Redis(port=1, socket_connect_timeout=0.2)
    limiter = budget(unreachable, clock, amount=3)
    assert [limiter.charge("a") for _ in range(4)][-1] is not None
