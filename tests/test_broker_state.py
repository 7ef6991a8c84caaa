"""Broker checks against a real Redis and PostgreSQL: losses are found, and only losses."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import redis
from sqlalchemy import Engine
from sqlalchemy import func
from sqlalchemy import select

from app import store
from app.db import broker_checkpoints
from app.db import broker_losses
from scripts.services import private_redis
from scripts.services import truncate_app_tables
from scripts.stack import wait_until
from tasks.broker_state import MIN_ALLOWANCE
from tasks.broker_state import broker_name
from tasks.broker_state import check
from tasks.messages import build_message
from tasks.pending import STATE_KEY
from tasks.pending import AcceptReply
from tasks.pending import Scripts
from tasks.pending import read_state


@pytest.fixture
def tidy(engine: Engine) -> Iterator[None]:
    """Leave no recorded loss behind: the session's API would report it in /ready."""
    yield
    with engine.begin() as conn:
        truncate_app_tables(conn)


def losses(engine: Engine) -> int:
    with engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(broker_losses)).scalar_one()


def test_checks_racing_on_a_new_broker_give_it_one_epoch_and_find_no_loss(
    engine: Engine, quiet_broker: redis.Redis, clean: None, tidy: None
) -> None:
    # Every process checks at start; the first to get the lock gives the broker its epoch.
    with ThreadPoolExecutor(8) as pool:
        found = list(pool.map(lambda _: check(engine, quiet_broker, "redis://new/0"), range(8)))
    assert found == [None] * 8
    assert losses(engine) == 0
    epoch = read_state(quiet_broker).epoch
    # This broker's row only: the session's worker checkpoints its own broker every second.
    mine = select(broker_checkpoints.c.epoch).where(broker_checkpoints.c.broker == "redis://new/0")
    with engine.connect() as conn:
        assert conn.execute(mine).scalar_one() == epoch


def closed(engine: Engine, client: redis.Redis, name: str, accepted: int) -> bool:
    """Check with a short interval; True once the allowance is down to what was accepted."""
    check(engine, client, name, interval=0.01)
    return read_state(client).allowed_events == accepted


def rows(batch_id: str, events: int) -> list[dict]:
    return [
        {
            "topic": "state",
            "event_id": f"{batch_id}-{n}",
            "timestamp": "2026-03-01T08:00:00+00:00",
            "source": "s",
            "payload": {},
        }
        for n in range(events)
    ]


def accept(client: redis.Redis, batch_id: str, events: int) -> AcceptReply:
    """Accept a batch of `events` events the way the API does (no idempotency records)."""
    return Scripts(client).accept(
        batch_id,
        build_message(batch_id, rows(batch_id, events)),
        events,
        [],
        max_backlog_bytes=10**9,
        idempotency_ttl=60,
        max_idempotency_records=10,
    )


def test_a_flushed_broker_is_one_loss_however_many_check_and_bounded_by_its_allowance(
    engine: Engine, quiet_broker: redis.Redis, clean: None, tidy: None
) -> None:
    name = "redis://flushed/0"
    check(engine, quiet_broker, name, wanted=5)
    assert accept(quiet_broker, "b1", 5).status == "OK"
    check(engine, quiet_broker, name)  # checkpoints 5 accepted, allows 5 + 1,000
    quiet_broker.flushall()
    with ThreadPoolExecutor(4) as pool:
        found = list(pool.map(lambda _: check(engine, quiet_broker, name), range(4)))
    [loss] = [loss for loss in found if loss is not None]
    assert losses(engine) == 1
    assert (loss.events_unaccounted, loss.events_known_unstored) == (5 + MIN_ALLOWANCE, 5)
    assert read_state(quiet_broker).verified


def test_a_broker_accepts_nothing_past_its_allowance_until_a_check_raises_it(
    engine: Engine, quiet_broker: redis.Redis, clean: None, tidy: None
) -> None:
    assert accept(quiet_broker, "b0", 1).status == "NOEPOCH"
    check(engine, quiet_broker, "redis://allowance/0", wanted=10)
    assert accept(quiet_broker, "b1", MIN_ALLOWANCE).status == "OK"
    assert accept(quiet_broker, "b2", 1).status == "CHECK"
    check(engine, quiet_broker, "redis://allowance/0", wanted=1)
    assert accept(quiet_broker, "b2", 1).status == "OK"
    with engine.connect() as conn:
        allowed = conn.execute(
            select(broker_checkpoints.c.allowed_events).where(
                broker_checkpoints.c.broker == "redis://allowance/0"
            )
        ).scalar_one()
    assert allowed == read_state(quiet_broker).allowed_events >= MIN_ALLOWANCE + 1


def test_a_restarted_broker_accepts_nothing_until_checked(
    engine: Engine, scratch_dir: Path, clean: None, tidy: None
) -> None:
    with private_redis(scratch_dir / f"redis-restart-{uuid.uuid4().hex[:6]}") as server:
        client = redis.Redis.from_url(server.url)
        check(engine, client, "redis://restarted/0", wanted=10)
        assert accept(client, "b1", 3).status == "OK"
        server.stop()
        server.start()  # the same data (AOF, fsync always), another Redis process
        assert accept(client, "b2", 3).status == "UNVERIFIED"
        assert check(engine, client, "redis://restarted/0", wanted=3) is None  # no loss
        assert accept(client, "b2", 3).status == "OK"
        assert losses(engine) == 0
        client.close()


def test_a_drained_idle_broker_replaced_by_an_empty_one_is_no_loss(
    engine: Engine, quiet_broker: redis.Redis, clean: None, tidy: None
) -> None:
    name = "redis://drained/0"
    check(engine, quiet_broker, name, wanted=5)
    reply = accept(quiet_broker, "b1", 5)
    with engine.begin() as conn:
        store.store_batch(conn, "b1", rows("b1", 5), epoch=reply.epoch, seq=reply.seq)
    Scripts(quiet_broker).forget(["b1"])
    check(engine, quiet_broker, name)  # still active: the allowance stays open
    assert read_state(quiet_broker).allowed_events > 5
    # Idle for IDLE_CHECKS intervals (short ones here): it closes to what was accepted.
    wait_until(lambda: closed(engine, quiet_broker, name, accepted=5), timeout=10)
    quiet_broker.flushall()
    assert check(engine, quiet_broker, name) is None
    assert losses(engine) == 0
    assert read_state(quiet_broker).verified


def test_a_state_key_deleted_alone_with_everything_pending_is_no_loss_and_keeps_the_backlog(
    engine: Engine, quiet_broker: redis.Redis, clean: None, tidy: None
) -> None:
    name = "redis://state-deleted/0"
    check(engine, quiet_broker, name, wanted=8)
    accept(quiet_broker, "b1", 4)
    accept(quiet_broker, "b2", 4)
    # Idle: the allowance closes to the 8 accepted, both batches still pending.
    wait_until(lambda: closed(engine, quiet_broker, name, accepted=8), timeout=10)
    backlog = int(quiet_broker.hget(STATE_KEY, "backlog_bytes"))
    quiet_broker.delete(STATE_KEY)
    assert check(engine, quiet_broker, name) is None
    assert losses(engine) == 0
    # Counted again from the copies: forgetting both brings it to zero, not below.
    assert int(quiet_broker.hget(STATE_KEY, "backlog_bytes")) == backlog
    Scripts(quiet_broker).forget(["b1", "b2"])
    assert int(quiet_broker.hget(STATE_KEY, "backlog_bytes")) == 0


def test_broker_names_leave_out_credentials() -> None:
    assert broker_name("redis://:secret@redis:6379/0") == "redis://redis:6379/0"
    assert broker_name("redis://127.0.0.1:6379") == "redis://127.0.0.1:6379/0"
