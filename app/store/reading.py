"""Reading the log: a page of events after a cursor, or every event as a stream."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from typing import Any

from sqlalchemy import Connection
from sqlalchemy import Text
from sqlalchemy import cast
from sqlalchemy import func
from sqlalchemy import select
from sqlalchemy import tuple_

from app.cursors import decode_cursor
from app.cursors import encode_cursor
from app.db import EVENT_FIELDS
from app.db import events


def _after(cursor: str) -> Any:
    """The condition for rows after a cursor."""
    position = decode_cursor(cursor)
    if isinstance(position, int):
        return events.c.position > position
    # A cursor issued before positions: the position of the last row at or before
    # it in the old (txid, id) order, in which migration 0005 numbered the rows.
    last = (
        select(events.c.position)
        .where(tuple_(events.c.txid, events.c.id) <= tuple_(*position))
        .order_by(events.c.txid.desc(), events.c.id.desc())
        .limit(1)
        .scalar_subquery()
    )
    return events.c.position > func.coalesce(last, 0)


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
    always_cursor: bool = False,
) -> tuple[list[dict[str, Any]], str | None]:
    """Return one page of stored events, oldest first, and the cursor of the next page.

    The cursor is None at the end of the log, unless `always_cursor` (followers):
    then it is the position after the last event returned, or the one given.
    """
    conditions = _event_conditions(cursor, topic, source, since, until, payload)
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
    if page and (len(rows) > len(page) or always_cursor):
        next_cursor: str | None = encode_cursor(page[-1]["position"])
    else:
        next_cursor = cursor if always_cursor else None
    items = [{name: row[name] for name in (*EVENT_FIELDS, "stored_at")} for row in page]
    return items, next_cursor


def iter_events(
    conn: Connection,
    *,
    cursor: str | None = None,
    topic: str | None = None,
    source: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    payload: dict[str, Any] | None = None,
) -> Iterator[dict[str, Any]]:
    """Yield every matching event in log order, each with its cursor, in constant memory.

    One statement (one snapshot) read through a server-side cursor, 1,000 rows at a time.
    """
    conditions = _event_conditions(cursor, topic, source, since, until, payload)
    stmt = select(events).where(*conditions).order_by(events.c.position)
    result = conn.execution_options(stream_results=True, yield_per=1000).execute(stmt)
    for row in result.mappings():
        event = {name: row[name] for name in (*EVENT_FIELDS, "stored_at")}
        event["cursor"] = encode_cursor(row["position"])
        yield event
