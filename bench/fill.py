"""Bulk fills of events and event_keys for the scale benchmarks, in SQL on the server.

Two layouts of the same rows: `days` (a partition per UTC day of stored_at, as
retention keeps them) and `single` (one partition holding every row, which reads
and writes like the unpartitioned table before migration 0008). Rows are made by
INSERT ... SELECT over generate_series, with the keys and indexes dropped first
and rebuilt from the catalog's own definitions afterwards, so whatever the
migrations made comes back. event_keys holds the key of every event, plus
`extra_keys` older keys whose events retention already dropped (a dedup horizon
longer than the retention).
"""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass
from datetime import UTC
from datetime import date
from datetime import datetime
from datetime import timedelta
from typing import Any

import psycopg2

from app.store.retention import partition_name

LAYOUTS = ("days", "single")
# The partition of the single layout: every stored_at until then (writes during the run too).
SINGLE_PARTITION = "events_upto_29991231"
# Rows written by one simulated transaction: the worker commits a batch of 500 at a time.
ROWS_PER_TXID = 500
# Extra keys are this old at least: before any kept event, as pruning would have found them.
EXTRA_KEY_AGE = "400 days"


def topic(n: int, topics: int) -> str:
    """Return the topic of row n (the same expression the fill uses in SQL)."""
    return f"topic-{n % topics:04d}"


def _topic_sql(n: str, topics: int) -> str:
    """Return the SQL of topic(n, topics); lpad alone would cut numbers past 4 digits."""
    k = f"({n} % {topics})::text"
    return f"'topic-' || lpad({k}, greatest(4, length({k})), '0')"


def event_id(n: int) -> str:
    """Return the event id of row n: random-looking, as derived ids are, so keys land all over."""
    return hashlib.md5(str(n).encode()).hexdigest()


def extra_event_id(n: int) -> str:
    """Return the event id of extra (older) key n."""
    return hashlib.md5(f"old{n}".encode()).hexdigest()


@dataclass(frozen=True)
class FillPlan:
    """What to load: rows over `days` UTC days ending now, in a layout, plus extra older keys."""

    rows: int
    days: int
    layout: str
    topics: int = 100
    extra_keys: int = 0
    # The columns that differ between benchmarks, as SQL over n (the row number)
    # and `at` (its stored_at), and the payload's wording; no braces in them.
    event_id_sql: str = "md5(n::text)"
    timestamp_sql: str = "at"
    label: str = "scale"


def _definitions(cur: Any, table: str) -> tuple[list[tuple[str, str]], list[str]]:
    """Return (constraints as (name, definition), plain index statements) of a table."""
    cur.execute(
        "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint"
        " WHERE conrelid = %s::regclass AND contype IN ('p', 'u', 'x') ORDER BY conname",
        (table,),
    )
    constraints = list(cur.fetchall())
    cur.execute(
        "SELECT pg_get_indexdef(indexrelid) FROM pg_index"
        " WHERE indrelid = %s::regclass AND indexrelid NOT IN"
        " (SELECT conindid FROM pg_constraint WHERE conrelid = %s::regclass) ORDER BY 1",
        (table, table),
    )
    # A partitioned table's index reads "ON ONLY events": that would make an
    # index of the parent alone, to be attached partition by partition.
    indexes = [row[0].replace(" ON ONLY ", " ON ") for row in cur.fetchall()]
    return constraints, indexes


def _drop_keys(cur: Any, table: str) -> list[str]:
    """Drop a table's keys and indexes; return the statements that rebuild them."""
    constraints, indexes = _definitions(cur, table)
    cur.execute(
        "SELECT indexrelid::regclass::text FROM pg_index WHERE indrelid = %s::regclass"
        " AND indexrelid NOT IN (SELECT conindid FROM pg_constraint"
        " WHERE conrelid = %s::regclass)",
        (table, table),
    )
    for (name,) in cur.fetchall():
        cur.execute(f'DROP INDEX "{name}"')
    for name, _ in constraints:
        cur.execute(f'ALTER TABLE {table} DROP CONSTRAINT "{name}"')
    return [
        *(f'ALTER TABLE {table} ADD CONSTRAINT "{name}" {d}' for name, d in constraints),
        *indexes,
    ]


def _interleave(first: list[str], second: list[str]) -> list[str]:
    merged = []
    for n in range(max(len(first), len(second))):
        merged += first[n : n + 1] + second[n : n + 1]
    return merged


def _midnight(day: date) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=UTC)


def _partitions(cur: Any, plan: FillPlan, today: date) -> None:
    """Replace the migration's partitions with the plan's layout (all empty still)."""
    cur.execute(
        "SELECT child.relname FROM pg_inherits JOIN pg_class child"
        " ON child.oid = pg_inherits.inhrelid WHERE inhparent = 'events'::regclass"
    )
    for (name,) in cur.fetchall():
        if name != "events_default":
            cur.execute(f"DROP TABLE {name}")
    if plan.layout == "single":
        cur.execute(
            f"CREATE TABLE {SINGLE_PARTITION} PARTITION OF events"
            " FOR VALUES FROM (MINVALUE) TO ('2999-12-31 00:00:00+00')"
        )
        return
    # The fill's days, today and the retention run's three days ahead.
    for back in range(plan.days - 1, -4, -1):
        day = today - timedelta(days=back)
        cur.execute(
            f"CREATE TABLE {partition_name(day)} PARTITION OF events FOR VALUES"
            f" FROM ('{_midnight(day).isoformat()}') TO"
            f" ('{_midnight(day + timedelta(days=1)).isoformat()}')"
        )


def _parallel(dsn: str, statements: list[str]) -> None:
    """Run statements on two connections at once (the machine has two cores)."""
    pending = list(statements)
    lock = threading.Lock()
    failures: list[BaseException] = []

    def work() -> None:
        conn = psycopg2.connect(dsn)
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                cur.execute("SET maintenance_work_mem = '512MB'")
                while True:
                    with lock:
                        if not pending or failures:
                            return
                        statement = pending.pop(0)
                    cur.execute(statement)
        except BaseException as exc:  # Re-raised in the caller's thread.
            failures.append(exc)
        finally:
            conn.close()

    threads = [threading.Thread(target=work) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise failures[0]


def fill(dsn: str, plan: FillPlan) -> dict[str, Any]:
    """Load the plan's rows into a migrated, empty database; return timings and sizes."""
    timings: dict[str, float] = {}
    conn = psycopg2.connect(dsn)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT now(), (now() AT TIME ZONE 'UTC')::date")
            now, today = cur.fetchone()
            start = _midnight(today - timedelta(days=plan.days - 1))
            _partitions(cur, plan, today)
            # Interleaved, so the two connections rebuild one table each: adding
            # a key locks its table, and the next statement on it would wait.
            rebuild = _interleave(_drop_keys(cur, "events"), _drop_keys(cur, "event_keys"))
            cur.execute("SELECT txid_current()")
            base_txid = cur.fetchone()[0] + 1
            conn.commit()
        # Two halves on two connections; stored_at rises with n from the first
        # midnight to now, and positions and ids follow n, as the worker writes them.
        spread = {"start": start, "now": now, "rows": plan.rows, "base": base_txid}
        insert = (
            'INSERT INTO events (id, topic, event_id, "timestamp", source, payload,'
            " stored_at, txid, position)"
            f" SELECT n, {_topic_sql('n', plan.topics)}, {plan.event_id_sql},"
            f" {plan.timestamp_sql}, 'bench', jsonb_build_object('seq', n, 'message',"
            f" 'event ' || n || ' of the {plan.label} benchmark'), at, {{base}} + (n - 1) / "
            f"{ROWS_PER_TXID}, n FROM (SELECT n, {{start}}::timestamptz +"
            " ({now}::timestamptz - {start}::timestamptz) * ((n - 0.5) / {rows})"
            " AS at FROM generate_series({lo}, {hi}) AS n) AS spread"
        )
        keys = (
            "INSERT INTO event_keys (topic, event_id, horizon_from)"
            f" SELECT {_topic_sql('n', plan.topics)}, md5('old' || n),"
            f" {{start}}::timestamptz - interval '{EXTRA_KEY_AGE}'"
            " FROM generate_series({lo}, {hi}) AS n"
        )

        def halves(template: str, total: int) -> list[str]:
            middle = total // 2
            values = {
                k: (f"'{v.isoformat()}'" if isinstance(v, datetime) else str(v))
                for k, v in spread.items()
            }
            return [
                template.format(**values, lo=lo, hi=hi)
                for lo, hi in ((1, middle), (middle + 1, total))
                if hi >= lo
            ]

        started = time.perf_counter()
        _parallel(dsn, halves(insert, plan.rows))
        timings["events"] = time.perf_counter() - started
        started = time.perf_counter()
        statements = [
            "INSERT INTO event_keys (topic, event_id, horizon_from)"
            ' SELECT topic, event_id, greatest(stored_at, "timestamp") FROM events'
        ]
        if plan.extra_keys:
            statements += halves(keys, plan.extra_keys)
        _parallel(dsn, statements)
        timings["keys"] = time.perf_counter() - started
        started = time.perf_counter()
        _parallel(dsn, rebuild)
        timings["indexes"] = time.perf_counter() - started
        started = time.perf_counter()
        _parallel(
            dsn,
            [
                f"SELECT setval(pg_get_serial_sequence('events', 'id'), {plan.rows})",
                f"SELECT setval('events_position_seq', {plan.rows})",
            ],
        )
        _parallel(dsn, ["VACUUM (ANALYZE) events", "VACUUM (ANALYZE) event_keys"])
        _parallel(dsn, ["CHECKPOINT"])
        timings["vacuum_analyze"] = time.perf_counter() - started
        with conn.cursor() as cur:
            cur.execute(
                "SELECT pg_size_pretty(sum(pg_total_relation_size(inhrelid)))"
                " FROM pg_inherits WHERE inhparent = 'events'::regclass"
            )
            events_size = cur.fetchone()[0]
            cur.execute("SELECT pg_size_pretty(pg_total_relation_size('event_keys'))")
            keys_size = cur.fetchone()[0]
            cur.execute("SELECT count(*) FROM pg_inherits WHERE inhparent = 'events'::regclass")
            partitions = cur.fetchone()[0]
    finally:
        conn.close()
    return {
        "layout": plan.layout,
        "rows": plan.rows,
        "keys": plan.rows + plan.extra_keys,
        "partitions": partitions,
        "events_size": events_size,
        "keys_size": keys_size,
        "seconds": {k: round(v, 1) for k, v in timings.items()},
        "total_seconds": round(sum(timings.values()), 1),
    }
