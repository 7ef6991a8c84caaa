"""Counter reads: the exact totals from the striped rows, and per-topic counters by page."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection
from sqlalchemy import func
from sqlalchemy import select

from app.db import COUNTERS
from app.db import OUTCOMES
from app.db import counter_totals
from app.db import topic_stats


@dataclass
class Totals:
    """Processed counters from the ledger's totals."""

    received: int = 0
    stored: int = 0
    duplicates: int = 0
    failed: int = 0
    # Of stored: events whose key may have been pruned (app.db.AFTER_HORIZON).
    stored_after_horizon: int = 0


def read_totals(conn: Connection) -> Totals:
    """Sum the striped totals: a few rows, however many topics or events there are."""
    row = conn.execute(
        select(*(func.coalesce(func.sum(counter_totals.c[name]), 0) for name in COUNTERS))
    ).one()
    return Totals(*(int(value) for value in row))


def topic_page(
    conn: Connection, *, limit: int, after: str | None = None, prefix: str | None = None
) -> tuple[list[dict[str, Any]], str | None]:
    """Return per-topic counters in code-point order of topic, and the last topic if more follow."""
    topic = topic_stats.c.topic.collate("C")
    conditions = []
    if after is not None:
        conditions.append(topic > after)
    if prefix:
        conditions.append(topic >= prefix)
        end = _prefix_end(prefix)
        if end is not None:
            conditions.append(topic < end)
    stmt = select(topic_stats).where(*conditions).order_by(topic).limit(limit + 1)
    rows = conn.execute(stmt).mappings().all()
    page = [
        {"topic": row["topic"], **{name: row[name] for name in OUTCOMES}} for row in rows[:limit]
    ]
    return page, page[-1]["topic"] if len(rows) > limit else None


def _prefix_end(prefix: str) -> str | None:
    """The first string after every string that starts with prefix, in code-point order."""
    chars = list(prefix)
    while chars:
        last = ord(chars.pop())
        if last < 0x10FFFF:
            following = last + 1 if last + 1 != 0xD800 else 0xE000  # no surrogates in text
            return "".join(chars) + chr(following)
    return None
