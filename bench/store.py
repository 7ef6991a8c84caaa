"""The worker's database step alone: app.store.ledger.store_exactly_once per batch, in this process.

    python -m bench.store                      # batches of 1 and 500, 10% duplicates
    python -m bench.store --sizes 1,10 --batches 2000
    python -m bench.store --payload-gin        # with the optional GIN index on payload
    python -m bench.store --sizes 1000 --payload-bytes 8000   # the largest batch the API takes
    python -m bench.store --standby sync       # primary + synchronous standby (pg_auto_failover)
    python -m bench.store --standby async      # the same pair, synchronous_commit=local

For each batch size: batches per second, and per batch the wall time and this
process's CPU (SQLAlchemy and psycopg2) and PostgreSQL's CPU (its backend). One
transaction per batch, as the task runs it; durable commits. It starts a private
PostgreSQL (or uses DATABASE_URL's server with a throwaway database).
"""

from __future__ import annotations

import argparse
import statistics
import time
import uuid
from collections.abc import Callable
from collections.abc import Sequence
from pathlib import Path

import psutil
from sqlalchemy import text

from app.db import make_engine
from app.store.ledger import store_exactly_once
from bench.harness import bench_services
from bench.harness import log
from scripts.services import ROOT
from scripts.services import scratch_dir


def _sizes(raw: str) -> list[int]:
    return [int(part) for part in raw.split(",") if part.strip()]


def events(size: int, start: int, payload_bytes: int = 0) -> list[dict[str, object]]:
    """A batch whose every tenth event repeats an earlier key; payloads padded to payload_bytes."""
    pad = "x" * payload_bytes
    rows = []
    for n in range(start, start + size):
        key = n - 1 if n % 10 == 9 and n > start else n
        rows.append(
            {
                "topic": f"bench-{n % 4}",
                "event_id": f"e-{key}",
                "timestamp": "2026-03-01T08:00:00+00:00",
                "source": "bench",
                "payload": {"n": n, "pad": pad} if pad else {"n": n},
            }
        )
    return rows


def measure(
    database_url: str,
    size: int,
    batches: int,
    payload_bytes: int = 0,
    first: int = 0,
    make_batch: Callable[[int], list[dict[str, object]]] | None = None,
) -> dict[str, float]:
    """Store `batches` batches of `size` events, keys from `first` on; return rates and costs.

    `make_batch(n)` builds batch n instead (of `size` events), for other mixes of keys.
    """
    engine = make_engine(database_url, pool_size=1)
    try:
        with engine.begin() as conn:
            backend = conn.execute(text("SELECT pg_backend_pid()")).scalar_one()
        postgres = psutil.Process(backend)
        me = psutil.Process()
        walls = []
        # What the database said it did: a benchmark's batches must do what they claim.
        stored = duplicates = 0
        cpu_before, pg_before = me.cpu_times(), postgres.cpu_times()
        started = time.perf_counter()
        for n in range(batches):
            if make_batch is None:
                batch = events(size, first + n * size, payload_bytes)
            else:
                batch = make_batch(n)
            batch_id = uuid.uuid4().hex
            begun = time.perf_counter()
            outcome = store_exactly_once(engine, batch_id, batch)
            stored += outcome.stored
            duplicates += outcome.duplicates
            walls.append(time.perf_counter() - begun)
        elapsed = time.perf_counter() - started
        cpu_after, pg_after = me.cpu_times(), postgres.cpu_times()
    finally:
        engine.dispose()
    cpu = (cpu_after.user + cpu_after.system) - (cpu_before.user + cpu_before.system)
    pg = (pg_after.user + pg_after.system) - (pg_before.user + pg_before.system)
    return {
        "size": size,
        "batches_per_s": round(batches / elapsed, 1),
        "events_per_s": round(batches * size / elapsed, 1),
        "wall_us_p50": round(statistics.median(walls) * 1e6),
        "wall_us_max": round(max(walls) * 1e6),
        "client_cpu_us_per_batch": round(cpu / batches * 1e6),
        "postgres_cpu_us_per_batch": round(pg / batches * 1e6),
        "stored": stored,
        "duplicates": duplicates,
    }


def create_payload_gin(database_url: str) -> None:
    """Run deploy/sql/payload_gin.sql (CREATE INDEX CONCURRENTLY: outside a transaction)."""
    sql = (ROOT / "deploy" / "sql" / "payload_gin.sql").read_text()
    statement = "\n".join(line for line in sql.splitlines() if not line.startswith("--"))
    engine = make_engine(database_url)
    try:
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text(statement))
    finally:
        engine.dispose()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the measurement and print one table row per batch size."""
    parser = argparse.ArgumentParser(prog="python -m bench.store", description=__doc__)
    parser.add_argument("--sizes", type=_sizes, default=[1, 500])
    parser.add_argument("--batches", type=int, default=1000, help="batches per size")
    parser.add_argument(
        "--payload-bytes", type=int, default=0, help="pad each payload to about this size"
    )
    parser.add_argument(
        "--payload-gin",
        action="store_true",
        help="create the optional GIN index of deploy/sql/payload_gin.sql first",
    )
    parser.add_argument(
        "--standby",
        choices=("sync", "async"),
        help="store on a pg_auto_failover primary with a standby, commits waiting for it (sync)"
        " or not (async: synchronous_commit=local)",
    )
    args = parser.parse_args(argv)
    with scratch_dir("agg-bench-store-") as base:
        with bench_services(
            Path(base), durable=True, redis_aof=False, standby=args.standby
        ) as services:
            if args.payload_gin:
                create_payload_gin(services.database_url)
                log("with the optional GIN index on events.payload")
            rows = []
            for size in args.sizes:
                count = max(20, args.batches // max(1, size // 10))
                log(f"{count} batches of {size}")
                rows.append(measure(services.database_url, size, count, args.payload_bytes))
    print(
        "| events/batch | batches/s | events/s | wall p50 µs | wall max µs | client CPU µs/batch"
        " | PostgreSQL CPU µs/batch |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['size']} | {row['batches_per_s']:,} | {row['events_per_s']:,}"
            f" | {row['wall_us_p50']:,} | {row['wall_us_max']:,}"
            f" | {row['client_cpu_us_per_batch']:,} | {row['postgres_cpu_us_per_batch']:,} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
