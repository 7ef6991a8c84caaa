"""Acceptance against a real Redis: one atomic step per group, each request keeping its key."""

from __future__ import annotations

import redis
from sqlalchemy import Engine

from tasks.acceptance import Acceptor
from tasks.acceptance import BacklogFull
from tasks.acceptance import KeyReused
from tasks.acceptance import Receipt
from tasks.acceptance import Request
from tasks.broker_state import Watchdog
from tasks.pending import QUEUE_KEY
from tasks.pending import Scripts
from tasks.pending import idempotency_key
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


def acceptor(client: redis.Redis, engine: Engine, budget: int = 10**9) -> Acceptor:
    watchdog = Watchdog(engine, client, "redis://quiet/0", every=60)
    return Acceptor(client, watchdog, max_backlog_bytes=budget, idempotency_ttl=60)


def request(key: str, body: str, *events: str, remember: bool = True) -> Request:
    return Request([event(e) for e in events], "client", key, body, remember)


def test_a_group_is_one_batch_and_repeated_keys_inside_it_count_once(
    quiet_broker: redis.Redis, engine: Engine
) -> None:
    Scripts(quiet_broker).init_epoch("e1")
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
    assert (state.epoch, state.seq, state.accepted_events) == ("e1", 1, 4)


def test_a_key_accepted_earlier_is_answered_from_its_record_and_the_rest_accepted(
    quiet_broker: redis.Redis, engine: Engine
) -> None:
    Scripts(quiet_broker).init_epoch("e1")
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
    Scripts(quiet_broker).init_epoch("e1")
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
    assert not quiet_broker.exists(idempotency_key("client", "k2"))
