"""Pruning the batch ledger, dead letters and broker checkpoints, against real PostgreSQL.

Ledger rows past LEDGER_RETENTION_DAYS go, folded into per-epoch totals, so
every ledger sum, counter and the broker's loss-check figures stay what they
were; rows still pending on the broker, or with a dead letter waiting for a
replay, stay; a copy of a batch whose row is kept still stores nothing; dead
letters go counted by replay result; checkpoints of brokers no one checks go.
At the end, /stats through real gunicorn and Celery still matches the ledger
after its rows were pruned.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import Engine
from sqlalchemy import text

from app import broker_log
from app.config import SettingsError
from app.config import load_settings
from app.db import make_engine
from app.retention import policy
from app.store.counters import read_totals
from app.store.dead_letters import replay_counts
from app.store.dead_letters import replay_dead_letter
from app.store.housekeeping import prune_ledger
from app.store.ledger import read_batch
from app.store.ledger import store_exactly_once
from app.store.reading import retention_state
from app.store.retention import RetentionPolicy
from app.store.retention import database_now
from app.store.retention import run_retention
from scripts.services import throwaway_database
from scripts.services import truncate_app_tables
from scripts.stack import Api
from scripts.stack import Worker
from tests.helpers import assert_adds_up
from tests.helpers import ledger_totals
from tests.helpers import make_event
from tests.helpers import publish
from tests.helpers import settled_stats

WEEK = RetentionPolicy(ledger_days=7, dead_letter_days=7, checkpoint_days=7)


@pytest.fixture(scope="module")
def module_db(pg_server_url: str) -> Iterator[Engine]:
    with throwaway_database(pg_server_url, "agg_housekeeping") as url:
        engine = make_engine(url)
        yield engine
        engine.dispose()


@pytest.fixture
def db(module_db: Engine) -> Engine:
    with module_db.begin() as conn:
        truncate_app_tables(conn)
        # Lets a test make the database refuse an event, so it is dead-lettered.
        conn.execute(text("ALTER TABLE events DROP CONSTRAINT IF EXISTS ck_events_blocked"))
        conn.execute(
            text("ALTER TABLE events ADD CONSTRAINT ck_events_blocked CHECK (source <> 'no')")
        )
    return module_db


def age_batches(engine: Engine, days: int, *batch_ids: str) -> None:
    with engine.begin() as conn:
        conn.execute(
            text(
                "UPDATE batches SET processed_at = processed_at - :back WHERE batch_id = ANY(:ids)"
            ),
            {"back": timedelta(days=days), "ids": list(batch_ids)},
        )


def events(prefix: str, n: int, **extra: Any) -> list[dict[str, Any]]:
    return [{**make_event(f"{prefix}{i}", topic="house"), **extra} for i in range(n)]


def figures(engine: Engine) -> tuple[dict[str, int], Any, int, int]:
    with engine.connect() as conn:
        totals = read_totals(conn)
        seq = broker_log.stored_seq(conn, "e1")
        received = broker_log.received_from(conn, "e1")
    return ledger_totals(engine), totals, seq, received


def batch_ids(engine: Engine) -> set[str]:
    with engine.connect() as conn:
        return set(conn.execute(text("SELECT batch_id FROM batches")).scalars())


def test_the_ledger_keeps_its_rows_for_a_week_and_a_day_past_the_idempotency_ttl() -> None:
    assert load_settings({}).ledger_retention_days is None
    assert load_settings({"LEDGER_RETENTION_DAYS": "7"}).ledger_retention_days == 7
    with pytest.raises(SettingsError, match="at least 7"):
        load_settings({"LEDGER_RETENTION_DAYS": "6"})
    with pytest.raises(SettingsError, match="at least 11"):
        load_settings({"LEDGER_RETENTION_DAYS": "10", "IDEMPOTENCY_TTL": str(10 * 86400)})
    with pytest.raises(SettingsError, match="at least 9"):
        load_settings({"LEDGER_RETENTION_DAYS": "8", "BROKER_VISIBILITY_TIMEOUT": str(8 * 86400)})
    with pytest.raises(SettingsError, match="BROKER_CHECKPOINT_RETENTION_DAYS"):
        load_settings({"BROKER_CHECKPOINT_RETENTION_DAYS": "2"})
    chosen = policy(
        load_settings(
            {
                "LEDGER_RETENTION_DAYS": "30",
                "DEAD_LETTER_RETENTION_DAYS": "3",
                "BROKER_CHECKPOINT_RETENTION_DAYS": "9",
            }
        )
    )
    assert (chosen.ledger_days, chosen.dead_letter_days, chosen.checkpoint_days) == (30, 3, 9)


def test_pruned_ledger_rows_are_folded_so_no_sum_or_loss_figure_changes(db: Engine) -> None:
    store_exactly_once(db, "old-1", events("a", 3), epoch="e1", seq=1)
    store_exactly_once(db, "old-2", [*events("a", 2), *events("b", 2)], epoch="e1", seq=7)
    store_exactly_once(db, "old-pending", events("c", 2), epoch="e1", seq=8)
    store_exactly_once(db, "old-no-epoch", events("d", 1))
    store_exactly_once(db, "new", events("e", 2), epoch="e1", seq=9)
    age_batches(db, 8, "old-1", "old-2", "old-pending", "old-no-epoch")
    before = figures(db)
    assert before[2:] == (9, 3 + 4 + 2 + 2)

    report = run_retention(db, WEEK, keep=["old-pending"])

    assert report.ledger_pruned == 3
    assert batch_ids(db) == {"old-pending", "new"}
    assert figures(db) == before
    # The highest sequence of the epoch was in a pruned row: the loss check still knows it.
    age_batches(db, 8, "new")
    run_retention(db, WEEK, keep=["old-pending"])
    assert batch_ids(db) == {"old-pending"}
    assert figures(db) == before
    with db.connect() as conn:
        assert retention_state(conn)["ledger_pruned_before"] is not None
        assert read_batch(conn, "old-1") is None
    # A kept row still makes a copy of its batch a no-op.
    copy = store_exactly_once(db, "old-pending", events("c", 2), epoch="e1", seq=8)
    assert copy.replayed and figures(db) == before


def test_a_row_waits_for_its_dead_letters_and_pruned_letters_still_count(db: Engine) -> None:
    store_exactly_once(db, "mixed", [*events("ok", 2), *events("no", 2, source="no")])
    store_exactly_once(db, "replayed", events("late", 1, source="no"))
    age_batches(db, 30, "mixed", "replayed")
    with db.begin() as conn:
        conn.execute(text("ALTER TABLE events DROP CONSTRAINT ck_events_blocked"))
        letter = conn.execute(
            text("SELECT id FROM dead_letters WHERE batch_id = 'replayed'")
        ).scalar_one()
        assert replay_dead_letter(conn, letter) == "stored"
    before = figures(db)
    with db.connect() as conn:
        replays = replay_counts(conn)
    assert replays == {"stored": 1, "duplicate": 0}

    # Letters kept: the row with letters waiting stays, the replayed one's row goes.
    first = run_retention(db, RetentionPolicy(ledger_days=7))
    assert (first.ledger_pruned, first.dead_letters_pruned) == (1, 0)
    assert batch_ids(db) == {"mixed"}
    # The letters are old too: they go, counted by replay result, and then so does the row.
    with db.begin() as conn:
        conn.execute(text("UPDATE dead_letters SET failed_at = failed_at - interval '30 days'"))
    second = run_retention(db, WEEK)
    assert (second.dead_letters_pruned, second.ledger_pruned) == (3, 1)
    assert batch_ids(db) == set()
    assert figures(db) == before
    with db.connect() as conn:
        assert replay_counts(conn) == replays
        state = retention_state(conn)
    assert state["dead_letters_pruned_before"] is not None


def test_checkpoints_of_brokers_no_one_checks_go_and_fresh_ones_stay(db: Engine) -> None:
    with db.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO broker_checkpoints (broker, epoch, seq, checked_at) VALUES"
                " ('redis://gone/0', 'g', 5, now() - interval '8 days'),"
                " ('redis://used/0', 'u', 9, now())"
            )
        )
    assert run_retention(db, WEEK).checkpoints_pruned == 1
    with db.connect() as conn:
        assert broker_log.read_checkpoint(conn, "redis://gone/0") is None
        assert broker_log.read_checkpoint(conn, "redis://used/0") is not None


def test_batches_prune_a_page_at_a_time(db: Engine) -> None:
    for n in range(7):
        store_exactly_once(db, f"p{n}", events(f"p{n}-", 1), epoch="e1", seq=n + 1)
    age_batches(db, 8, *(f"p{n}" for n in range(7)))
    before = figures(db)
    assert prune_ledger(db, database_now(db) - timedelta(days=7), batch=3) == 7
    assert batch_ids(db) == set() and figures(db) == before


def test_stats_match_the_ledger_after_its_rows_are_pruned(
    api: Api, worker: Worker, clean: None, engine: Engine
) -> None:
    publish(api.url, [make_event(f"s{n}", topic="house") for n in range(40)])
    publish(api.url, [make_event(f"s{n}", topic="house") for n in range(20, 60)])
    first = settled_stats(api.url, received=80)
    assert_adds_up(first, engine, sent=80)
    with engine.begin() as conn:
        conn.execute(text("UPDATE batches SET processed_at = processed_at - interval '8 days'"))
    assert prune_ledger(engine, database_now(engine) - timedelta(days=7)) == 2
    assert batch_ids(engine) == set()
    after = settled_stats(api.url, received=80)
    assert_adds_up(after, engine, sent=80)
    assert {k: after[k] for k in ("unique_processed_db", "estimated_duplicate_dropped")} == {
        "unique_processed_db": 60,
        "estimated_duplicate_dropped": 20,
    }
    assert after["retention"]["ledger_pruned_before"] is not None
