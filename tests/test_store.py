"""The insert path and queries, against real PostgreSQL inside rolled-back transactions."""

from __future__ import annotations

import base64
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Connection
from sqlalchemy import Engine
from sqlalchemy import func
from sqlalchemy import select
from sqlalchemy import text

from app import store
from app.db import batches
from app.db import dead_letters
from app.db import events
from app.db import make_engine
from scripts.services import truncate_app_tables


def row(event_id: str, topic: str = "t", **payload: Any) -> dict[str, Any]:
    return {
        "topic": topic,
        "event_id": event_id,
        "timestamp": "2026-01-01T00:00:00+00:00",
        "source": "store-test",
        "payload": payload or {"id": event_id},
    }


def count(conn: Connection, table: Any) -> int:
    return conn.execute(select(func.count()).select_from(table)).scalar_one()


def test_batch_is_stored_and_counted(conn: Connection) -> None:
    outcome = store.store_batch(conn, "b1", [row("1"), row("2", topic="u"), row("1")])
    assert (outcome.received, outcome.stored, outcome.duplicates, outcome.failed) == (3, 2, 1, 0)
    assert outcome.per_topic["t"] == {"received": 2, "stored": 1, "duplicates": 1, "failed": 0}
    totals = store.read_totals(conn)
    assert (totals.received, totals.stored, totals.duplicates) == (3, 2, 1)
    page, more = store.topic_page(conn, limit=10)
    assert more is None
    assert {r.pop("topic"): r for r in page} == {
        "t": {"stored": 1, "duplicates": 1, "failed": 0},
        "u": {"stored": 1, "duplicates": 0, "failed": 0},
    }


def test_redelivered_batch_is_neither_stored_nor_counted_twice(conn: Connection) -> None:
    store.store_batch(conn, "b1", [row("1"), row("2")])
    again = store.store_batch(conn, "b1", [row("1"), row("2")])
    assert again.replayed
    assert (again.stored, again.duplicates) == (0, 0)
    assert store.read_totals(conn).received == 2
    assert count(conn, batches) == 1
    assert count(conn, events) == 2


def test_existing_keys_count_as_duplicates_across_batches(conn: Connection) -> None:
    store.store_batch(conn, "b1", [row("1")])
    outcome = store.store_batch(conn, "b2", [row("1"), row("1", topic="other")])
    assert (outcome.stored, outcome.duplicates) == (1, 1)


def test_first_copy_in_a_batch_wins(conn: Connection) -> None:
    store.store_batch(conn, "b1", [row("1", v=1), row("1", v=2)])
    assert conn.execute(select(events.c.payload)).scalar_one() == {"v": 1}


def test_refused_row_is_dead_lettered_and_the_rest_stored(conn: Connection) -> None:
    bad = row("2", text="nul\x00")
    outcome = store.store_batch(conn, "b1", [row("1"), bad, row("3"), row("1")])
    assert (outcome.stored, outcome.duplicates, outcome.failed) == (2, 1, 1)
    letter = conn.execute(select(dead_letters)).one()
    assert (letter.batch_id, letter.topic, letter.event_id) == ("b1", "t", "2")
    assert letter.error
    assert store.read_totals(conn).failed == 1


def test_redelivered_poison_batch_adds_no_second_letter(conn: Connection) -> None:
    batch = [row("1"), row("2", text="nul\x00")]
    store.store_batch(conn, "b1", batch)
    again = store.store_batch(conn, "b1", batch)
    assert again.replayed
    assert count(conn, dead_letters) == 1
    assert store.read_totals(conn).failed == 1


def test_processed_batches_names_only_ledger_rows(conn: Connection) -> None:
    store.store_batch(conn, "b1", [row("1")])
    assert store.processed_batches(conn, ["b1", "b2"]) == {"b1"}
    assert store.processed_batches(conn, []) == set()


@pytest.mark.parametrize("cursor", ["", "zz", "Zm9v", "MS4y.x", "bm9uZS5ub25l"])
def test_foreign_cursors_are_refused(cursor: str) -> None:
    with pytest.raises(store.InvalidCursor):
        store.decode_cursor(cursor)


def test_cursor_round_trips() -> None:
    assert store.decode_cursor(store.encode_cursor(123)) == 123


def test_cursors_issued_before_positions_still_continue_after_them(conn: Connection) -> None:
    store.store_batch(conn, "b", [row(f"{n}") for n in range(5)])
    rows = conn.execute(select(events.c.txid, events.c.id).order_by(events.c.position)).all()
    old_style = base64.urlsafe_b64encode(f"{rows[1].txid}.{rows[1].id}".encode()).decode()
    page, _ = store.list_events(conn, limit=10, cursor=old_style)
    assert [e["event_id"] for e in page] == ["2", "3", "4"]


@pytest.fixture
def committed(engine: Engine) -> Iterator[Engine]:
    """Pages only show committed transactions, so these tests commit and clean up."""
    with engine.begin() as conn:
        truncate_app_tables(conn)
    yield engine
    with engine.begin() as conn:
        truncate_app_tables(conn)


def test_pages_walk_all_rows_in_order(committed: Engine) -> None:
    for n in range(3):
        with committed.begin() as conn:
            store.store_batch(conn, f"b{n}", [row(f"{n}-{i}") for i in range(7)])
    seen: list[str] = []
    cursor = None
    with committed.connect() as conn:
        while True:
            page, cursor = store.list_events(conn, limit=4, cursor=cursor)
            seen.extend(e["event_id"] for e in page)
            if cursor is None:
                break
    assert seen == [f"{n}-{i}" for n in range(3) for i in sorted(range(7), key=str)]


def test_pages_stop_at_their_byte_budget_and_the_cursor_continues(committed: Engine) -> None:
    big = "x" * 10_000
    with committed.begin() as conn:
        store.store_batch(conn, "b", [row(f"{i:02d}", blob=big) for i in range(12)])
        store.store_batch(conn, "huge", [row("zz-huge", blob="y" * 100_000)])
    pages: list[list[str]] = []
    cursor = None
    with committed.connect() as conn:
        while True:
            page, cursor = store.list_events(conn, limit=1000, cursor=cursor, max_bytes=35_000)
            pages.append([e["event_id"] for e in page])
            if cursor is None:
                break
    # ~10 KB a row: a page holds the rows that start under 35,000 bytes (4), and a
    # row larger than the whole budget still gets a page of its own.
    assert [len(page) for page in pages] == [4, 4, 4, 1]
    assert [e for page in pages for e in page] == [f"{i:02d}" for i in range(12)] + ["zz-huge"]


def test_a_writer_holds_the_log_until_it_commits_and_readers_never_wait(
    committed: Engine,
) -> None:
    # The first writer keeps its transaction open; a second must wait for it, so
    # positions become visible in order; a reader sees a prefix meanwhile, at once.
    with committed.begin() as conn:
        store.store_batch(conn, "before", [row("before", topic="x")])
    slow = committed.connect()
    slow_tx = slow.begin()
    store.store_batch(slow, "slow", [row("slow", topic="slow")])
    done = threading.Event()

    def fast_writer() -> None:
        with committed.begin() as fast:
            store.store_batch(fast, "fast", [row("fast", topic="fast")])
        done.set()

    writer = threading.Thread(target=fast_writer)
    writer.start()
    try:
        assert not done.wait(0.5)  # waiting for the log
        with committed.connect() as reader:
            page, _ = store.list_events(reader, limit=10)
        assert [e["event_id"] for e in page] == ["before"]
    finally:
        slow_tx.commit()
        slow.close()
    writer.join(timeout=10)
    assert done.is_set()
    with committed.connect() as reader:
        page, _ = store.list_events(reader, limit=10)
    assert [e["event_id"] for e in page] == ["before", "slow", "fast"]


def test_an_open_transaction_elsewhere_holds_nothing_back(
    committed: Engine, pg_server_url: str
) -> None:
    """A write transaction left open in another database used to freeze /events."""
    other = make_engine(pg_server_url)  # the server's "postgres" database
    idle = other.connect()
    idle_tx = idle.begin()
    try:
        idle.execute(text("CREATE TEMP TABLE held (x int)"))
        idle.execute(text("INSERT INTO held VALUES (1)"))  # an xid, kept open
        with committed.begin() as conn:
            store.store_batch(conn, "b", [row("visible")])
        with committed.connect() as reader:
            page, _ = store.list_events(reader, limit=10)
        assert [e["event_id"] for e in page] == ["visible"]
    finally:
        idle_tx.rollback()
        idle.close()
        other.dispose()


def ledger_matches_rows(conn: Connection) -> None:
    """The counters, the ledger and the stored rows tell the same story."""
    totals = store.read_totals(conn)
    received, stored, duplicates, failed = conn.execute(
        select(
            func.sum(batches.c.received),
            func.sum(batches.c.stored),
            func.sum(batches.c.duplicates),
            func.sum(batches.c.failed),
        )
    ).one()
    assert (totals.received, totals.stored, totals.duplicates, totals.failed) == (
        received,
        stored,
        duplicates,
        failed,
    )
    assert totals.stored == count(conn, events)


def test_ledger_is_claimed_before_events_are_touched(conn: Connection) -> None:
    # A ledger row already there (another copy committed first): the copy must not
    # insert its events, even keys nobody stored yet.
    conn.execute(batches.insert().values(batch_id="b1", received=1))
    outcome = store.store_batch(conn, "b1", [row("never")])
    assert outcome.replayed
    assert count(conn, events) == 0


def test_redelivery_after_the_cause_was_fixed_then_replay_keeps_counters_equal_to_rows(
    conn: Connection,
) -> None:
    """A dead-lettered batch redelivered after the fix (worker killed after commit,
    before the ack) stores nothing; replaying its letter then moves it to stored."""
    conn.execute(
        text("ALTER TABLE events ADD CONSTRAINT ck_events_not_blocked CHECK (source <> 'blocked')")
    )
    batch = [row("1"), {**row("2"), "source": "blocked"}]
    first = store.store_batch(conn, "b1", batch, epoch="e", seq=1)
    assert (first.stored, first.failed) == (1, 1)
    conn.execute(text("ALTER TABLE events DROP CONSTRAINT ck_events_not_blocked"))
    again = store.store_batch(conn, "b1", batch, epoch="e", seq=1)
    assert again.replayed
    assert count(conn, events) == 1
    ledger_matches_rows(conn)
    letter_id = conn.execute(select(dead_letters.c.id)).scalar_one()
    assert store.replay_dead_letter(conn, letter_id) == "stored"
    ledger_matches_rows(conn)
    row_ = conn.execute(select(batches).where(batches.c.batch_id == "b1")).one()
    assert (row_.received, row_.stored, row_.duplicates, row_.failed) == (2, 2, 0, 0)
    assert (row_.broker_epoch, row_.broker_seq) == ("e", 1)


def test_replay_of_a_key_stored_meanwhile_counts_a_duplicate(conn: Connection) -> None:
    conn.execute(
        text("ALTER TABLE events ADD CONSTRAINT ck_events_not_blocked CHECK (source <> 'blocked')")
    )
    store.store_batch(conn, "b1", [{**row("2"), "source": "blocked"}])
    conn.execute(text("ALTER TABLE events DROP CONSTRAINT ck_events_not_blocked"))
    store.store_batch(conn, "b2", [row("2")])
    letter_id = conn.execute(select(dead_letters.c.id)).scalar_one()
    assert store.replay_dead_letter(conn, letter_id) == "duplicate"
    ledger_matches_rows(conn)
    row_ = conn.execute(select(batches).where(batches.c.batch_id == "b1")).one()
    assert (row_.stored, row_.duplicates, row_.failed) == (0, 1, 0)


def test_a_batch_with_refused_data_is_run_again_guarded_in_a_new_transaction(
    committed: Engine,
) -> None:
    batch = [row("1"), row("2", text="nul\x00"), row("3"), row("1")]
    outcome = store.store_exactly_once(committed, "b1", batch, epoch="e", seq=7)
    assert (outcome.stored, outcome.duplicates, outcome.failed) == (2, 1, 1)
    with committed.connect() as conn:
        assert count(conn, dead_letters) == 1
        ledger = conn.execute(select(batches)).one()
        assert (ledger.batch_id, ledger.received, ledger.failed, ledger.broker_seq) == (
            "b1",
            4,
            1,
            7,
        )
        ledger_matches_rows(conn)
    again = store.store_exactly_once(committed, "b1", batch)
    assert again.replayed


def test_a_clean_batch_takes_the_unguarded_path(committed: Engine) -> None:
    outcome = store.store_exactly_once(committed, "b1", [row("1"), row("2"), row("1")])
    assert (outcome.stored, outcome.duplicates, outcome.failed) == (2, 1, 0)
    with committed.connect() as conn:
        ledger_matches_rows(conn)


HOSTILE = ["tab\there", "line\nbreak", "cr\rhere", "back\\slash", "\\N", "quote\"'", "ünï©ødé 🎉"]


def test_large_batches_go_through_copy_and_store_every_character_as_sent(
    committed: Engine,
) -> None:
    size = store.COPY_FROM_ROWS + 10
    batch = [
        {
            "topic": f"copy-{HOSTILE[n % len(HOSTILE)]}",
            "event_id": f"{n}-{HOSTILE[(n + 1) % len(HOSTILE)]}",
            "timestamp": "2026-01-01T00:00:00.123456+00:00",
            "source": HOSTILE[(n + 2) % len(HOSTILE)],
            "payload": {HOSTILE[n % len(HOSTILE)]: [HOSTILE[(n + 3) % len(HOSTILE)], n]},
        }
        for n in range(size)
    ]
    # Unguarded, as store_exactly_once runs it first: a COPY that failed would
    # raise here rather than be hidden by the guarded second attempt.
    with committed.begin() as conn:
        outcome = store.store_batch(conn, "big", batch + batch[:5], guarded=False)
    assert (outcome.stored, outcome.duplicates, outcome.failed) == (size, 5, 0)
    with committed.connect() as conn:
        stored = conn.execute(
            select(events.c.topic, events.c.event_id, events.c.source, events.c.payload)
        ).all()
        ledger_matches_rows(conn)
        # Nothing of the staging table outlives the transaction on the pooled connection.
        assert conn.execute(text("SELECT to_regclass('pg_temp.incoming_events')")).scalar() is None
    assert sorted(tuple(r) for r in stored) == sorted(
        (e["topic"], e["event_id"], e["source"], e["payload"]) for e in batch
    )
    assert store.store_exactly_once(committed, "big", batch).replayed


def test_a_large_batch_with_refused_data_is_dead_lettered_like_a_small_one(
    committed: Engine,
) -> None:
    batch = [row(str(n)) for n in range(store.COPY_FROM_ROWS + 5)]
    batch[7] = row("7", text="nul\x00")
    outcome = store.store_exactly_once(committed, "big-poison", batch)
    assert (outcome.stored, outcome.duplicates, outcome.failed) == (len(batch) - 1, 0, 1)
    with committed.connect() as conn:
        assert count(conn, dead_letters) == 1
        ledger_matches_rows(conn)


def test_totals_are_striped_and_add_up_to_the_topic_counters(conn: Connection) -> None:
    for n in range(40):
        store.store_batch(conn, f"s{n}", [row(f"{n}", topic=f"t{n % 3}"), row("0", topic="t0")])
    totals = store.read_totals(conn)
    per_topic = conn.execute(
        text("SELECT sum(received), sum(stored), sum(duplicates), sum(failed) FROM topic_stats")
    ).one()
    assert (totals.received, totals.stored, totals.duplicates, totals.failed) == tuple(per_topic)
    assert (totals.received, totals.stored) == (80, 40)
    stripes = conn.execute(text("SELECT count(*) FROM counter_totals")).scalar_one()
    assert stripes > 1  # batches spread over several rows


@pytest.mark.parametrize(
    ("prefix", "end"),
    [("ab", "ac"), ("a\U0010ffff", "b"), ("\U0010ffff", None), ("a\ud7ff", "a\ue000")],
)
def test_prefix_end_is_the_first_string_after_the_prefix_range(
    prefix: str, end: str | None
) -> None:
    assert store._prefix_end(prefix) == end
