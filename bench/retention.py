"""Retention on a filled log: dropping the oldest day, pruning its keys, and what a writer sees.

    python -m bench.retention                       # 1,000,000 events over the last 10 days
    python -m bench.retention --rows 200000 --days 5

Fills events and event_keys with SQL, spread evenly over the last `days` UTC days
(a partition each), then runs retention (RETENTION_DAYS = DEDUP_HORIZON_DAYS =
days - 1) step by step while a writer stores one-event batches through
app.store.ledger.store_exactly_once in a loop. Prints how long each step took,
how long the ACCESS EXCLUSIVE lock the DROP takes on events was held (the DROP's
transaction), and the writer's batch latency before and during each step; last,
per-topic retention's batched DELETE of one topic's rows of two days.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
import uuid
from collections.abc import Callable
from collections.abc import Sequence
from datetime import UTC
from datetime import datetime
from datetime import timedelta
from pathlib import Path

from sqlalchemy import Engine
from sqlalchemy import text

from app.db import make_engine
from app.store.ledger import store_exactly_once
from app.store.retention import DELETE_BATCH
from app.store.retention import attach_day
from app.store.retention import delete_topic
from app.store.retention import partitions
from app.store.retention import prune_keys
from app.store.retention import raise_drop_marks
from bench.harness import bench_services
from bench.harness import log
from scripts.services import scratch_dir


def fill(engine: Engine, rows: int, days: int) -> None:
    """Create a partition per past day and fill events and keys evenly over them."""
    today = datetime.now(UTC).date()
    for back in range(days, 0, -1):
        attach_day(engine, today - timedelta(days=back))
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO events (topic, event_id, timestamp, source, payload, stored_at)"
                " SELECT 'bench-' || n % 4, 'fill-' || n, at, 'bench', jsonb_build_object('n', n),"
                " at FROM (SELECT n, now() - make_interval(days => :days) * (1 - n::float8 / :rows)"
                " AS at FROM generate_series(1, :rows) AS n) AS spread"
            ),
            {"rows": rows, "days": days},
        )
        conn.execute(
            text(
                "INSERT INTO event_keys (topic, event_id, horizon_from)"
                ' SELECT topic, event_id, greatest(stored_at, "timestamp") FROM events'
            )
        )
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM ANALYZE events"))
        conn.execute(text("VACUUM ANALYZE event_keys"))


class Writer(threading.Thread):
    """Stores one-event batches in a loop, recording each batch's latency with its start."""

    def __init__(self, database_url: str) -> None:
        super().__init__(daemon=True)
        self.engine = make_engine(database_url, pool_size=1)
        self.samples: list[tuple[float, float]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        n = 0
        while not self.stop.is_set():
            event = {
                "topic": "bench-live",
                "event_id": f"live-{n}",
                "timestamp": datetime.now(UTC).isoformat(),
                "source": "bench",
                "payload": {"n": n},
            }
            begun = time.perf_counter()
            store_exactly_once(self.engine, uuid.uuid4().hex, [event])
            self.samples.append((begun, time.perf_counter() - begun))
            n += 1
        self.engine.dispose()

    def between(self, start: float, end: float) -> list[float]:
        """Latencies of the batches that started in [start, end) or were running at start."""
        return [took for began, took in self.samples if began < end and began + took >= start]


def timed(step: Callable[[], object]) -> tuple[float, float, float]:
    started = time.perf_counter()
    step()
    return started, time.perf_counter(), time.perf_counter() - started


def measure(database_url: str, rows: int, days: int) -> list[dict[str, object]]:
    """Fill, then time each retention step with a writer running; one result row per step."""
    engine = make_engine(database_url, pool_size=2)
    try:
        log(f"filling {rows:,} events over {days} days")
        fill(engine, rows, days)
        with engine.connect() as conn:
            oldest = partitions(conn)[0]
            dropped_rows = conn.execute(text(f"SELECT count(*) FROM {oldest.name}")).scalar_one()
        writer = Writer(database_url)
        writer.start()
        time.sleep(3)
        base_start = time.perf_counter() - 3
        base_end = time.perf_counter()
        results: list[dict[str, object]] = [
            row("writer alone (3 s)", base_end - base_start, writer.between(base_start, base_end))
        ]
        start, end, took = timed(lambda: raise_drop_marks(engine, oldest))
        results.append(row("raise the drop marks", took, writer.between(start, end)))

        def drop() -> None:
            with engine.begin() as conn:
                conn.execute(text(f"DROP TABLE {oldest.name}"))

        start, end, took = timed(drop)
        results.append(
            row(
                f"DROP TABLE of one day ({dropped_rows:,} rows; ACCESS EXCLUSIVE on events)",
                took,
                writer.between(start, end),
            )
        )
        horizon = datetime.now(UTC) - timedelta(days=days - 1)
        pruned = [0]
        start, end, took = timed(lambda: pruned.__setitem__(0, prune_keys(engine, horizon)))
        results.append(
            row(f"prune that day's keys ({pruned[0]:,})", took, writer.between(start, end))
        )
        # Per-topic retention of a topic kept less (RETENTION_TOPIC_DAYS): one
        # of the four topics' rows of the next two oldest days, DELETEd in batches.
        cutoff = datetime.now(UTC) - timedelta(days=days - 3)
        deleted = [0]
        start, end, took = timed(
            lambda: deleted.__setitem__(0, delete_topic(engine, "bench-0", cutoff))
        )
        results.append(
            row(
                f"DELETE one topic's rows of two days ({deleted[0]:,},"
                f" batches of {DELETE_BATCH:,})",
                took,
                writer.between(start, end),
            )
        )
        writer.stop.set()
        writer.join()
    finally:
        engine.dispose()
    return results


def row(step: str, seconds: float, latencies: list[float]) -> dict[str, object]:
    return {
        "step": step,
        "ms": round(seconds * 1000, 1),
        "batches": len(latencies),
        "p50_ms": round(statistics.median(latencies) * 1000, 1) if latencies else None,
        "max_ms": round(max(latencies) * 1000, 1) if latencies else None,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Run the measurement and print one table row per step."""
    parser = argparse.ArgumentParser(prog="python -m bench.retention", description=__doc__)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--days", type=int, default=10)
    args = parser.parse_args(argv)
    with scratch_dir("agg-bench-retention-") as base:
        with bench_services(Path(base), durable=True, redis_aof=False) as services:
            results = measure(services.database_url, args.rows, args.days)
    print("| step | took ms | writer batches meanwhile | writer p50 ms | writer max ms |")
    print("|---|---:|---:|---:|---:|")
    for result in results:
        print(
            f"| {result['step']} | {result['ms']:,} | {result['batches']}"
            f" | {result['p50_ms']} | {result['max_ms']} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
