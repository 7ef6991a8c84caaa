"""Read latency of /stats and /events on a large events table filled by bench.fill.

    python -m bench.reads [--rows 10000000] [--topics 100] [--requests 2000] [--warmup 200]

Starts a private PostgreSQL and Redis (or uses DATABASE_URL/REDIS_URL, in a throwaway
database), migrates, fills today's partition of `events` and `event_keys` with
bench.fill (plus matching `batches` and `topic_stats`), runs VACUUM ANALYZE, starts the
API only, and times sequential GETs over loopback.
10,000,000 rows take a few minutes to fill; --rows 200000 gives a quick check.
"""

from __future__ import annotations

import argparse
import contextlib
import random
import sys
import time
import urllib.parse
import uuid
from collections.abc import Sequence
from datetime import UTC
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
import psycopg2
import urllib3

from aggregator_client.outcomes import percentile
from app.cursors import encode_cursor
from bench.fill import ROWS_PER_TXID
from bench.fill import FillPlan
from bench.fill import fill as fill_events
from bench.harness import ProcessGroup
from bench.harness import RssSampler
from bench.harness import bench_services
from bench.harness import code_digest
from bench.harness import describe
from bench.harness import finish
from bench.harness import fmt
from bench.harness import log
from bench.harness import log_tail
from bench.harness import machine
from bench.harness import median
from bench.harness import server_versions
from bench.harness import table
from bench.harness import warn_if_busy
from scripts.services import plain_dsn
from scripts.services import scratch_dir
from scripts.services import truncate_sql
from scripts.stack import Api

# Every tenth stored event is counted as having arrived twice, so the ledger has duplicates.
DUPLICATE_EVERY = 10
BASE_TIME = datetime(2026, 1, 1, tzinfo=UTC)
# The rows' own shape, as SQL over the row number n for bench.fill: ids "ev-0000000001",
# ..., and one event timestamp per 100 events (100 events/s) from BASE_TIME.
EVENT_ID_SQL = "'ev-' || lpad(n::text, 10, '0')"
TIMESTAMP_SQL = f"'{BASE_TIME.isoformat()}'::timestamptz + (n / 100) * interval '1 second'"


# Production settings: a read token (and the default rate limit).
TOKEN = "bench-" + uuid.uuid4().hex + uuid.uuid4().hex + ":read"
HEADERS = {"Authorization": f"Bearer {TOKEN.split(':')[0]}"}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.reads", description=__doc__.split("\n")[0]
    )
    add = parser.add_argument
    add("--rows", type=int, default=10_000_000, help="events to load (default 10,000,000)")
    add("--topics", type=int, default=100, help="distinct topics (default 100)")
    add("--requests", type=int, default=2000, help="timed requests per case (default 2000)")
    add("--warmup", type=int, default=200, help="untimed requests per case first (default 200)")
    add("--api-workers", type=int, default=2, help="gunicorn worker processes (default 2)")
    add("--seed", type=int, default=1, help="seed for topics and cursor positions")
    add(
        "--export-rows",
        type=int,
        default=1_000_000,
        help="events streamed by the NDJSON export case (0 skips it; default 1,000,000)",
    )
    add("--json", type=Path, default=None, help="default bench/results/reads-<timestamp>.json")
    args = parser.parse_args(argv)
    if args.rows < ROWS_PER_TXID or args.topics < 1 or args.requests < 1 or args.warmup < 0:
        parser.error(f"--rows >= {ROWS_PER_TXID}, --topics and --requests >= 1, --warmup >= 0")
    return args


def topic_names(topics: int) -> list[str]:
    """Return the topic names the fill uses."""
    return [f"topic-{k:04d}" for k in range(topics)]


def fill(dsn: str, rows: int, topics: list[str]) -> dict[str, Any]:
    """Load rows with bench.fill into today's partition, then fill the counters."""
    conn = psycopg2.connect(dsn)
    try:
        with conn.cursor() as cur:
            # bench.fill expects empty tables; the migration leaves a counter_totals row.
            cur.execute(truncate_sql())
        conn.commit()
    finally:
        conn.close()
    # One day: every row in today's partition, as a table stored today would be.
    plan = FillPlan(
        rows,
        1,
        "days",
        len(topics),
        event_id_sql=EVENT_ID_SQL,
        timestamp_sql=TIMESTAMP_SQL,
        label="read",
    )
    filled = fill_events(dsn, plan)
    timings: dict[str, float] = dict(filled["seconds"])
    conn = psycopg2.connect(dsn)
    try:
        with conn.cursor() as cur:
            started = time.perf_counter()
            counters = (
                f"count(*) + count(*) FILTER (WHERE id % {DUPLICATE_EVERY} = 0), count(*),"
                f" count(*) FILTER (WHERE id % {DUPLICATE_EVERY} = 0), 0"
            )
            cur.execute(
                "INSERT INTO topic_stats (topic, received, stored, duplicates, failed)"
                f" SELECT topic, {counters} FROM events GROUP BY topic"
            )
            cur.execute(
                "INSERT INTO counter_totals (stripe, received, stored, duplicates, failed)"
                " SELECT 0, sum(received), sum(stored), sum(duplicates), sum(failed)"
                " FROM topic_stats"
            )
            cur.execute(
                "INSERT INTO batches (batch_id, received, stored, duplicates, failed)"
                f" SELECT 'fill-' || txid, {counters} FROM events GROUP BY txid"
            )
            conn.commit()
            timings["counters"] = time.perf_counter() - started

        conn.autocommit = True
        with conn.cursor() as cur:
            started = time.perf_counter()
            cur.execute("VACUUM (ANALYZE) batches, topic_stats, counter_totals")
            timings["vacuum_analyze"] += time.perf_counter() - started
    finally:
        conn.close()
    total = sum(timings.values())
    return {
        "rows": rows,
        "topics": len(topics),
        "transactions": (rows - 1) // ROWS_PER_TXID + 1,
        "partitions": filled["partitions"],
        "events_size": filled["events_size"],
        "keys_size": filled["keys_size"],
        "seconds": {k: round(v, 2) for k, v in timings.items()},
        "total_seconds": round(total, 2),
        # bench.fill rounds to 0.1 s, so a tiny fill can take "0.0 s".
        "insert_rows_per_second": round(rows / timings["events"], 1) if timings["events"] else None,
    }


def sample_positions(dsn: str, rows: int, count: int, rng: random.Random) -> list[str]:
    """Return cursors (encode_cursor) of count randomly chosen stored rows."""
    ids = rng.sample(range(1, rows + 1), min(count, rows))
    conn = psycopg2.connect(dsn)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT position FROM events WHERE id = ANY(%s)", (ids,))
            positions = [row[0] for row in cur.fetchall()]
    finally:
        conn.close()
    rng.shuffle(positions)
    cursors = [encode_cursor(position) for position in positions]
    while len(cursors) < count:
        cursors.extend(cursors[: count - len(cursors)])
    return cursors


def build_cases(
    topics: list[str], cursors: list[str], count: int, rng: random.Random
) -> dict[str, list[str]]:
    """Return, per case, the request paths to time, in order."""

    def events(**query: str) -> str:
        return "/events?" + urllib.parse.urlencode({"limit": "100", **query})

    return {
        "/stats": ["/stats"] * count,
        "/events, first page": [events()] * count,
        "/events, random cursor": [events(cursor=cursors[i]) for i in range(count)],
        "/events, random topic, first page": [
            events(topic=rng.choice(topics)) for _ in range(count)
        ],
        "/events, random topic + cursor": [
            events(topic=rng.choice(topics), cursor=cursors[-1 - i]) for i in range(count)
        ],
        "/stats/topics, first page": ["/stats/topics?limit=100"] * count,
        "/stats/topics, random prefix": [
            "/stats/topics?" + urllib.parse.urlencode({"limit": "100", "prefix": t[:-1]})
            for t in (rng.choice(topics) for _ in range(count))
        ],
    }


def time_case(base_url: str, paths: list[str], warmup: int) -> dict[str, Any]:
    """GET each path in turn on one keep-alive connection; time all but the warm-up ones."""
    pool = urllib3.PoolManager(maxsize=1)
    latencies: list[float] = []
    page_sizes: list[int] = []
    errors = 0
    first_error: str | None = None
    try:
        for number, path in enumerate(paths):
            started = time.perf_counter()
            response = pool.request(
                "GET", base_url + path, headers=HEADERS, retries=False, timeout=30.0
            )
            elapsed = time.perf_counter() - started
            if number < warmup:
                continue
            latencies.append(elapsed)
            if response.status != 200:
                errors += 1
                first_error = first_error or f"HTTP {response.status}: {response.data[:200]!r}"
                continue
            body = orjson.loads(response.data)
            if "events" in body:
                page_sizes.append(len(body["events"]))
    finally:
        pool.clear()
    return {
        "requests": len(latencies),
        "p50_ms": round(percentile(latencies, 50) * 1000, 2),
        "p99_ms": round(percentile(latencies, 99) * 1000, 2),
        "max_ms": round(max(latencies, default=0.0) * 1000, 2),
        "mean_ms": round(sum(latencies) / max(len(latencies), 1) * 1000, 2),
        "median_rows_per_page": median(page_sizes) if page_sizes else None,
        "errors": errors,
        "first_error": first_error,
    }


def time_export(base_url: str, api_pid: int, rows: int, export_rows: int) -> dict[str, Any]:
    """Stream the last export_rows events as NDJSON; return rate and the API's RSS growth."""
    start = max(0, rows - export_rows)
    query = f"?cursor={encode_cursor(start)}" if start else ""
    group = ProcessGroup("api", api_pid)
    pool = urllib3.PoolManager(maxsize=1)
    with RssSampler([group]) as sampler:
        before = group.rss()
        started = time.perf_counter()
        response = pool.request(
            "GET",
            f"{base_url}/events{query}",
            headers={**HEADERS, "Accept": "application/x-ndjson"},
            preload_content=False,
            timeout=600.0,
        )
        lines = 0
        for chunk in response.stream(1 << 20):
            lines += chunk.count(b"\n")
        elapsed = time.perf_counter() - started
        response.release_conn()
    pool.clear()
    return {
        "rows": lines,
        "seconds": round(elapsed, 2),
        "rows_per_second": round(lines / elapsed, 1) if elapsed else None,
        "api_rss_before_mb": round(before / 2**20, 1),
        "api_rss_peak_mb": round(sampler.peaks["api"] / 2**20, 1),
    }


def render(document: dict[str, Any]) -> str:
    """Render the result document as text tables."""
    filled = document["fill"]
    seconds = filled["seconds"]
    fill_rows = [
        [
            fmt(filled["rows"]),
            fmt(filled["topics"]),
            filled["events_size"],
            filled["keys_size"],
            f"{seconds['events']:.1f}",
            fmt(filled["insert_rows_per_second"]),
            f"{seconds['keys']:.1f}",
            f"{seconds['indexes']:.1f}",
            f"{seconds['counters'] + seconds['vacuum_analyze']:.1f}",
            f"{filled['total_seconds']:.1f}",
        ]
    ]
    out = [
        describe(document),
        table(
            "Fill (bench.fill: INSERT ... SELECT, event_keys, keys and indexes;"
            " counters, VACUUM ANALYZE)",
            [
                "rows",
                "topics",
                "events size",
                "event_keys size",
                "insert s",
                "insert rows/s",
                "event_keys s",
                "index s",
                "rest s",
                "total s",
            ],
            fill_rows,
            left=0,
        ),
    ]
    rows = [
        [
            case,
            fmt(result["requests"]),
            fmt(result["p50_ms"], 2),
            fmt(result["p99_ms"], 2),
            fmt(result["max_ms"], 2),
            fmt(1000 / result["mean_ms"] if result["mean_ms"] else None),
            fmt(result["median_rows_per_page"]),
            fmt(result["errors"]),
        ]
        for case, result in document["cases"].items()
    ]
    headers = ["case", "requests", "p50 ms", "p99 ms", "max ms", "req/s", "rows/page", "errors"]
    title = f"Sequential reads over loopback, {filled['rows']:,} events, limit=100"
    out.append(table(title, headers, rows))
    if "export" in document:
        export = document["export"]
        out.append(
            table(
                "NDJSON export (Accept: application/x-ndjson), one request",
                ["rows", "seconds", "rows/s", "API RSS before MB", "API RSS peak MB"],
                [
                    [
                        fmt(export["rows"]),
                        f"{export['seconds']:.1f}",
                        fmt(export["rows_per_second"]),
                        fmt(export["api_rss_before_mb"], 1),
                        fmt(export["api_rss_peak_mb"], 1),
                    ]
                ],
            )
        )
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    """Fill, measure, print the tables and write the JSON; non-zero if a request failed."""
    args = parse_args(argv)
    warn_if_busy()
    rng = random.Random(args.seed)
    topics = topic_names(args.topics)
    document: dict[str, Any] = {
        "kind": "reads",
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": machine(),
        "code": code_digest(),
        "cases": {},
    }
    with contextlib.ExitStack() as stack:
        base = stack.enter_context(scratch_dir("agg-reads-"))
        # Reads do not depend on commit durability; fsync off makes the fill faster.
        services = stack.enter_context(bench_services(base, durable=False, redis_aof=False))
        document["services"] = {
            **server_versions(services),
            "private_postgres": services.private_postgres,
            "private_redis": services.private_redis,
        }
        dsn = plain_dsn(services.database_url)
        log(f"fill: {args.rows:,} events over {args.topics} topics")
        document["fill"] = fill(dsn, args.rows, topics)
        log(f"fill: done in {document['fill']['total_seconds']:.1f} s")
        per_case = args.warmup + args.requests
        cursors = sample_positions(dsn, args.rows, per_case, rng)
        cases = build_cases(topics, cursors, per_case, rng)
        env = {**services.env, "API_TOKENS": TOKEN}
        api = Api(env, base / "api.log", workers=args.api_workers)
        stack.callback(api.stop)
        api.start()
        for case, paths in cases.items():
            log(f"timing {case}: {args.warmup} warm-up + {args.requests} requests")
            document["cases"][case] = time_case(api.url, paths, args.warmup)
        if args.export_rows:
            log(f"export: the last {min(args.export_rows, args.rows):,} events as NDJSON")
            document["export"] = time_export(
                api.url, api.executor.process.pid, args.rows, args.export_rows
            )
            failed_export = document["export"]["rows"] != min(args.export_rows, args.rows)
        else:
            failed_export = False
        failed = failed_export or any(r["errors"] for r in document["cases"].values())
        if failed:
            print(log_tail(api.log), file=sys.stderr)
    finish(document, "reads", args.json, render)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
