"""Acceptance against a real Redis: one atomic step per group, each request keeping its key."""

from __future__ import annotations

import uuid

import redis
from sqlalchemy import Engine

from scripts.stack import wait_until
from tasks.acceptance import Acceptor
from tasks.acceptance import BacklogFull
from tasks.acceptance import IdempotencyRecordsFull
from tasks.acceptance import KeyReused
from tasks.acceptance import Receipt
from tasks.acceptance import Request
from tasks.broker_state import Watchdog
from tasks.pending import IDEMPOTENCY_KEY
from tasks.pending import QUEUE_KEY
from tasks.pending import Scripts
from tasks.pending import idempotency_record
from tasks.pending import read_pending
from tasks.pending import read_state


def event(event_id: str) -> dict:
    return {
        "topic": "acc",
        "event_id": event_id,
        "timestamp": "2026-03-01T08:00:00+00:00",
        "source": "s",
        "payload": {},
    }


def acceptor(
    client: redis.Redis, engine: Engine, budget: int = 10**9, records: int = 1000
) -> Acceptor:
    # A name of its own: each test's broker is new, and must not pass for a loss of the last.
    watchdog = Watchdog(engine, client, f"redis://quiet-{uuid.uuid4().hex}/0", every=60)
    return Acceptor(
        client,
        watchdog,
        max_backlog_bytes=budget,
        idempotency_ttl=60,
        max_idempotency_records=records,
    )


def request(key: str, body: str, *events: str, remember: bool = True) -> Request:
    return Request([event(e) for e in events], "client", key, body, remember)


def test_a_group_is_one_batch_and_repeated_keys_inside_it_count_once(
    quiet_broker: redis.Redis, engine: Engine
) -> None:
    outcomes = acceptor(quiet_broker, engine).accept(
        [
            request("k1", "A", "1", "2"),
            request("k2", "B", "3"),
            request("k1", "A", "1", "2"),  # a retry that arrived together with the first
            request("k1", "other", "9"),  # the same key, another body
            request("made-up", "C", "4", remember=False),
        ]
    )
    first, second, retry, reused, unnamed = outcomes
    assert isinstance(first, Receipt) and isinstance(second, Receipt)
    assert first.batch_id == second.batch_id == unnamed.batch_id
    assert isinstance(retry, Receipt) and retry.replayed and retry.batch_id == first.batch_id
    assert isinstance(reused, KeyReused)
    # One message and one mark for the five requests: 4 distinct requests' events.
    assert quiet_broker.llen(QUEUE_KEY) == 1
    assert read_pending(quiet_broker) == {first.batch_id: 4}
    state = read_state(quiet_broker)
    assert (state.seq, state.accepted_events) == (1, 4) and state.verified


def test_a_key_accepted_earlier_is_answered_from_its_record_and_the_rest_accepted(
    quiet_broker: redis.Redis, engine: Engine
) -> None:
    accept = acceptor(quiet_broker, engine).accept
    [earlier] = accept([request("k1", "A", "1")])
    again, fresh, reused = accept(
        [request("k1", "A", "1"), request("k2", "B", "2"), request("k1", "Z", "1")]
    )
    assert isinstance(again, Receipt) and again.replayed
    assert again.batch_id == earlier.batch_id
    assert isinstance(fresh, Receipt) and not fresh.replayed
    assert isinstance(reused, KeyReused)
    assert read_state(quiet_broker).accepted_events == 2
    assert quiet_broker.llen(QUEUE_KEY) == 2


def test_over_the_backlog_budget_nothing_is_written(
    quiet_broker: redis.Redis, engine: Engine
) -> None:
    accept = acceptor(quiet_broker, engine, budget=5000).accept
    accept([request("k1", "A", *[str(n) for n in range(5)])])  # the first always fits
    before = (quiet_broker.llen(QUEUE_KEY), read_state(quiet_broker))
    try:
        accept([request("k2", "B", *[str(n) for n in range(5, 10)])])
    except BacklogFull:
        pass
    else:
        raise AssertionError("the budget was not enforced")
    assert (quiet_broker.llen(QUEUE_KEY), read_state(quiet_broker)) == before
    assert idempotency_record(quiet_broker, "client", "k2") is None


def test_idempotency_records_have_a_budget_and_no_ttl_redis_could_evict(
    quiet_broker: redis.Redis, engine: Engine
) -> None:
    accept = acceptor(quiet_broker, engine, records=2).accept
    accept([request("k1", "A", "1"), request("k2", "B", "2")])
    assert quiet_broker.ttl(IDEMPOTENCY_KEY) == -1  # no TTL: no eviction policy drops it
    try:
        accept([request("k3", "C", "3")])
    except IdempotencyRecordsFull as exc:
        assert "IDEMPOTENCY_MAX_RECORDS" in str(exc)
    else:
        raise AssertionError("the records' budget was not enforced")
    [again] = accept([request("k1", "A", "1")])  # a retry needs no new record
    assert isinstance(again, Receipt) and again.replayed
    assert read_state(quiet_broker).accepted_events == 2


def test_expired_idempotency_records_are_cleared_and_their_key_accepted_anew(
    quiet_broker: redis.Redis, engine: Engine
) -> None:
    watchdog = Watchdog(engine, quiet_broker, f"redis://quiet-{uuid.uuid4().hex}/0", every=60)
    short = Acceptor(
        quiet_broker,
        watchdog,
        max_backlog_bytes=10**9,
        idempotency_ttl=1,
        max_idempotency_records=1,
    )
    [first] = short.accept([request("k1", "A", "1")])
    wait_until(lambda: Scripts(quiet_broker).expire_idempotency() == 1, timeout=5)
    assert idempotency_record(quiet_broker, "client", "k1") is None
    [second] = short.accept([request("k1", "A", "1")])
    assert isinstance(second, Receipt) and not second.replayed
    assert second.batch_id != first.batch_id
