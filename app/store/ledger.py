"""The write path: each batch stored exactly once, with its ledger row and counters."""

from __future__ import annotations

import io
import zlib
from collections import Counter
from collections.abc import Callable
from collections.abc import Mapping
from collections.abc import Sequence
from dataclasses import dataclass
from dataclasses import field
from typing import Any
from typing import TypeVar

import orjson
import psycopg2
from sqlalchemy import CTE
from sqlalchemy import BigInteger
from sqlalchemy import Connection
from sqlalchemy import DateTime
from sqlalchemy import Engine
from sqlalchemy import Insert
from sqlalchemy import Select
from sqlalchemy import Text
from sqlalchemy import and_
from sqlalchemy import bindparam
from sqlalchemy import cast
from sqlalchemy import column
from sqlalchemy import false
from sqlalchemy import func
from sqlalchemy import select
from sqlalchemy import table
from sqlalchemy import text
from sqlalchemy import update
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.exc import DataError
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import IntegrityError
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import StatementError

from app.db import AFTER_HORIZON
from app.db import BATCH_COUNTS
from app.db import COUNTER_STRIPES
from app.db import COUNTERS
from app.db import EVENT_FIELDS
from app.db import batches
from app.db import counter_totals
from app.db import dead_letters
from app.db import event_keys
from app.db import events
from app.db import retention_marks
from app.db import topic_stats

DEDUP_CONSTRAINT = "uq_event_keys_topic_event_id"
DEAD_LETTER_CONSTRAINT = "uq_dead_letters_batch_id_topic_event_id"
# Batches at least this large are loaded with COPY (see _copy_events).
COPY_FROM_ROWS = 64
# Any constant: a writer holds this transaction-level advisory lock from taking
# its first event position until it commits, so positions become visible in
# the order they were taken (see hold_log).
LOG_LOCK = 0x6167_6C6F

Event = Mapping[str, Any]
# A stored event: its topic, and whether it counts as stored after the horizon.
Stored = tuple[str, bool]
T = TypeVar("T")


@dataclass
class BatchOutcome:
    """What one batch did to the database; `replayed` means it was already processed."""

    received: int = 0
    stored: int = 0
    duplicates: int = 0
    failed: int = 0
    # Of stored: events whose key may have been pruned (app.db.AFTER_HORIZON).
    stored_after_horizon: int = 0
    replayed: bool = False
    per_topic: dict[str, dict[str, int]] = field(default_factory=dict)
    # stored_after_horizon by topic, for the topics that had any.
    per_topic_after_horizon: dict[str, int] = field(default_factory=dict)


def _key(event: Event) -> tuple[str, str]:
    return (event["topic"], event["event_id"])


def is_poison(exc: Exception) -> bool:
    """Tell data the database refuses from failures worth retrying (connection, deadlock)."""
    if isinstance(exc, DataError | IntegrityError):
        return True
    # psycopg2 refuses some values (e.g. NUL in a string) before sending them.
    return isinstance(exc, StatementError) and not isinstance(exc, DBAPIError)


def _dedup_insert(incoming: CTE, order: Sequence[Any]) -> Insert:
    """Insert the keys of `incoming` that are new, then the events of only those keys.

    One statement: the keys go into event_keys with ON CONFLICT DO NOTHING on
    the named constraint, and RETURNING hands the new ones to the insert into
    events, so the events returned are exactly the ones stored. Each comes back
    with whether its timestamp is before the point keys were pruned to (the
    stored_after_horizon outcome: its key may have been pruned, see app.db).
    """
    fresh = (
        insert(event_keys)
        .from_select(
            ["topic", "event_id", "horizon_from"],
            select(
                incoming.c.topic,
                incoming.c.event_id,
                func.greatest(func.now(), incoming.c.timestamp),
            ),
        )
        .on_conflict_do_nothing(constraint=DEDUP_CONSTRAINT)
        .returning(event_keys.c.topic, event_keys.c.event_id)
        .cte("fresh")
    )
    source = (
        select(*(incoming.c[name] for name in EVENT_FIELDS))
        .join_from(
            incoming,
            fresh,
            and_(fresh.c.topic == incoming.c.topic, fresh.c.event_id == incoming.c.event_id),
        )
        .order_by(*order)
    )
    pruned_before = select(retention_marks.c.keys_pruned_before).scalar_subquery()
    return (
        insert(events)
        .from_select(list(EVENT_FIELDS), source)
        .returning(events.c.topic, func.coalesce(events.c.timestamp < pruned_before, false()))
        .add_cte(incoming)
        .add_cte(fresh)
    )


def _events_statement() -> Insert:
    # One statement shape for any batch size: the rows travel as five arrays
    # and unnest() turns them back into rows, so SQLAlchemy compiles this once
    # and caches it (a VALUES list would be compiled anew for every batch).
    rows = (
        func.unnest(
            bindparam("topics", type_=ARRAY(Text)),
            bindparam("event_ids", type_=ARRAY(Text)),
            bindparam("timestamps", type_=ARRAY(Text)),
            bindparam("sources", type_=ARRAY(Text)),
            bindparam("payloads", type_=ARRAY(Text)),
        )
        .table_valued(
            "topic", "event_id", "timestamp", "source", "payload", with_ordinality="ordinal"
        )
        .render_derived("incoming_rows")
    )
    incoming = select(
        rows.c.topic,
        rows.c.event_id,
        cast(rows.c.timestamp, DateTime(timezone=True)).label("timestamp"),
        rows.c.source,
        cast(rows.c.payload, JSONB).label("payload"),
        rows.c.ordinal,
    ).cte("incoming")
    # Positions in the order the rows were given (sorted by key by store_batch).
    return _dedup_insert(incoming, [incoming.c.ordinal])


_INSERT_EVENTS = _events_statement()


def insert_events(conn: Connection, rows: Sequence[Event]) -> list[Stored]:
    """Insert rows in order, skipping known keys; return (topic, after horizon) per row stored."""
    params = {
        "topics": [row["topic"] for row in rows],
        "event_ids": [row["event_id"] for row in rows],
        "timestamps": [row["timestamp"] for row in rows],
        "sources": [row["source"] for row in rows],
        "payloads": [orjson.dumps(row["payload"]).decode() for row in rows],
    }
    return [(topic, bool(late)) for topic, late in conn.execute(_INSERT_EVENTS, params)]


# A staging table per transaction: COPY fills it, one INSERT ... SELECT moves
# the rows over with the same conflict rule. ON COMMIT DROP leaves nothing
# behind on a pooled connection, whatever way the transaction ends.
_CREATE_STAGE = text(
    'CREATE TEMP TABLE incoming_events (topic text, event_id text, "timestamp" timestamptz,'
    " source text, payload jsonb) ON COMMIT DROP"
)
_COPY_STAGE = 'COPY incoming_events (topic, event_id, "timestamp", source, payload) FROM STDIN'
_STAGE = table("incoming_events", *(column(name) for name in EVENT_FIELDS))
_STAGED = select(*(_STAGE.c[name] for name in EVENT_FIELDS)).cte("incoming")
_INSERT_STAGED = _dedup_insert(_STAGED, [_STAGED.c.topic, _STAGED.c.event_id])


def hold_log(conn: Connection) -> None:
    """Take the log's write lock until this transaction ends.

    Events get positions (a sequence) only under it, so a transaction that took
    positions commits before the next one can take any: every reader's snapshot
    then holds a prefix of the positions (gaps only where a writer rolled
    back), and a cursor can never pass a row that commits later. Readers wait
    for nothing; writers wait for each other from their insert to their commit.
    """
    conn.execute(select(func.pg_advisory_xact_lock(LOG_LOCK)))


# The log lock as pg_locks shows a bigint advisory key: its high and low halves.
_LOG_LOCK_AGE = text(
    "SELECT coalesce(max(extract(epoch FROM now() - activity.xact_start)), 0)"
    " FROM pg_locks AS lock JOIN pg_stat_activity AS activity ON activity.pid = lock.pid"
    " WHERE lock.locktype = 'advisory' AND lock.granted AND lock.objsubid = 1"
    " AND lock.classid = :high AND lock.objid = :low"
    " AND lock.database = (SELECT oid FROM pg_database WHERE datname = current_database())"
).bindparams(high=LOG_LOCK >> 32, low=LOG_LOCK & 0xFFFF_FFFF)


def log_lock_age(conn: Connection) -> float:
    """Return how long the transaction holding the log's lock has been open (0 when free).

    Every store waits behind that transaction: a large figure means storing has
    stalled (PostgreSQL's timeouts end a stopped holder's session, see make_engine).
    """
    return float(conn.execute(_LOG_LOCK_AGE).scalar_one())


def _copy_text(value: str) -> str:
    # COPY's text format: backslash, tab and line breaks are escaped (NUL never
    # gets here: the API refuses it).
    return (
        value.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")
    )


def _copy_events(conn: Connection, rows: Sequence[Event]) -> list[Stored]:
    """Insert rows like insert_events, loading them with COPY; for large batches.

    psycopg2 adapts every element of insert_events' arrays in Python; COPY
    streams one text buffer that PostgreSQL parses (about twice the rows per
    second on this machine, see docs/performance.md).
    """
    conn.execute(_CREATE_STAGE)
    lines = "".join(
        f"{_copy_text(row['topic'])}\t{_copy_text(row['event_id'])}\t{row['timestamp']}\t"
        f"{_copy_text(row['source'])}\t{_copy_text(orjson.dumps(row['payload']).decode())}\n"
        for row in rows
    )
    cursor = conn.connection.cursor()
    try:
        cursor.copy_expert(_COPY_STAGE, io.StringIO(lines))
    except psycopg2.Error as exc:
        # As SQLAlchemy would raise it, so poison is told from outages the same way.
        raise DBAPIError.instance(_COPY_STAGE, None, exc, psycopg2.Error) from None
    finally:
        cursor.close()
    hold_log(conn)  # only now: loading the staging table needs no order
    return [(topic, bool(late)) for topic, late in conn.execute(_INSERT_STAGED)]


def _insert_one_by_one(
    conn: Connection, batch_id: str, rows: Sequence[Event]
) -> tuple[list[Stored], list[Event]]:
    """Insert rows separately, so one refused row cannot take the others down."""
    stored: list[Stored] = []
    refused: list[Event] = []
    for row in rows:
        try:
            with conn.begin_nested():
                stored.extend(insert_events(conn, [row]))
        except Exception as exc:
            if not is_poison(exc):
                raise
            refused.append(row)
            _dead_letter(conn, batch_id, row, exc)
    return stored, refused


def clean_text(value: object) -> str:
    """Return value as text a column can hold: NUL shown escaped, as text columns refuse it."""
    return str(value).replace("\x00", "\\0")


def _dead_letter(conn: Connection, batch_id: str, row: Event, exc: Exception) -> None:
    stmt = (
        insert(dead_letters)
        .values(
            batch_id=batch_id,
            topic=clean_text(row.get("topic", "")),
            event_id=clean_text(row.get("event_id", "")),
            # JSON text escapes NUL as \u0000, which a text column can hold.
            event=orjson.dumps(dict(row)).decode(),
            error=clean_text(getattr(exc, "orig", None) or exc).strip()[:2000],
        )
        # A redelivered batch refuses the same rows again; keep one letter each.
        .on_conflict_do_nothing(constraint=DEAD_LETTER_CONSTRAINT)
    )
    conn.execute(stmt)


def _claim_statement() -> Insert:
    return (
        insert(batches)
        .values(
            batch_id=bindparam("batch_id"),
            received=bindparam("received"),
            broker_epoch=bindparam("broker_epoch"),
            broker_seq=bindparam("broker_seq"),
        )
        .on_conflict_do_nothing(index_elements=[batches.c.batch_id])
        .returning(batches.c.batch_id)
    )


def _record_statement() -> Select[Any]:
    ledger = (
        update(batches)
        # Not named "batch_id": in an UPDATE that name would mean SET batch_id.
        .where(batches.c.batch_id == bindparam("claimed_id"))
        .values({name: bindparam(name) for name in BATCH_COUNTS})
        .returning(batches.c.batch_id)
        .cte("ledger")
    )
    per_topic = (
        func.unnest(
            bindparam("topics", type_=ARRAY(Text)),
            *(bindparam(f"topic_{name}", type_=ARRAY(BigInteger)) for name in COUNTERS),
        )
        .table_valued("topic", *COUNTERS)
        .render_derived("per_topic")
    )
    add = insert(topic_stats).from_select(
        ["topic", *COUNTERS], select(per_topic).order_by(per_topic.c.topic)
    )
    add = add.on_conflict_do_update(
        index_elements=[topic_stats.c.topic],
        set_={name: topic_stats.c[name] + add.excluded[name] for name in COUNTERS},
    )
    return (
        select(func.count())
        .select_from(ledger)
        .add_cte(add.cte("counted"))
        .add_cte(add_to_totals().cte("totalled"))
    )


def add_to_totals() -> Insert:
    """Add a batch's counts to one stripe of counter_totals (bound: stripe, total_<name>)."""
    add = insert(counter_totals).values(
        stripe=bindparam("stripe"),
        **{name: bindparam(f"total_{name}") for name in COUNTERS},
    )
    return add.on_conflict_do_update(
        index_elements=[counter_totals.c.stripe],
        set_={name: counter_totals.c[name] + add.excluded[name] for name in COUNTERS},
    )


def stripe(key: str) -> int:
    """Return the counter_totals stripe a batch adds to."""
    # Spread concurrent batches over the stripes, so they rarely wait on one row.
    return zlib.crc32(key.encode()) % COUNTER_STRIPES


# Like _INSERT_EVENTS, cached statements of one shape whatever the batch.
_CLAIM = _claim_statement()
_RECORD = _record_statement()


def _claim(
    conn: Connection, batch_id: str, received: int, epoch: str | None, seq: int | None
) -> bool:
    """Claim a batch id in the ledger; False if another copy of the batch claimed it first.

    A copy running concurrently waits on the first one's uncommitted row, then
    finds it (or, if the first rolled back, claims it itself).
    """
    params = {"batch_id": batch_id, "received": received, "broker_epoch": epoch, "broker_seq": seq}
    return conn.execute(_CLAIM, params).first() is not None


def _record(conn: Connection, batch_id: str, outcome: BatchOutcome) -> None:
    """Write the batch's counts to its ledger row and add them to the topic counters."""
    topics = sorted(outcome.per_topic)
    params: dict[str, Any] = {
        "claimed_id": batch_id,
        **{name: getattr(outcome, name) for name in BATCH_COUNTS},
        "topics": topics,
    }
    for name in COUNTERS:
        params[f"topic_{name}"] = [
            outcome.per_topic_after_horizon.get(topic, 0)
            if name == AFTER_HORIZON
            else outcome.per_topic[topic][name]
            for topic in topics
        ]
        params[f"total_{name}"] = getattr(outcome, name)
    params["stripe"] = stripe(batch_id)
    conn.execute(_RECORD, params).scalar_one()


def store_batch(
    conn: Connection,
    batch_id: str,
    rows: Sequence[Event],
    *,
    epoch: str | None = None,
    seq: int | None = None,
    guarded: bool = True,
) -> BatchOutcome:
    """Store a batch exactly once and add it to the counters, all in the caller's transaction.

    The ledger row is claimed first: a copy of a batch that was processed (or
    is being processed) finds the claim and touches neither events nor
    counters, so redelivery costs one statement and can never count twice.

    `guarded` runs the multi-row insert in a savepoint, so data the database
    refuses is retried row by row in this same transaction. Unguarded, such
    data aborts the transaction instead (see store_exactly_once), and the two
    savepoint statements are saved; unguarded batches of COPY_FROM_ROWS rows
    or more are loaded with COPY.
    """
    if not rows:
        return BatchOutcome()
    if not _claim(conn, batch_id, len(rows), epoch, seq):
        return BatchOutcome(received=len(rows), replayed=True)
    # Sorting by key makes concurrent batches with overlapping keys lock rows
    # in the same order, so they wait for each other instead of deadlocking.
    # The first copy of a key in the batch wins.
    first_copies: dict[tuple[str, str], Event] = {}
    for row in rows:
        first_copies.setdefault(_key(row), row)
    unique_rows = [first_copies[k] for k in sorted(first_copies)]

    refused: list[Event] = []
    if not guarded and len(unique_rows) >= COPY_FROM_ROWS:
        stored_rows = _copy_events(conn, unique_rows)
    elif not guarded:
        hold_log(conn)
        stored_rows = insert_events(conn, unique_rows)
    else:
        hold_log(conn)
        try:
            with conn.begin_nested():
                stored_rows = insert_events(conn, unique_rows)
        except Exception as exc:
            if not is_poison(exc):
                raise
            stored_rows, refused = _insert_one_by_one(conn, batch_id, unique_rows)

    outcome = _count(rows, stored_rows, refused)
    _record(conn, batch_id, outcome)
    return outcome


def _count(
    rows: Sequence[Event], stored_rows: Sequence[Stored], refused: Sequence[Event]
) -> BatchOutcome:
    received = Counter(row["topic"] for row in rows)
    stored = Counter(topic for topic, _ in stored_rows)
    late = Counter(topic for topic, after_horizon in stored_rows if after_horizon)
    failed = Counter(row["topic"] for row in refused)
    per_topic = {
        topic: {
            "received": n,
            "stored": stored[topic],
            "failed": failed[topic],
            "duplicates": n - stored[topic] - failed[topic],
        }
        for topic, n in received.items()
    }
    return BatchOutcome(
        received=len(rows),
        stored=sum(stored.values()),
        failed=len(refused),
        duplicates=len(rows) - sum(stored.values()) - len(refused),
        stored_after_horizon=sum(late.values()),
        per_topic=per_topic,
        per_topic_after_horizon=dict(late),
    )


def processed_batches(conn: Connection, batch_ids: Sequence[str]) -> set[str]:
    """Return which of these batch ids the ledger already holds."""
    if not batch_ids:
        return set()
    stmt = select(batches.c.batch_id).where(batches.c.batch_id == func.any(list(batch_ids)))
    return set(conn.execute(stmt).scalars())


def read_batch(conn: Connection, batch_id: str) -> dict[str, Any] | None:
    """Return a processed batch's ledger row (counts and processed_at), or None."""
    stmt = select(
        batches.c.received, *(batches.c[name] for name in BATCH_COUNTS), batches.c.processed_at
    ).where(batches.c.batch_id == batch_id)
    row = conn.execute(stmt).one_or_none()
    return None if row is None else dict(row._mapping)


# PostgreSQL aborts one side of a deadlock or serialization conflict; running
# the whole transaction again is the documented answer.
_RETRYABLE_SQLSTATES = {"40P01", "40001"}


def run_in_transaction(engine: Engine, work: Callable[[Connection], T], attempts: int = 5) -> T:
    """Run work in one transaction, again when PostgreSQL aborted it for a deadlock."""
    for attempt in range(1, attempts + 1):
        try:
            with engine.begin() as conn:
                return work(conn)
        except OperationalError as exc:
            code = getattr(exc.orig, "pgcode", None)
            if code not in _RETRYABLE_SQLSTATES or attempt == attempts:
                raise
    raise AssertionError("unreachable")


def store_exactly_once(
    engine: Engine,
    batch_id: str,
    rows: Sequence[Event],
    *,
    epoch: str | None = None,
    seq: int | None = None,
) -> BatchOutcome:
    """Store a batch in a transaction of its own, taking the cheap path first.

    Almost every batch is clean: it runs without savepoints (two statements
    fewer per batch, bench/store.py). One the database refuses data of is run
    again from the start with the savepoint and row-by-row fallback, so its
    good rows are stored and the refused ones dead-lettered.
    """
    try:
        return run_in_transaction(
            engine,
            lambda conn: store_batch(conn, batch_id, rows, epoch=epoch, seq=seq, guarded=False),
        )
    except Exception as exc:
        if not is_poison(exc):
            raise
    return run_in_transaction(
        engine, lambda conn: store_batch(conn, batch_id, rows, epoch=epoch, seq=seq)
    )
