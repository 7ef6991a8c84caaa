"""Migrations go up, down and up again, and match the tables in app.db."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

import pytest
from alembic import command
from sqlalchemy import inspect
from sqlalchemy import text

from app.db import EVENT_PARTITION
from app.db import make_engine
from scripts.services import alembic_config
from scripts.services import migrate
from scripts.services import throwaway_database
from scripts.stack import ROOT


@pytest.fixture
def empty_database(pg_server_url: str) -> Iterator[str]:
    with throwaway_database(pg_server_url, "agg_migrate", migrated=False) as url:
        yield url


def tables_and_constraints(url: str) -> tuple[set[str], list[str]]:
    """Return the tables (partitions of events left out) and the dedup key's constraints."""
    engine = make_engine(url)
    try:
        inspector = inspect(engine)
        names = set(inspector.get_table_names()) - {"alembic_version"}
        tables = {name for name in names if not EVENT_PARTITION.fullmatch(name)}
        keys = "event_keys" if "event_keys" in tables else "events"
        uniques = [u["name"] for u in inspector.get_unique_constraints(keys)] if tables else []
        return tables, uniques
    finally:
        engine.dispose()


def test_upgrade_downgrade_upgrade(empty_database: str) -> None:
    def run(step: str, revision: str) -> None:
        engine = make_engine(empty_database)
        try:
            with engine.begin() as conn:
                config = alembic_config(empty_database)
                config.attributes["connection"] = conn
                getattr(command, step)(config, revision)
        finally:
            engine.dispose()

    run("upgrade", "head")
    tables, uniques = tables_and_constraints(empty_database)
    assert tables == {
        "events",
        "batches",
        "topic_stats",
        "dead_letters",
        "broker_checkpoints",
        "broker_losses",
        "counter_totals",
        "event_keys",
        "retention_marks",
        "pruned_batches",
        "pruned_dead_letters",
    }
    assert uniques == ["uq_event_keys_topic_event_id"]
    with make_engine(empty_database).connect() as conn:
        indexes = {i["name"] for i in inspect(conn).get_indexes("topic_stats")}
    assert "ix_topic_stats_topic_c" in indexes
    run("downgrade", "base")
    assert tables_and_constraints(empty_database) == (set(), [])
    run("upgrade", "head")
    assert tables_and_constraints(empty_database)[0] == tables


def test_models_match_migrations(database_url: str) -> None:
    engine = make_engine(database_url)
    try:
        with engine.connect() as conn:
            config = alembic_config(database_url)
            config.attributes["connection"] = conn
            command.check(config)
    finally:
        engine.dispose()


def test_counter_totals_start_from_the_existing_topic_counters(empty_database: str) -> None:
    migrate(empty_database, "0003")
    engine = make_engine(empty_database)
    try:
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO topic_stats (topic, received, stored, duplicates, failed)"
                    " VALUES ('a', 10, 7, 2, 1), ('b', 5, 5, 0, 0)"
                )
            )
        migrate(empty_database)
        with engine.connect() as conn:
            totals = conn.execute(
                text(
                    "SELECT sum(received), sum(stored), sum(duplicates), sum(failed)"
                    " FROM counter_totals"
                )
            ).one()
        assert tuple(totals) == (15, 12, 2, 1)
    finally:
        engine.dispose()


def test_positions_follow_the_old_txid_order_and_continue_from_it(empty_database: str) -> None:
    migrate(empty_database, "0004")
    engine = make_engine(empty_database)
    try:
        with engine.begin() as conn:
            # Ids out of txid order, as concurrent writers leave them.
            for event_id, txid in (("c", 30), ("a", 10), ("b", 20)):
                conn.execute(
                    text(
                        "INSERT INTO events (topic, event_id, timestamp, source, payload, txid)"
                        " VALUES ('t', :e, now(), 's', '{}', :x)"
                    ),
                    {"e": event_id, "x": txid},
                )
        migrate(empty_database)
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO events (topic, event_id, timestamp, source, payload)"
                    " VALUES ('t', 'd', now(), 's', '{}')"
                )
            )
            order = conn.execute(text("SELECT event_id FROM events ORDER BY position")).scalars()
            assert list(order) == ["a", "b", "c", "d"]
    finally:
        engine.dispose()


def test_the_optional_payload_index_applies_to_a_migrated_database(empty_database: str) -> None:
    migrate(empty_database)
    engine = make_engine(empty_database)
    try:
        sql = (ROOT / "deploy" / "sql" / "payload_gin.sql").read_text()
        statement = "\n".join(line for line in sql.splitlines() if not line.startswith("--"))
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text(statement))
            conn.execute(text(statement))  # IF NOT EXISTS: safe to run again
        with engine.connect() as conn:
            indexes = {i["name"] for i in inspect(conn).get_indexes("events")}
        assert "ix_events_payload_gin" in indexes
    finally:
        engine.dispose()


def test_partitioning_keeps_rows_positions_and_keys_and_goes_back(empty_database: str) -> None:
    migrate(empty_database, "0007")
    engine = make_engine(empty_database)
    insert = text(
        "INSERT INTO events (topic, event_id, timestamp, source, payload, stored_at)"
        " VALUES ('t', :e, now() - interval '3 days', 's', '{}', now() - :back)"
    )
    try:
        with engine.begin() as conn:
            for event_id, days in (("a", 5), ("b", 2), ("c", 0)):
                conn.execute(insert, {"e": event_id, "back": timedelta(days=days)})
            before = conn.execute(
                text("SELECT id, event_id, position FROM events ORDER BY position")
            ).all()
        migrate(empty_database, "0008")
        with engine.begin() as conn:
            after = conn.execute(
                text("SELECT id, event_id, position FROM events ORDER BY position")
            ).all()
            assert after == before
            # Every row sits in the partition of rows stored before the migration.
            holders = conn.execute(
                text("SELECT DISTINCT tableoid::regclass::text FROM events")
            ).scalars()
            assert [name.startswith("events_upto_") for name in holders] == [True]
            keys = conn.execute(text("SELECT event_id FROM event_keys ORDER BY 1")).scalars()
            assert list(keys) == ["a", "b", "c"]
            conn.execute(
                text(
                    "INSERT INTO events (topic, event_id, timestamp, source, payload)"
                    " VALUES ('t', 'd', now(), 's', '{}')"
                )
            )
            last = conn.execute(text("SELECT max(position), max(id) FROM events")).one()
            assert tuple(last) == (before[-1].position + 1, before[-1].id + 1)
        migrate_down(empty_database, "0007")
        with engine.connect() as conn:
            back = conn.execute(text("SELECT event_id FROM events ORDER BY position")).scalars()
            assert list(back) == ["a", "b", "c", "d"]
            uniques = [u["name"] for u in inspect(conn).get_unique_constraints("events")]
            assert uniques == ["uq_events_topic_event_id"]
    finally:
        engine.dispose()


def migrate_down(url: str, revision: str) -> None:
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            config = alembic_config(url)
            config.attributes["connection"] = conn
            command.downgrade(config, revision)
    finally:
        engine.dispose()


def test_the_pruned_totals_go_back_only_while_nothing_was_pruned(empty_database: str) -> None:
    migrate(empty_database, "0009")
    engine = make_engine(empty_database)
    try:
        with engine.connect() as conn:
            indexes = {i["name"] for i in inspect(conn).get_indexes("batches")}
        assert "ix_batches_processed_at" in indexes
        migrate_down(empty_database, "0008")
        tables, _ = tables_and_constraints(empty_database)
        assert not {"pruned_batches", "pruned_dead_letters"} & tables
        migrate(empty_database, "0009")
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO pruned_batches (broker_epoch, batches, received, pruned_before)"
                    " VALUES ('', 1, 5, now())"
                )
            )
        with pytest.raises(RuntimeError, match="cannot be downgraded"):
            migrate_down(empty_database, "0008")
        tables, _ = tables_and_constraints(empty_database)
        assert "pruned_batches" in tables
    finally:
        engine.dispose()
