"""/stats against a broker and a database set up by hand: queued is what the ledger lacks."""

from __future__ import annotations

import time

import redis
from sqlalchemy import Engine

from app import store
from tasks.acceptance import collect_stats
from tasks.broker_state import check
from tasks.messages import build_message
from tasks.pending import Scripts
from tasks.pending import read_pending

EVENTS = [
    {
        "topic": "stats",
        "event_id": str(n),
        "timestamp": "2026-03-01T08:00:00+00:00",
        "source": "s",
        "payload": {},
    }
    for n in range(3)
]


def test_a_committed_batch_whose_mark_is_left_is_not_counted_as_queued(
    engine: Engine, quiet_broker: redis.Redis, clean: None
) -> None:
    scripts = Scripts(quiet_broker)
    # The broker accepts once a check has cleared it for these events.
    check(engine, quiet_broker, "redis://quiet-stats/0", wanted=len(EVENTS))
    reply = scripts.accept(
        "b-stats",
        build_message("b-stats", EVENTS),
        len(EVENTS),
        [],
        max_backlog_bytes=10**9,
        idempotency_ttl=60,
        max_idempotency_records=10,
    )
    assert reply.status == "OK"
    before = collect_stats(engine, quiet_broker, time.monotonic())
    assert (before["queued_events"], before["total_received_queued"]) == (3, 3)

    # The worker committed, then could not clear the mark (the broker was away).
    with engine.begin() as conn:
        store.store_batch(conn, "b-stats", EVENTS, epoch=reply.epoch, seq=reply.seq)
    after = collect_stats(engine, quiet_broker, time.monotonic())
    assert (after["queued_events"], after["total_received_queued"]) == (0, 3)
    assert after["unique_processed_db"] == 3
    # Reading never writes: the mark is left for the workers' sweep to clear.
    assert read_pending(quiet_broker) == {"b-stats": 3}
