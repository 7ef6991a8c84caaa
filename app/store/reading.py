"""Reading the log: a page of events after a cursor, or every event as a stream."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from typing import Any

from sqlalchemy import Connection
from sqlalchemy import Engine
from sqlalchemy import RowMapping
from sqlalchemy import Text
from sqlalchemy import cast
from sqlalchemy import func
from sqlalchemy import select
from sqlalchemy import tuple_

from app.cursors import decode_cursor
from app.cursors import encode_cursor
from app.db import EVENT_FIELDS
from app.db import events
from app.db import retention_marks
from app.store.housekeeping import pruned_marks


def _cursor_position(cursor: str) -> Any:
    """The position a cursor continues after, as a value or a subquery."""
    position = decode_cursor(cursor)
    if isinstance(position, int):
        return position
    # A cursor issued before positions: the position of the last row at or before
    # it in the old (txid, id) order, in which migration 0005 numbered the rows.
    last = (
        select(events.c.position)
        .where(tuple_(events.c.txid, events.c.id) <= tuple_(*position))
        .order_by(events.c.txid.desc(), events.c.id.desc())
        .limit(1)
        .scalar_subquery()
    )
    return func.coalesce(last, 0)


def _after(cursor: str) -> Any:
    """The condition for rows after a cursor."""
    return events.c.position > _cursor_position(cursor)


def retention_gap(conn: Connection, cursor: str | None) -> bool:
    """Tell whether retention dropped events (of any topic) that came after the cursor.

    Call it after reading the page: the mark is raised and committed before a
    partition is dropped (app.store.retention), so a page that misses dropped
    events is always followed by a mark that shows it. A page read from the
    start of the log (no cursor) has no gap: it begins at the oldest event kept.
    """
    if cursor is None:
        return False
    through = select(retention_marks.c.dropped_through).scalar_subquery()
    gap = conn.execute(select(func.coalesce(_cursor_position(cursor) < through, False)))
    return bool(gap.scalar_one())


def _gap_line(conn: Connection, cursor: str | None) -> dict[str, Any] | None:
    """The export's line for a retention gap after the cursor, or None (see iter_events)."""
    if not retention_gap(conn, cursor):
        return None
    through = conn.execute(select(retention_marks.c.dropped_through)).scalar_one()
    return {"retention_gap": True, "cursor": encode_cursor(through)}


def retention_state(conn: Connection) -> dict[str, Any]:
    """Return the oldest event kept (position, stored_at) and how far retention has gone.

    Also before when ledger rows and dead letters may have been pruned (their
    counts live on in folded rows: no counter changes).
    """
    oldest = conn.execute(
        select(events.c.position, events.c.stored_at).order_by(events.c.position).limit(1)
    ).one_or_none()
    marks = conn.execute(
        select(retention_marks.c.dropped_through, retention_marks.c.keys_pruned_before)
    ).one_or_none()
    return {
        "oldest_position": None if oldest is None else oldest.position,
        "oldest_stored_at": None if oldest is None else oldest.stored_at,
        "dropped_through": 0 if marks is None else marks.dropped_through,
        "keys_pruned_before": None if marks is None else marks.keys_pruned_before,
        **pruned_marks(conn),
    }


def _event_conditions(
    cursor: str | None,
    topic: str | None,
    source: str | None,
    since: datetime | None,
    until: datetime | None,
    payload: dict[str, Any] | None,
) -> list[Any]:
    # No horizon: positions become visible in order (app.store.ledger.hold_log), so whatever
    # this snapshot shows is a prefix of the log, however long other
    # transactions (of this database or any other) stay open.
    conditions = []
    if cursor is not None:
        conditions.append(_after(cursor))
    if topic is not None:
        conditions.append(events.c.topic == topic)
    if source is not None:
        conditions.append(events.c.source == source)
    if since is not None:
        conditions.append(events.c.timestamp >= since)
    if until is not None:
        conditions.append(events.c.timestamp < until)
    if payload is not None:
        conditions.append(events.c.payload.contains(payload))
    return conditions


def log_head(conn: Connection) -> int:
    """Return the position of the newest stored event (0 for an empty log).

    Positions become visible in order (app.store.ledger.hold_log): once this one
    is visible, so is every lower one that will ever be, so reading up to it in
    a later statement misses nothing.
    """
    return int(conn.execute(select(func.coalesce(func.max(events.c.position), 0))).scalar_one())


def _page(
    conn: Connection, conditions: list[Any], limit: int, max_bytes: int
) -> tuple[list[RowMapping], bool]:
    """Return the rows of one page (with positions) and whether more rows match."""
    # Pages stop at max_bytes of payload (at least one row each), so a page of
    # large events cannot take the server's memory: the cursor continues.
    size = func.octet_length(cast(events.c.payload, Text))
    order = (events.c.position,)
    window = (
        select(
            events,
            size.label("size"),
            func.sum(size).over(order_by=order).label("running"),
            func.lag(size).over(order_by=order).label("previous_size"),
        )
        .where(*conditions)
        .order_by(*order)
        .limit(limit + 1)
        .subquery()
    )
    # The page, plus the first row past its end (if any) to tell that more follow.
    starts_before = window.c.running - window.c.size - func.coalesce(window.c.previous_size, 0)
    stmt = select(window).where(starts_before < max_bytes).order_by(window.c.position)
    rows = conn.execute(stmt).mappings().all()
    page = [row for row in rows if row["running"] - row["size"] < max_bytes][:limit]
    return page, len(rows) > len(page)


def _event(row: RowMapping) -> dict[str, Any]:
    return {name: row[name] for name in (*EVENT_FIELDS, "stored_at")}


def list_events(
    conn: Connection,
    *,
    limit: int,
    cursor: str | None = None,
    topic: str | None = None,
    source: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    payload: dict[str, Any] | None = None,
    max_bytes: int = 4 * 1024 * 1024,
    upto: int | None = None,
) -> tuple[list[dict[str, Any]], str | None]:
    """Return one page of stored events, oldest first, and the cursor of the next page.

    The cursor is None at the end of the log. With `upto` (followers: the log's
    head, log_head) nothing past that position is read, and the cursor is never
    None: past the last event returned while more match, else `upto` itself, so
    the next request reads only events stored since, however few of the rows
    before matched the filters.
    """
    conditions = _event_conditions(cursor, topic, source, since, until, payload)
    if upto is not None:
        conditions.append(events.c.position <= upto)
    page, more = _page(conn, conditions, limit, max_bytes)
    if page and more:
        next_cursor: str | None = encode_cursor(page[-1]["position"])
    elif upto is not None:
        next_cursor = encode_cursor(_resume_at(cursor, upto))
    else:
        next_cursor = None
    return [_event(row) for row in page], next_cursor


def _resume_at(cursor: str | None, upto: int) -> int:
    # A cursor past the head (from a log that was longer) is kept as it is.
    position = decode_cursor(cursor) if cursor is not None else 0
    return max(position, upto) if isinstance(position, int) else upto


def iter_events(
    engine: Engine,
    *,
    cursor: str | None = None,
    topic: str | None = None,
    source: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    payload: dict[str, Any] | None = None,
    page_rows: int = 1000,
    page_bytes: int = 4 * 1024 * 1024,
) -> Iterator[list[dict[str, Any]]]:
    """Yield every matching event stored when the export began, in log order, a page at a time.

    Each page is read in a transaction of its own and the connection goes back
    to the pool before the page is yielded: a client that reads slowly, or stops
    reading, holds no connection and no transaction, only the page in hand.
    Pages follow each other by position, so nothing is read twice; every event
    carries the cursor to resume after it.

    When retention dropped events (of any topic) after the cursor a page
    started from, the page begins with a line of its own,
    `{"retention_gap": true, "cursor": ...}` (the cursor of the highest
    position dropped): what /events flags with `retention_gap`, checked after
    each page is read, so a drop during the export shows too.
    """
    conditions = _event_conditions(None, topic, source, since, until, payload)
    upto: int | None = None
    while True:
        with engine.connect() as conn:
            if upto is None:
                upto = log_head(conn)
            after = [_after(cursor)] if cursor is not None else []
            bounded = [*conditions, *after, events.c.position <= upto]
            rows, more = _page(conn, bounded, page_rows, page_bytes)
            gap = _gap_line(conn, cursor)
        page = [] if gap is None else [gap]
        for row in rows:
            event = _event(row)
            event["cursor"] = cursor = encode_cursor(row["position"])
            page.append(event)
        if page:
            yield page
        if not more:
            return
