"""Dead letters: the events the database refused, listed, counted by replay, and replayed."""

from __future__ import annotations

from typing import Any

import orjson
from sqlalchemy import Connection
from sqlalchemy import func
from sqlalchemy import select
from sqlalchemy import update

from app.db import AFTER_HORIZON
from app.db import COUNTERS
from app.db import batches
from app.db import dead_letters
from app.db import topic_stats
from app.store.housekeeping import pruned_replays
from app.store.ledger import add_to_totals
from app.store.ledger import clean_text
from app.store.ledger import hold_log
from app.store.ledger import insert_events
from app.store.ledger import is_poison
from app.store.ledger import stripe


def replay_counts(conn: Connection) -> dict[str, int]:
    """Return how many dead letters were replayed, by what the replay did (stored, duplicate).

    Letters retention pruned still count (app.store.housekeeping).
    """
    rows = conn.execute(
        select(dead_letters.c.replayed_as, func.count())
        .where(dead_letters.c.replayed_as.is_not(None))
        .group_by(dead_letters.c.replayed_as)
    ).all()
    counts = {"stored": 0, "duplicate": 0} | {result: count for result, count in rows}
    for result, letters in pruned_replays(conn).items():
        if result in counts:
            counts[result] += letters
    return counts


def list_dead_letters(conn: Connection, limit: int = 100) -> list[dict[str, Any]]:
    """Return the newest dead letters that have not been replayed."""
    stmt = (
        select(dead_letters)
        .where(dead_letters.c.replayed_at.is_(None))
        .order_by(dead_letters.c.id.desc())
        .limit(limit)
    )
    return [dict(row) for row in conn.execute(stmt).mappings()]


class ReplayRefused(Exception):
    """The database still refuses a dead-lettered event."""


def replay_dead_letter(conn: Connection, letter_id: int) -> str | None:
    """Store a dead-lettered event again and move it from failed to stored (or duplicates).

    Returns "stored" or "duplicate", or None when there is no such letter still
    waiting. The counters keep adding up: the event was already received.
    """
    letter = conn.execute(
        select(dead_letters)
        .where(dead_letters.c.id == letter_id, dead_letters.c.replayed_at.is_(None))
        .with_for_update()
    ).one_or_none()
    if letter is None:
        return None
    event = orjson.loads(letter.event)
    hold_log(conn)
    try:
        with conn.begin_nested():
            inserted = insert_events(conn, [event])
    except Exception as exc:
        if not is_poison(exc):
            raise
        raise ReplayRefused(clean_text(getattr(exc, "orig", None) or exc).strip()) from None
    stored = bool(inserted)
    moved_to = "stored" if stored else "duplicates"
    # Moved to stored, and also counted after the horizon when its key may have been pruned.
    late = {AFTER_HORIZON: 1} if stored and inserted[0][1] else {}
    conn.execute(
        update(dead_letters)
        .where(dead_letters.c.id == letter_id)
        .values(replayed_at=func.now(), replayed_as="stored" if stored else "duplicate")
    )
    conn.execute(
        update(topic_stats)
        .where(topic_stats.c.topic == letter.topic)
        .values(
            {"failed": topic_stats.c.failed - 1, moved_to: topic_stats.c[moved_to] + 1}
            | {name: topic_stats.c[name] + n for name, n in late.items()}
        )
    )
    conn.execute(
        update(batches)
        .where(batches.c.batch_id == letter.batch_id)
        .values(
            {"failed": batches.c.failed - 1, moved_to: batches.c[moved_to] + 1}
            | {name: batches.c[name] + n for name, n in late.items()}
        )
    )
    moved = {name: 0 for name in COUNTERS} | {"failed": -1, moved_to: 1} | late
    conn.execute(
        add_to_totals(),
        {"stripe": stripe(letter.batch_id), **{f"total_{k}": v for k, v in moved.items()}},
    )
    return "stored" if stored else "duplicate"
