"""Retention of the log: daily partitions created ahead and dropped whole, dedup keys pruned.

Every decision uses the database's clock (the one stored_at comes from) unless
the caller passes `now`. The order of each step is what keeps readers and
writers exact while it runs:

- A partition is dropped only after `retention_marks.dropped_through` has been
  raised to its highest position (and committed): a reader that reads its page
  first and the mark second can never miss a drop (app.store.reading).
- Keys are pruned only below the point events were dropped to, so a key always
  outlives its event, and only after `keys_pruned_before` has been raised under
  the log's lock (and committed): every writer that can miss a pruned key took
  the log's lock later, so its statement sees the mark and counts the event as
  stored_after_horizon (app.store.ledger).
"""

from __future__ import annotations

import time
from collections.abc import Collection
from collections.abc import Iterator
from collections.abc import Mapping
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from dataclasses import field
from datetime import UTC
from datetime import date
from datetime import datetime
from datetime import timedelta

from sqlalchemy import Connection
from sqlalchemy import Engine
from sqlalchemy import func
from sqlalchemy import select
from sqlalchemy import text
from sqlalchemy import update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.exc import OperationalError

from app.broker_log import prune_checkpoints
from app.db import EVENT_PARTITION
from app.db import retention_marks
from app.store.housekeeping import prune_dead_letters
from app.store.housekeeping import prune_ledger
from app.store.ledger import hold_log

# Any constant, apart from the log's lock: a runner holds this session-level
# advisory lock for its whole run, so two runners never both act.
RETENTION_LOCK = 0x7265_7465
DEFAULT_PARTITION = "events_default"
# Dropping a partition takes an ACCESS EXCLUSIVE lock on events for a few
# milliseconds, but waiting for it queues every reader and writer behind the
# wait: give up quickly and try again rather than stall them.
DROP_LOCK_TIMEOUT_MS = 500
DROP_ATTEMPTS = 5
# Keys deleted per transaction while pruning.
PRUNE_BATCH = 10_000
# Events deleted per transaction by per-topic retention (bench/retention.py
# measures what a batch costs a writer running meanwhile).
DELETE_BATCH = 5_000


@dataclass(frozen=True)
class Partition:
    """A partition of events and the stored_at range it covers (None: unbounded below)."""

    name: str
    start: datetime | None
    end: datetime


@dataclass
class RetentionReport:
    """What one run did."""

    ran: bool = True
    partitions_created: list[str] = field(default_factory=list)
    moved_from_default: int = 0
    dropped: list[str] = field(default_factory=list)
    # Partitions past RETENTION_DAYS kept for topics kept longer (RETENTION_TOPIC_DAYS).
    kept_for_topics: list[str] = field(default_factory=list)
    # Events removed by DELETE: per-topic retention (shorter topics, and the
    # other topics' rows of partitions kept for longer ones).
    events_deleted: int = 0
    # Whole days dropped because events' partitions were over RETENTION_MAX_BYTES.
    dropped_for_size: list[str] = field(default_factory=list)
    # The size of events' partitions after the run (measured when max_bytes is set).
    events_bytes: int | None = None
    drop_lock_waits: int = 0
    keys_pruned: int = 0
    ledger_pruned: int = 0
    dead_letters_pruned: int = 0
    checkpoints_pruned: int = 0
    seconds: float = 0.0


def _midnight(day: date) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=UTC)


def partition_name(day: date) -> str:
    """Return the name of the partition for one UTC day of stored_at."""
    return f"events_{day:%Y%m%d}"


def partitions(conn: Connection) -> list[Partition]:
    """Return the bounded partitions of events (not the default), oldest first."""
    names = conn.execute(
        text(
            "SELECT child.relname FROM pg_inherits"
            " JOIN pg_class child ON child.oid = pg_inherits.inhrelid"
            " WHERE pg_inherits.inhparent = 'events'::regclass"
        )
    ).scalars()
    found = []
    for name in names:
        match = EVENT_PARTITION.fullmatch(name)
        if match is None or name == DEFAULT_PARTITION:
            continue
        if match["day"]:
            start = _midnight(datetime.strptime(match["day"], "%Y%m%d").date())
            found.append(Partition(name, start, start + timedelta(days=1)))
        else:
            end = _midnight(datetime.strptime(match["upto"], "%Y%m%d").date())
            found.append(Partition(name, None, end))
    return sorted(found, key=lambda p: p.end)


def database_now(engine: Engine) -> datetime:
    """Return the database's clock."""
    with engine.connect() as conn:
        return conn.execute(select(func.now())).scalar_one()


def attach_day(engine: Engine, day: date) -> int:
    """Create and attach the partition of one day; move its rows out of the default first.

    Returns how many rows moved. The move holds the log's lock, so no writer
    adds a row for that day to the default before the partition covers it.
    """
    name, start, end = partition_name(day), _midnight(day), _midnight(day + timedelta(days=1))
    bounds = {"start": start, "end": end}
    with engine.begin() as conn:
        if any(p.name == name for p in partitions(conn)):
            return 0
        # INCLUDING CONSTRAINTS: ATTACH refuses a table without the CHECKs events has.
        conn.execute(text(f"CREATE TABLE {name} (LIKE events INCLUDING CONSTRAINTS)"))
        waiting = conn.execute(
            text(
                f"SELECT EXISTS (SELECT FROM {DEFAULT_PARTITION}"
                " WHERE stored_at >= :start AND stored_at < :end)"
            ),
            bounds,
        ).scalar_one()
        moved = 0
        if waiting:
            hold_log(conn)
            moved = conn.execute(
                text(
                    f"WITH moved AS (DELETE FROM {DEFAULT_PARTITION}"
                    " WHERE stored_at >= :start AND stored_at < :end RETURNING *)"
                    f" INSERT INTO {name} SELECT * FROM moved"
                ),
                bounds,
            ).rowcount
        # ATTACH (unlike CREATE ... PARTITION OF) leaves events itself open to
        # readers and writers: SHARE UPDATE EXCLUSIVE on it; it scans the
        # default (empty, normally) to check it holds no row of the new range.
        conn.execute(
            text(
                f"ALTER TABLE events ATTACH PARTITION {name}"
                f" FOR VALUES FROM ('{start.isoformat()}') TO ('{end.isoformat()}')"
            )
        )
    return moved


def create_partitions(engine: Engine, today: date, ahead: int) -> tuple[list[str], int]:
    """Make sure today and `ahead` days after have partitions, and the default holds no rows.

    Rows land in the default only when no partition covered their day (no run
    for `ahead` days); their days get partitions and the rows move there.
    """
    with engine.connect() as conn:
        covered = partitions(conn)
        stranded = conn.execute(
            text(
                "SELECT DISTINCT (stored_at AT TIME ZONE 'UTC')::date"
                f" FROM {DEFAULT_PARTITION} ORDER BY 1"
            )
        ).scalars()
        days = set(stranded) | {today + timedelta(days=n) for n in range(ahead + 1)}
    created, moved = [], 0
    for day in sorted(days):
        start = _midnight(day)
        # A day the migration's events_upto_* partition (or an existing one) covers.
        if any((p.start is None or p.start <= start) and start < p.end for p in covered):
            continue
        moved += attach_day(engine, day)
        created.append(partition_name(day))
    return created, moved


def raise_drop_marks(engine: Engine, partition: Partition, keeping: Sequence[str] = ()) -> None:
    """Record that everything in the partition (but the topics `keeping`) is about to go.

    Raised and committed before anything goes. dropped_before then says that
    every event stored before it is gone, but those of topics kept longer than
    RETENTION_DAYS (whose keys are pruned by their own bound, prune_topic_keys).
    """
    with engine.begin() as conn:
        highest = conn.execute(
            text(
                f"SELECT coalesce(max(position), 0) FROM {partition.name}"
                " WHERE topic <> ALL (CAST(:keeping AS text[]))"
            ),
            {"keeping": list(keeping)},
        ).scalar_one()
        _raise_marks(conn, highest, partition.end)


def _raise_marks(conn: Connection, highest: int, dropped_before: datetime | None) -> None:
    add = insert(retention_marks).values(
        singleton=True, dropped_through=highest, dropped_before=dropped_before
    )
    conn.execute(
        add.on_conflict_do_update(
            index_elements=[retention_marks.c.singleton],
            set_={
                "dropped_through": func.greatest(
                    retention_marks.c.dropped_through, add.excluded.dropped_through
                ),
                # greatest() ignores NULL: a per-topic delete leaves it as it is.
                "dropped_before": func.greatest(
                    retention_marks.c.dropped_before, add.excluded.dropped_before
                ),
            },
        )
    )


def delete_topic(engine: Engine, topic: str, before: datetime) -> int:
    """Delete a topic's events stored before `before` (a topic kept less than RETENTION_DAYS).

    dropped_through is raised (and committed) to the highest position going
    first, as for a drop, so readers are told of the gap. Batches of
    DELETE_BATCH rows, each its own transaction: writers never wait on them
    (old rows, no lock of the log).
    """
    params = {"topic": topic, "before": before}
    with engine.begin() as conn:
        highest = conn.execute(
            text("SELECT max(position) FROM events WHERE topic = :topic AND stored_at < :before"),
            params,
        ).scalar_one()
        if highest is None:
            return 0
        _raise_marks(conn, highest, None)
    return _delete_in_batches(
        engine,
        "DELETE FROM events WHERE (id, stored_at) IN ("
        " SELECT id, stored_at FROM events WHERE topic = :topic AND stored_at < :before"
        " LIMIT :batch)",
        params,
    )


def _drop(engine: Engine, name: str, report: RetentionReport) -> bool:
    """Drop a partition, giving up on its lock quickly and trying again a few times."""
    for attempt in range(DROP_ATTEMPTS):
        try:
            with engine.begin() as conn:
                conn.execute(text(f"SET LOCAL lock_timeout = {DROP_LOCK_TIMEOUT_MS}"))
                conn.execute(text(f"DROP TABLE {name}"))
            return True
        except OperationalError as exc:
            if getattr(exc.orig, "pgcode", None) != "55P03":  # lock_not_available
                raise
            report.drop_lock_waits += 1
            time.sleep(0.2 * (attempt + 1))
    return False


def _holds_any(engine: Engine, partition: Partition, topics: Sequence[str]) -> list[str]:
    """Return which of `topics` have rows in the partition (an index probe each)."""
    with engine.connect() as conn:
        return [
            topic
            for topic in topics
            if conn.execute(
                text(f"SELECT EXISTS (SELECT FROM {partition.name} WHERE topic = :topic)"),
                {"topic": topic},
            ).scalar_one()
        ]


def _delete_in_batches(engine: Engine, statement: str, params: dict[str, object]) -> int:
    deleted_all = 0
    while True:
        with engine.begin() as conn:
            deleted = conn.execute(text(statement), {**params, "batch": DELETE_BATCH}).rowcount
        deleted_all += deleted
        if deleted < DELETE_BATCH:
            return deleted_all


def keep_for_topics(
    engine: Engine, partition: Partition, keeping: Sequence[str], report: RetentionReport
) -> None:
    """Keep a partition for the topics `keeping`; delete every other row of it, in batches."""
    raise_drop_marks(engine, partition, keeping)
    report.events_deleted += _delete_in_batches(
        engine,
        f"DELETE FROM {partition.name} WHERE id = ANY (ARRAY("
        f" SELECT id FROM {partition.name} WHERE topic <> ALL (CAST(:keeping AS text[]))"
        " LIMIT :batch))",
        {"keeping": list(keeping)},
    )
    report.kept_for_topics.append(partition.name)


def drop_partitions(
    engine: Engine,
    before: datetime,
    report: RetentionReport,
    longer: Mapping[str, datetime] | None = None,
) -> bool:
    """Drop every partition whose whole range is before `before`, oldest first.

    `longer` gives, for each topic kept longer, the time before which its
    events go: a partition holding rows of one still within it is kept, and
    its other rows deleted instead. Returns False when one could not be
    dropped (its lock stayed taken); the next run tries again.
    """
    longer = longer or {}
    with engine.connect() as conn:
        expired = [p for p in partitions(conn) if p.end <= before]
    for partition in expired:
        within = [topic for topic, until in longer.items() if partition.end > until]
        keeping = _holds_any(engine, partition, within)
        if keeping:
            keep_for_topics(engine, partition, keeping, report)
            continue
        raise_drop_marks(engine, partition)
        if not _drop(engine, partition.name, report):
            # The marks stay raised: readers are told of a gap a little early.
            return False
        report.dropped.append(partition.name)
    return True


def events_bytes(conn: Connection) -> dict[str, int]:
    """Return each partition of events (the default too) with its size on disk, indexes included."""
    rows = conn.execute(
        text(
            "SELECT child.relname, pg_total_relation_size(child.oid) FROM pg_inherits"
            " JOIN pg_class child ON child.oid = pg_inherits.inhrelid"
            " WHERE pg_inherits.inhparent = 'events'::regclass"
        )
    ).all()
    return {name: int(size) for name, size in rows}


def drop_for_size(engine: Engine, max_bytes: int, today: date, report: RetentionReport) -> bool:
    """Drop the oldest whole past days while events' partitions exceed max_bytes.

    Never today's partition or later ones. Marks are raised first, as for
    any drop, so keys are still pruned only per DEDUP_HORIZON_DAYS and never
    past dropped events. Returns False when a drop's lock stayed taken.
    """
    with engine.connect() as conn:
        sizes = events_bytes(conn)
        past = [p for p in partitions(conn) if p.end <= _midnight(today)]
    total = sum(sizes.values())
    for partition in past:
        if total <= max_bytes:
            break
        raise_drop_marks(engine, partition)
        if not _drop(engine, partition.name, report):
            report.events_bytes = total
            return False
        report.dropped_for_size.append(partition.name)
        total -= sizes.get(partition.name, 0)
    report.events_bytes = total
    return True


def _raise_prune_mark(engine: Engine, before: datetime, bounded: bool = True) -> datetime | None:
    """Raise keys_pruned_before to `before` (never past dropped_before) under the log's lock.

    Returns the point keys may now be pruned to, or None while no events were
    dropped. Unbounded (a longer-kept topic, whose caller bounds `before`),
    dropped_before does not limit it.
    """
    with engine.begin() as conn:
        hold_log(conn)
        marks = conn.execute(
            select(retention_marks.c.dropped_before, retention_marks.c.keys_pruned_before)
        ).one_or_none()
        if bounded and (marks is None or marks.dropped_before is None):
            return None
        # Keys outlive their events: never prune past what was dropped.
        upto = min(before, marks.dropped_before) if bounded and marks else before
        if marks is None:
            conn.execute(insert(retention_marks).values(singleton=True, keys_pruned_before=upto))
            return upto
        if marks.keys_pruned_before is not None and marks.keys_pruned_before >= upto:
            # Already past (a longer-kept topic's prune may have raised it past
            # dropped_before): prune no further than this caller's bound.
            return upto
        conn.execute(
            update(retention_marks)
            .where(retention_marks.c.singleton.is_(True))
            .values(keys_pruned_before=upto)
        )
        return upto


def prune_keys(
    engine: Engine, before: datetime, batch: int = PRUNE_BATCH, exclude: Sequence[str] = ()
) -> int:
    """Delete dedup keys whose horizon_from is before `before` (bounded by dropped events).

    Keys of the topics in `exclude` (kept longer than RETENTION_DAYS) stay:
    prune_topic_keys prunes them by their own bound.
    """
    upto = _raise_prune_mark(engine, before)
    if upto is None:
        return 0
    return _prune_keys_before(
        engine, upto, batch, "topic <> ALL (CAST(:topics AS text[]))", exclude
    )


def prune_topic_keys(engine: Engine, topic: str, before: datetime, batch: int = PRUNE_BATCH) -> int:
    """Delete a longer-kept topic's keys whose horizon_from is before `before`.

    The caller bounds `before` by the day its events were gone through
    (run_retention); keys_pruned_before is raised to it first, as for every prune.
    """
    upto = _raise_prune_mark(engine, before, bounded=False)
    if upto is None:
        return 0
    return _prune_keys_before(engine, upto, batch, "topic = ANY (CAST(:topics AS text[]))", [topic])


def _prune_keys_before(
    engine: Engine, upto: datetime, batch: int, which: str, topics: Sequence[str]
) -> int:
    pruned = 0
    while True:
        with engine.begin() as conn:
            deleted = conn.execute(
                text(
                    "DELETE FROM event_keys WHERE ctid = ANY (ARRAY("
                    f" SELECT ctid FROM event_keys WHERE horizon_from < :upto AND {which}"
                    " LIMIT :batch))"
                ),
                {"upto": upto, "batch": batch, "topics": list(topics)},
            ).rowcount
        pruned += deleted
        if deleted < batch:
            return pruned


def split_topics(policy: RetentionPolicy) -> tuple[dict[str, int], dict[str, int]]:
    """Return the topics kept longer than retention_days, and those kept less (with their days)."""
    longer, shorter = {}, {}
    for topic, days in policy.topic_days:
        if policy.retention_days is None or days < policy.retention_days:
            shorter[topic] = days
        elif days > policy.retention_days:
            longer[topic] = days
    return longer, shorter


@dataclass(frozen=True)
class RetentionPolicy:
    """How long events and their dedup keys are kept; None keeps them for ever."""

    retention_days: int | None = None
    dedup_horizon_days: int | None = None
    partitions_ahead: int = 3
    # Oldest whole days are dropped while events' partitions exceed this.
    max_bytes: int | None = None
    # Topics kept for other numbers of days than retention_days (RETENTION_TOPIC_DAYS).
    topic_days: tuple[tuple[str, int], ...] = ()
    # The housekeeping horizons (app.store.housekeeping); None keeps the rows.
    ledger_days: int | None = None
    dead_letter_days: int | None = None
    checkpoint_days: int | None = None


def run_retention(
    engine: Engine,
    policy: RetentionPolicy,
    *,
    now: datetime | None = None,
    keep: Collection[str] = (),
) -> RetentionReport:
    """Create partitions ahead, drop those past retention, prune keys, ledger, dead letters.

    Holds RETENTION_LOCK for the whole run on a connection of its own; a run
    that finds it taken does nothing and says so (`ran` False). `keep` names
    batches whose ledger rows stay whatever their age (still pending on the broker).
    """
    started = time.monotonic()
    with retention_lock(engine) as held:
        if not held:
            return RetentionReport(ran=False)
        report = RetentionReport()
        now = now or database_now(engine)
        report.partitions_created, report.moved_from_default = create_partitions(
            engine, now.astimezone(UTC).date(), policy.partitions_ahead
        )
        complete = True
        longer, shorter = split_topics(policy)
        if policy.retention_days is not None:
            cutoff = now - timedelta(days=policy.retention_days)
            until = {topic: now - timedelta(days=days) for topic, days in longer.items()}
            complete = drop_partitions(engine, cutoff, report, until)
        for topic, days in shorter.items():
            report.events_deleted += delete_topic(engine, topic, now - timedelta(days=days))
        if policy.max_bytes is not None and complete:
            today = now.astimezone(UTC).date()
            complete = drop_for_size(engine, policy.max_bytes, today, report)
        # Pruning stops at dropped_before, which assumes every partition before
        # it is gone: not while one whose marks were raised is still there.
        if policy.dedup_horizon_days is not None and complete:
            horizon = policy.dedup_horizon_days
            report.keys_pruned = prune_keys(
                engine, now - timedelta(days=horizon), exclude=sorted(longer)
            )
            for topic, days in longer.items():
                # Every partition that ended by now - days lost this topic's rows
                # (dropped, or kept for a longer topic and cleaned): keys of its
                # events stored before that midnight may go, after max(days, horizon).
                gone_before = _midnight((now - timedelta(days=days)).astimezone(UTC).date())
                before = min(now - timedelta(days=max(days, horizon)), gone_before)
                report.keys_pruned += prune_topic_keys(engine, topic, before)
        housekeep(engine, policy, now, keep, report)
    report.seconds = round(time.monotonic() - started, 3)
    return report


def housekeep(
    engine: Engine,
    policy: RetentionPolicy,
    now: datetime,
    keep: Collection[str],
    report: RetentionReport,
) -> None:
    """Prune dead letters, then the ledger (a row waits for its letters), then checkpoints."""
    if policy.dead_letter_days is not None:
        report.dead_letters_pruned = prune_dead_letters(
            engine, now - timedelta(days=policy.dead_letter_days)
        )
    if policy.ledger_days is not None:
        report.ledger_pruned = prune_ledger(engine, now - timedelta(days=policy.ledger_days), keep)
    if policy.checkpoint_days is not None:
        with engine.begin() as conn:
            report.checkpoints_pruned = prune_checkpoints(
                conn, now - timedelta(days=policy.checkpoint_days)
            )


@contextmanager
def retention_lock(engine: Engine) -> Iterator[bool]:
    """Hold RETENTION_LOCK (session level) on a connection of its own; yield whether it was had."""
    with engine.connect() as conn:
        held = bool(conn.execute(select(func.pg_try_advisory_lock(RETENTION_LOCK))).scalar_one())
        conn.commit()
        try:
            yield held
        finally:
            if held:
                conn.execute(select(func.pg_advisory_unlock(RETENTION_LOCK)))
                conn.commit()
