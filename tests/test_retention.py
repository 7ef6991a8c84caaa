"""Retention against real PostgreSQL (and, at the end, real gunicorn and Celery).

Partitions are created ahead and rows stranded in the default move out; days
past RETENTION_DAYS are dropped whole; keys past DEDUP_HORIZON_DAYS are pruned;
an event sent again after its key is gone is stored and counted
stored_after_horizon; a cursor into dropped events continues with a flag; each
topic's oldest retained event (/stats/topics?oldest=true) moves past a dropped day,
and is null once all of a topic's days are gone; one runner acts at a time; and a
run while a publisher and a follower are active loses nothing inside retention and
counts nothing twice.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import UTC
from datetime import datetime
from datetime import timedelta
from typing import Any

import orjson
import pytest
import requests
from sqlalchemy import Engine
from sqlalchemy import func
from sqlalchemy import select
from sqlalchemy import text

from aggregator_client.client import Client
from app.config import SettingsError
from app.config import load_settings
from app.cursors import encode_cursor
from app.db import event_keys
from app.db import events
from app.db import make_engine
from app.store.counters import read_totals
from app.store.counters import topic_page
from app.store.ledger import store_exactly_once
from app.store.reading import iter_events
from app.store.reading import list_events
from app.store.reading import retention_gap
from app.store.reading import retention_state
from app.store.retention import RETENTION_LOCK
from app.store.retention import RetentionPolicy
from app.store.retention import events_bytes
from app.store.retention import partitions
from app.store.retention import run_retention
from scripts.services import throwaway_database
from scripts.stack import ROOT
from scripts.stack import Api
from scripts.stack import Worker
from scripts.stack import free_port
from scripts.stack import wait_until
from tests.helpers import publish
from tests.helpers import settled_stats

KEEP_3_DAYS = RetentionPolicy(retention_days=3, dedup_horizon_days=3, partitions_ahead=2)
DAYS_BACK = 10


def event(event_id: str, topic: str = "t", timestamp: str | None = None) -> dict[str, Any]:
    return {
        "topic": topic,
        "event_id": event_id,
        "timestamp": timestamp or datetime.now(UTC).isoformat(),
        "source": "retention-test",
        "payload": {"id": event_id},
    }


def old_timestamp() -> str:
    return (datetime.now(UTC) - timedelta(days=DAYS_BACK)).isoformat()


def age(engine: Engine, topic: str, days: int = DAYS_BACK) -> None:
    """Make a topic's events and keys look stored `days` ago (the rows move partition)."""
    with engine.begin() as conn:
        shift = {"topic": topic, "back": timedelta(days=days)}
        conn.execute(
            text("UPDATE events SET stored_at = stored_at - :back WHERE topic = :topic"), shift
        )
        conn.execute(
            text(
                "UPDATE event_keys SET horizon_from = horizon_from - :back"
                " WHERE topic = :topic AND horizon_from > now() - :back"
            ),
            shift,
        )


def count(engine: Engine, table: Any, topic: str) -> int:
    with engine.connect() as conn:
        return int(
            conn.execute(
                select(func.count()).select_from(table).where(table.c.topic == topic)
            ).scalar_one()
        )


@pytest.fixture
def own_db(pg_server_url: str) -> Iterator[Engine]:
    """A database of this test's own: retention changes partitions, which others share."""
    with throwaway_database(pg_server_url, "agg_retention") as url:
        engine = make_engine(url)
        yield engine
        engine.dispose()


def test_settings_refuse_a_horizon_shorter_than_retention() -> None:
    assert load_settings({}).retention_days is None
    assert load_settings({"RETENTION_DAYS": "30"}).dedup_horizon_days == 30
    both = load_settings({"RETENTION_DAYS": "30", "DEDUP_HORIZON_DAYS": "300"})
    assert (both.retention_days, both.dedup_horizon_days) == (30, 300)
    with pytest.raises(SettingsError, match="at least RETENTION_DAYS"):
        load_settings({"RETENTION_DAYS": "30", "DEDUP_HORIZON_DAYS": "7"})
    with pytest.raises(SettingsError, match="needs RETENTION_DAYS"):
        load_settings({"DEDUP_HORIZON_DAYS": "7"})
    with pytest.raises(SettingsError, match="positive number of days"):
        load_settings({"RETENTION_DAYS": "0"})


def test_settings_read_per_topic_days() -> None:
    chosen = load_settings({"RETENTION_DAYS": "30", "RETENTION_TOPIC_DAYS": "debug=3, audit=365"})
    assert chosen.retention_topic_days == (("audit", 365), ("debug", 3))
    for bad in ("debug", "debug=0", "=3", "debug=x"):
        with pytest.raises(SettingsError, match="RETENTION_TOPIC_DAYS"):
            load_settings({"RETENTION_TOPIC_DAYS": bad})


def test_shorter_topics_are_deleted_and_longer_ones_keep_their_partitions(own_db: Engine) -> None:
    chosen = RetentionPolicy(
        retention_days=5,
        dedup_horizon_days=5,
        partitions_ahead=1,
        topic_days=(("audit", 20), ("debug", 2)),
    )
    store_exactly_once(own_db, "b1", [event(f"p{n}", "plain") for n in range(4)])
    store_exactly_once(own_db, "b2", [event(f"a{n}", "audit") for n in range(3)])
    age(own_db, "plain")
    age(own_db, "audit")  # both 10 days old, in one partition
    store_exactly_once(own_db, "b3", [event(f"d{n}", "debug") for n in range(5)])
    age(own_db, "debug", days=3)
    store_exactly_once(own_db, "b4", [event("fresh", "debug")])
    with own_db.connect() as conn:
        before = read_totals(conn)

    report = run_retention(own_db, chosen)

    old_day = f"events_{datetime.now(UTC) - timedelta(days=DAYS_BACK):%Y%m%d}"
    assert report.kept_for_topics == [old_day] and report.dropped == []
    assert report.events_deleted == 4 + 5
    assert count(own_db, events, "plain") == 0 and count(own_db, events, "audit") == 3
    assert count(own_db, events, "debug") == 1
    # Keys: plain's pruned past the horizon; audit's kept (its own days); debug's
    # kept for the default horizon, though its events are gone.
    keys = {t: count(own_db, event_keys, t) for t in ("plain", "audit", "debug")}
    assert keys == {"plain": 0, "audit": 3, "debug": 6}
    with own_db.connect() as conn:
        assert read_totals(conn) == before
        assert retention_gap(conn, encode_cursor(0))
    again = store_exactly_once(
        own_db, "b5", [event("a0", "audit"), event("p0", "plain"), event("d0", "debug")]
    )
    assert (again.stored, again.duplicates, again.stored_after_horizon) == (1, 2, 0)

    # Once audit's own days pass, its partition goes and so do its keys.
    with own_db.begin() as conn:
        conn.execute(text("DELETE FROM events WHERE topic <> 'audit'"))
    age(own_db, "audit", days=15)
    later = run_retention(own_db, chosen)
    # The day kept for audit (now empty) and the one audit moved to both go.
    assert len(later.dropped) == 2 and old_day in later.dropped and not later.kept_for_topics
    assert count(own_db, events, "audit") == 0 and count(own_db, event_keys, "audit") == 0


def test_settings_read_a_size_cap() -> None:
    assert load_settings({}).retention_max_bytes is None
    assert load_settings({"RETENTION_MAX_BYTES": "500m"}).retention_max_bytes == 500 * 1024**2
    assert load_settings({"RETENTION_MAX_BYTES": "2GB"}).retention_max_bytes == 2 * 1024**3
    assert load_settings({"RETENTION_MAX_BYTES": "4096"}).retention_max_bytes == 4096
    for bad in ("0", "lots", "5x", "-3m"):
        with pytest.raises(SettingsError, match="RETENTION_MAX_BYTES"):
            load_settings({"RETENTION_MAX_BYTES": bad})


def test_oldest_days_go_while_over_the_size_cap_and_keys_keep_their_horizon(
    own_db: Engine,
) -> None:
    for back in (9, 6, 3):
        store_exactly_once(
            own_db, f"b{back}", [event(f"e{back}-{n}", f"t{back}") for n in range(50)]
        )
        age(own_db, f"t{back}", days=back)
    store_exactly_once(own_db, "today", [event(f"now-{n}", "today") for n in range(50)])
    run_retention(own_db, RetentionPolicy(partitions_ahead=1))  # the old days get partitions
    with own_db.connect() as conn:
        sizes = events_bytes(conn)
    day = {back: f"events_{datetime.now(UTC) - timedelta(days=back):%Y%m%d}" for back in (9, 6, 3)}
    # Room for everything but the oldest day: that day, and only it, goes.
    cap = sum(sizes.values()) - sizes[day[9]]
    chosen = RetentionPolicy(
        retention_days=30, dedup_horizon_days=30, partitions_ahead=1, max_bytes=cap
    )
    report = run_retention(own_db, chosen)
    assert report.dropped_for_size == [day[9]] and report.events_bytes == cap
    assert count(own_db, events, "t9") == 0 and count(own_db, events, "t6") == 50
    # Keys are kept for DEDUP_HORIZON_DAYS (30) whatever the size: a re-send is a duplicate.
    assert report.keys_pruned == 0 and count(own_db, event_keys, "t9") == 50
    assert store_exactly_once(own_db, "again", [event("e9-0", "t9")]).duplicates == 1
    # A cap below today's own size drops every past day and never today's.
    tiny = run_retention(own_db, RetentionPolicy(partitions_ahead=1, max_bytes=1))
    assert tiny.dropped_for_size == [day[6], day[3]]
    assert count(own_db, events, "today") == 50 and tiny.events_bytes > 1


def test_a_run_creates_partitions_ahead_and_moves_rows_out_of_the_default(
    own_db: Engine,
) -> None:
    store_exactly_once(own_db, "b-old", [event("a"), event("b")])
    age(own_db, "t")  # stored 10 days ago: no partition covers that day, the default holds them
    with own_db.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM events_default")).scalar_one() == 2
    report = run_retention(own_db, RetentionPolicy(partitions_ahead=5))
    old_day = f"events_{datetime.now(UTC) - timedelta(days=DAYS_BACK):%Y%m%d}"
    assert report.moved_from_default == 2
    assert old_day in report.partitions_created
    with own_db.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM events_default")).scalar_one() == 0
        assert conn.execute(text(f"SELECT count(*) FROM {old_day}")).scalar_one() == 2
        names = {p.name for p in partitions(conn)}
    ahead = {f"events_{datetime.now(UTC) + timedelta(days=n):%Y%m%d}" for n in range(6)}
    assert ahead <= names
    # A second run finds everything in place.
    again = run_retention(own_db, RetentionPolicy(partitions_ahead=5))
    assert (again.partitions_created, again.moved_from_default, again.dropped) == ([], 0, [])


def test_days_past_retention_are_dropped_and_a_cursor_into_them_continues_flagged(
    own_db: Engine,
) -> None:
    store_exactly_once(own_db, "b-old", [event(f"o{n}", "old", old_timestamp()) for n in range(5)])
    age(own_db, "old")
    store_exactly_once(own_db, "b-new", [event(f"n{n}", "new") for n in range(3)])
    with own_db.connect() as conn:
        before = read_totals(conn)
    start = encode_cursor(0)
    with own_db.connect() as conn:
        first_old = conn.execute(select(func.min(events.c.position))).scalar_one()
    report = run_retention(own_db, KEEP_3_DAYS)
    assert len(report.dropped) == 1 and report.keys_pruned == 5
    assert count(own_db, events, "old") == 0 and count(own_db, event_keys, "old") == 0
    assert count(own_db, events, "new") == 3 and count(own_db, event_keys, "new") == 3
    with own_db.connect() as conn:
        # Counters are totals since the start: retention does not take anything back.
        assert read_totals(conn) == before
        page, _ = list_events(conn, limit=10, cursor=encode_cursor(first_old))
        assert [e["event_id"] for e in page] == ["n0", "n1", "n2"]
        assert retention_gap(conn, encode_cursor(first_old))
        assert retention_gap(conn, start)
        assert not retention_gap(conn, None)
        state = retention_state(conn)
        assert not retention_gap(conn, encode_cursor(state["dropped_through"]))
        assert state["oldest_position"] == state["dropped_through"] + 1
        assert state["keys_pruned_before"] is not None


def test_the_export_flags_a_gap_after_its_cursor_and_a_drop_during_it(own_db: Engine) -> None:
    store_exactly_once(own_db, "b-old", [event(f"o{n}", "old", old_timestamp()) for n in range(5)])
    age(own_db, "old")
    store_exactly_once(own_db, "b-new", [event(f"n{n}", "new") for n in range(4)])
    # Read the first page, then retention drops the old day: the next page says so.
    pages = iter_events(own_db, page_rows=2)
    first = next(pages)
    assert [e["event_id"] for e in first] == ["o0", "o1"]
    run_retention(own_db, KEEP_3_DAYS)
    with own_db.connect() as conn:
        through = encode_cursor(retention_state(conn)["dropped_through"])
    rest = [line for page in pages for line in page]
    assert rest[0] == {"retention_gap": True, "cursor": through}
    assert [e["event_id"] for e in rest[1:]] == ["n0", "n1", "n2", "n3"]
    # From a cursor into the dropped events: the gap line comes first, once.
    lines = [
        line for page in iter_events(own_db, cursor=encode_cursor(1), page_rows=2) for line in page
    ]
    assert lines[0] == {"retention_gap": True, "cursor": through}
    assert sum("retention_gap" in line for line in lines) == 1 and len(lines) == 5
    # From the start, or from the dropped-through cursor itself: no gap.
    for cursor in (None, through):
        plain = [line for page in iter_events(own_db, cursor=cursor) for line in page]
        assert not any("retention_gap" in line for line in plain) and len(plain) == 4


def test_an_event_sent_again_after_its_key_was_pruned_counts_as_stored_after_horizon(
    own_db: Engine,
) -> None:
    old = [event(f"o{n}", "old", old_timestamp()) for n in range(4)]
    store_exactly_once(own_db, "b-old", old)
    age(own_db, "old")
    run_retention(own_db, KEEP_3_DAYS)
    again = store_exactly_once(own_db, "b-again", [*old[:2], event("fresh", "old")])
    assert (again.stored, again.duplicates, again.stored_after_horizon) == (3, 0, 2)
    # Its key is back: a third copy is a duplicate again.
    third = store_exactly_once(own_db, "b-third", old[:2])
    assert (third.stored, third.duplicates, third.stored_after_horizon) == (0, 2, 0)
    with own_db.connect() as conn:
        totals = read_totals(conn)
        row = conn.execute(
            text("SELECT stored, stored_after_horizon FROM batches WHERE batch_id = 'b-again'")
        ).one()
        topic = conn.execute(
            text("SELECT stored_after_horizon FROM topic_stats WHERE topic = 'old'")
        ).scalar_one()
    assert (totals.stored, totals.duplicates, totals.stored_after_horizon) == (4 + 3, 2, 2)
    assert tuple(row) == (3, 2) and topic == 2


def test_keys_outlive_their_events(own_db: Engine) -> None:
    # Stored 10 days ago with a timestamp of today (a clock ahead, or a late batch):
    # the key is kept by its timestamp, and never pruned while its event is kept.
    store_exactly_once(own_db, "b", [event("k", "t")])
    age(own_db, "t")
    with own_db.begin() as conn:
        conn.execute(text("UPDATE event_keys SET horizon_from = now()"))
    report = run_retention(own_db, KEEP_3_DAYS)
    assert report.dropped and report.keys_pruned == 0
    assert count(own_db, event_keys, "t") == 1
    assert store_exactly_once(own_db, "b2", [event("k", "t")]).duplicates == 1


def test_each_topics_oldest_event_moves_past_a_dropped_day_and_is_null_once_all_are_gone(
    own_db: Engine,
) -> None:
    store_exactly_once(own_db, "b-old", [event(f"o{n}", "a", old_timestamp()) for n in range(3)])
    store_exactly_once(
        own_db, "b-gone", [event(f"g{n}", "gone", old_timestamp()) for n in range(2)]
    )
    age(own_db, "a")
    age(own_db, "gone")
    store_exactly_once(own_db, "b-mid", [event(f"m{n}", "a") for n in range(2)])
    with own_db.begin() as conn:
        # Two days back: inside the 3 days kept, in a partition of its own.
        conn.execute(
            text(
                "UPDATE events SET stored_at = stored_at - interval '2 days'"
                " WHERE topic = 'a' AND event_id LIKE 'm%'"
            )
        )
    store_exactly_once(own_db, "b-new", [event(f"n{n}", "a") for n in range(2)])
    store_exactly_once(own_db, "b-b", [event("b0", "b")])

    def oldest() -> dict[str, tuple[Any, Any]]:
        with own_db.connect() as conn:
            page, last = topic_page(conn, limit=10, oldest=True)
            assert last is None
            expected = {}
            for topic in ("a", "b", "gone"):
                first = conn.execute(
                    select(events.c.position, events.c.stored_at)
                    .where(events.c.topic == topic)
                    .order_by(events.c.position)
                    .limit(1)
                ).one_or_none()
                expected[topic] = (None, None) if first is None else tuple(first)
        found = {row["topic"]: (row["oldest_position"], row["oldest_stored_at"]) for row in page}
        assert found == expected
        return found

    before = oldest()
    assert before["a"][1] < datetime.now(UTC) - timedelta(days=DAYS_BACK - 1)
    report = run_retention(own_db, KEEP_3_DAYS)
    assert len(report.dropped) == 1
    after = oldest()
    # The new oldest of "a" is its first event of two days ago, in an older partition
    # than today's; "b" is untouched; "gone" keeps its counters but no event.
    assert after["a"][0] > before["a"][0]
    assert (
        datetime.now(UTC) - timedelta(days=3)
        < after["a"][1]
        < datetime.now(UTC) - timedelta(days=1)
    )
    assert after["b"] == before["b"] and after["gone"] == (None, None)
    with own_db.connect() as conn:
        page, _ = topic_page(conn, limit=10, prefix="gone", oldest=True)
        assert page == [
            {
                "topic": "gone",
                "stored": 2,
                "duplicates": 0,
                "failed": 0,
                "oldest_position": None,
                "oldest_stored_at": None,
            }
        ]
        # Without oldest, a page is the counters alone, as before.
        page, _ = topic_page(conn, limit=10, prefix="gone")
        assert page == [{"topic": "gone", "stored": 2, "duplicates": 0, "failed": 0}]


def test_two_runners_never_both_act(own_db: Engine) -> None:
    with own_db.connect() as holder:
        holder.execute(select(func.pg_advisory_lock(RETENTION_LOCK)))
        assert not run_retention(own_db, KEEP_3_DAYS).ran
        holder.execute(select(func.pg_advisory_unlock(RETENTION_LOCK)))
    assert run_retention(own_db, KEEP_3_DAYS).ran


def test_the_command_runs_once_and_logs_what_it_did(own_db: Engine) -> None:
    url = own_db.url.render_as_string(hide_password=False)
    env = {**os.environ, "DATABASE_URL": url, "RETENTION_DAYS": "3", "PARTITIONS_AHEAD": "4"}
    done = subprocess.run(
        [sys.executable, "-m", "app.retention"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    lines = [orjson.loads(line) for line in (done.stdout + done.stderr).splitlines() if line]
    run = next(line for line in lines if line["message"] == "retention run")
    assert run["ran"] is True and run["dropped"] == []
    refused = subprocess.run(
        [sys.executable, "-m", "app.retention"],
        cwd=ROOT,
        env={**env, "DEDUP_HORIZON_DAYS": "1"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert refused.returncode != 0 and "DEDUP_HORIZON_DAYS" in refused.stderr


def test_the_command_names_an_unreachable_database_in_one_line() -> None:
    url = f"postgresql+psycopg2://postgres:secret@127.0.0.1:{free_port()}/aggregator"
    done = subprocess.run(
        [sys.executable, "-m", "app.retention"],
        cwd=ROOT,
        env={**os.environ, "DATABASE_URL": url},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 69, output
    [line] = [orjson.loads(text) for text in output.splitlines() if text]
    assert line["level"] == "ERROR"
    assert (
        "cannot reach the database at postgresql+psycopg2://postgres:***@127.0.0.1"
        in (line["message"])
    )
    assert "DATABASE_URL" in line["message"] and "secret" not in output


def follow(url: str, cursor: str, stop: threading.Event, seen: list[str], gaps: list[bool]) -> None:
    """Follow the log from cursor until stopped and the log is drained."""
    while True:
        draining = stop.is_set()
        answer = requests.get(
            f"{url}/events", params={"cursor": cursor, "wait": 1, "limit": 200}, timeout=30
        )
        assert answer.status_code == 200, answer.text
        page = answer.json()
        seen.extend(f"{e['topic']}/{e['event_id']}" for e in page["events"])
        gaps.append(page.get("retention_gap", False))
        cursor = page["next_cursor"]
        if draining and not page["events"]:
            return


def test_a_run_with_a_publisher_and_a_follower_active_loses_and_double_counts_nothing(
    api: Api, worker: Worker, clean: None, engine: Engine
) -> None:
    url = api.url
    old = [event(f"o{n}", "old", old_timestamp()) for n in range(50)]
    publish(url, old)
    settled_stats(url, received=50)
    age(engine, "old")
    with engine.connect() as conn:
        head = conn.execute(select(func.max(events.c.position))).scalar_one()
    stop = threading.Event()
    seen: list[str] = []
    gaps: list[bool] = []
    follower = threading.Thread(target=follow, args=(url, encode_cursor(head), stop, seen, gaps))
    # A reader that left off at the start of the old events.
    stale = requests.get(f"{url}/events", params={"cursor": encode_cursor(0)}, timeout=10)
    assert "retention_gap" not in stale.json()
    follower.start()
    sent: list[str] = []

    def publisher() -> None:
        for n in range(0, 3000, 100):
            batch = [event(f"l{i}", "live") for i in range(n, n + 100)]
            batch += [event(f"l{n}", "live")]  # one duplicate per batch
            publish(url, batch)
            sent.extend(f"live/l{i}" for i in range(n, n + 100))

    writer = threading.Thread(target=publisher)
    writer.start()
    reports = []
    try:
        while writer.is_alive():
            reports.append(run_retention(engine, KEEP_3_DAYS))
            stop.wait(0.05)
    finally:
        writer.join()
    figures = settled_stats(url, received=50 + 3030)
    stop.set()
    follower.join(timeout=60)
    assert not follower.is_alive()
    assert sum(len(r.dropped) for r in reports) == 1
    assert sum(r.keys_pruned for r in reports) == 50
    # The follower saw every live event once, and no gap.
    assert len(seen) == len(set(seen)) and set(seen) == set(sent) and not any(gaps)
    assert count(engine, events, "live") == 3000 and count(engine, events, "old") == 0
    assert figures["unique_processed_db"] == 3050
    assert figures["estimated_duplicate_dropped"] == 30
    assert figures["stored_after_horizon"] == 0
    flagged = requests.get(f"{url}/events", params={"cursor": encode_cursor(0)}, timeout=10)
    assert flagged.json()["retention_gap"] is True
    assert flagged.json()["events"][0]["event_id"] == "l0"
    # The NDJSON export says so in a line of its own, which the client hands to on_gap.
    raw = requests.get(
        f"{url}/events",
        params={"cursor": encode_cursor(0), "topic": "live"},
        headers={"Accept": "application/x-ndjson"},
        timeout=30,
    )
    first_line = orjson.loads(raw.content.splitlines()[0])
    assert first_line == {"retention_gap": True, "cursor": encode_cursor(head)}
    reported: list[dict[str, Any]] = []
    exported = list(
        Client(url).export(cursor=encode_cursor(0), topic="live", on_gap=reported.append)
    )
    assert reported == [first_line] and len(exported) == 3000
    assert exported[0]["event_id"] == "l0"
    # The old events sent again: their keys are gone, so they are stored and
    # counted after the horizon; a third time they are duplicates.
    publish(url, old)
    publish(url, old[:10])
    after = settled_stats(url, received=3080 + 60)
    assert after["unique_processed_db"] == 3100
    assert after["stored_after_horizon"] == 50
    assert after["estimated_duplicate_dropped"] == 40
    assert after["retention"]["dropped_through"] == head
    wait_until(lambda: count(engine, events, "old") == 50, timeout=10)
