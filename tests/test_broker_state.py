"""Broker checks against a real Redis and PostgreSQL: losses are found, and only losses."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis
from sqlalchemy import Engine
from sqlalchemy import func
from sqlalchemy import select

from app.db import broker_checkpoints
from app.db import broker_losses
from scripts.services import truncate_app_tables
from tasks.broker_state import broker_name
from tasks.broker_state import check
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


def test_a_flushed_broker_is_one_loss_however_many_check(
    engine: Engine, quiet_broker: redis.Redis, clean: None, tidy: None
) -> None:
    check(engine, quiet_broker, "redis://flushed/0")
    quiet_broker.flushall()
    with ThreadPoolExecutor(4) as pool:
        found = list(pool.map(lambda _: check(engine, quiet_broker, "redis://flushed/0"), range(4)))
    assert sum(loss is not None for loss in found) == 1
    assert losses(engine) == 1
    assert read_state(quiet_broker).epoch is not None


def test_broker_names_leave_out_credentials() -> None:
    assert broker_name("redis://:secret@redis:6379/0") == "redis://redis:6379/0"
    assert broker_name("redis://127.0.0.1:6379") == "redis://127.0.0.1:6379/0"
