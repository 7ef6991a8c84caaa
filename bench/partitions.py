"""Daily partitions vs one table at scale: API reads, the worker's store, dropping a day.

    python -m bench.partitions                         # 10,000,000 rows, 30 days, 3 rounds
    python -m bench.partitions --rows 200000 --requests 100 --repeat 1   # a quick check

Loads the same rows twice, into two throwaway databases on one PostgreSQL
(durable commits): `days` spreads them over `--days` daily partitions ending
now, `single` keeps them in one partition (how the table read and wrote before
migration 0008). event_keys holds every event's key in both. Then, per round,
the two layouts take turns (their order swapped each round):

- reads: sequential GETs on one keep-alive connection to a gunicorn of each
  database's own: a topic's first page, a topic's page at a random cursor, the
  whole log's page at a random cursor, and a follower's read of the newest page
  (`wait=1` and a cursor 100 events behind the head);
- publish: app.store.ledger.store_exactly_once in this process, one transaction
  per batch, 10% duplicates, as bench.store does (new keys each round).

Last, on the days layout with its API still up, each round drops the oldest
day (app.store.retention.drop_partitions: marks, then DROP TABLE under a lock
timeout) and prunes its keys while a writer stores one-event batches and two
readers page through the API; it prints each step's time and the longest
batch and request that overlapped it, next to those of a quiet moment before.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import sys
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable
from collections.abc import Sequence
from datetime import UTC
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
import psycopg2
import urllib3
from sqlalchemy import event
from sqlalchemy import text

from aggregator_client.outcomes import percentile
from app.cursors import encode_cursor
from app.db import make_engine
from app.store.retention import RetentionReport
from app.store.retention import drop_partitions
from app.store.retention import partitions
from app.store.retention import prune_keys
from bench import store
from bench.fill import LAYOUTS
from bench.fill import FillPlan
from bench.fill import fill
from bench.harness import ProcessGroup
from bench.harness import code_digest
from bench.harness import cpu_seconds
from bench.harness import describe
from bench.harness import finish
from bench.harness import fmt
from bench.harness import log
from bench.harness import log_tail
from bench.harness import machine
from bench.harness import median
from bench.harness import postgres_settings
from bench.harness import postmaster_pid
from bench.harness import table
from bench.harness import warn_if_busy
from bench.retention import Writer
from scripts.services import plain_dsn
from scripts.services import postgres_server_url
from scripts.services import private_redis
from scripts.services import scratch_dir
from scripts.services import throwaway_database
from scripts.stack import Api

TOKEN = "bench-" + uuid.uuid4().hex + uuid.uuid4().hex + ":read"
HEADERS = {"Authorization": f"Bearer {TOKEN.split(':')[0]}"}
PAGE = 100
# Each round's publish keys start this far apart, so every round's events are new.
ROUND_KEYS = 100_000_000
READ_CASES = (
    "topic, first page",
    "topic + cursor",
    "cursor continuation",
    "follower, newest page",
)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.partitions", description=__doc__.split("\n")[0]
    )
    add = parser.add_argument
    add("--rows", type=int, default=10_000_000, help="events per layout (default 10,000,000)")
    add("--days", type=int, default=30, help="daily partitions the rows span (default 30)")
    add("--topics", type=int, default=100, help="distinct topics (default 100)")
    add("--repeat", type=int, default=3, help="rounds of each layout, alternating (default 3)")
    add("--requests", type=int, default=500, help="timed requests per read case (default 500)")
    add("--warmup", type=int, default=50, help="untimed requests per case first (default 50)")
    add("--sizes", type=store._sizes, default=[1, 500], help="events per stored batch")
    add(
        "--batches",
        type=int,
        default=1000,
        help="one-event batches per publish round; larger sizes store proportionally fewer",
    )
    add("--drop-rounds", type=int, default=None, help="days dropped (default: --repeat)")
    add("--api-workers", type=int, default=2, help="gunicorn processes per API (default 2)")
    add("--seed", type=int, default=1)
    add("--json", type=Path, default=None, help="default bench/results/partitions-<time>.json")
    args = parser.parse_args(argv)
    if args.rows < 1000 or args.days < 3 or args.repeat < 1 or args.requests < 1:
        parser.error("--rows >= 1000, --days >= 3, --repeat and --requests >= 1")
    if args.drop_rounds is None:
        args.drop_rounds = args.repeat
    # The oldest days go; the newest (today's partial day) stays for the writer.
    args.drop_rounds = min(args.drop_rounds, args.days - 2)
    return args


def log_head(dsn: str) -> int:
    """Return the newest position stored."""
    conn = psycopg2.connect(dsn)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT coalesce(max(position), 0) FROM events")
            return int(cur.fetchone()[0])
    finally:
        conn.close()


def read_paths(
    case: str, count: int, rows: int, topics: int, head: int, rng: random.Random
) -> list[str]:
    """Return the request paths of one read case."""

    def events(**query: str) -> str:
        return "/events?" + urllib.parse.urlencode({"limit": str(PAGE), **query})

    def topic() -> str:
        return f"topic-{rng.randrange(topics):04d}"

    def cursor() -> str:
        # Not in the last pages, so every page is full.
        return encode_cursor(rng.randrange(1, max(2, rows - PAGE * topics)))

    if case == "topic, first page":
        return [events(topic=topic()) for _ in range(count)]
    if case == "topic + cursor":
        return [events(topic=topic(), cursor=cursor()) for _ in range(count)]
    if case == "cursor continuation":
        return [events(cursor=cursor()) for _ in range(count)]
    # A follower that keeps up: it asks for what follows the last event it had.
    return [events(cursor=encode_cursor(head - PAGE), wait="1")] * count


def get(pool: urllib3.PoolManager, url: str) -> tuple[float, int, int]:
    """GET url; return (seconds, status, events on the page)."""
    started = time.perf_counter()
    response = pool.request("GET", url, headers=HEADERS, retries=False, timeout=60.0)
    elapsed = time.perf_counter() - started
    rows = len(orjson.loads(response.data).get("events", [])) if response.status == 200 else 0
    return elapsed, response.status, rows


def time_reads(api: Api, postgres: ProcessGroup, paths: list[str], warmup: int) -> dict[str, Any]:
    """Time the paths after `warmup` untimed ones; latency, rates and CPU per request."""
    pool = urllib3.PoolManager(maxsize=1)
    group = ProcessGroup("api", api.executor.process.pid)
    latencies: list[float] = []
    rows = errors = 0
    try:
        for path in paths[:warmup]:
            get(pool, api.url + path)
        api_before, pg_before = group.cpu(), postgres.cpu()
        started = time.perf_counter()
        for path in paths[warmup:]:
            elapsed, status, page = get(pool, api.url + path)
            latencies.append(elapsed)
            rows += page
            errors += status != 200
        wall = time.perf_counter() - started
        api_cpu = cpu_seconds(api_before, group.cpu())
        pg_cpu = cpu_seconds(pg_before, postgres.cpu())
    finally:
        pool.clear()
    count = len(latencies)
    return {
        "requests": count,
        "p50_ms": round(percentile(latencies, 50) * 1000, 2),
        "p99_ms": round(percentile(latencies, 99) * 1000, 2),
        "requests_per_s": round(count / wall, 1),
        "events_per_s": round(rows / wall, 1),
        "rows_per_page": round(rows / max(count, 1), 1),
        "api_cpu_us_per_request": None if api_cpu is None else round(api_cpu / count * 1e6),
        "postgres_cpu_us_per_request": None if pg_cpu is None else round(pg_cpu / count * 1e6),
        "errors": errors,
    }


class Readers:
    """Threads paging through the API in a loop, each request's start and latency recorded."""

    def __init__(self, api_url: str, topics: int, rows: int, head: int) -> None:
        self.api_url = api_url
        self.topics, self.rows, self.head = topics, rows, head
        self.samples: list[tuple[float, float]] = []
        self.errors = 0
        self.stop = threading.Event()
        self.threads = [
            threading.Thread(target=self._run, args=(case, seed), daemon=True)
            for seed, case in enumerate(("topic + cursor", "follower, newest page"))
        ]

    def _run(self, case: str, seed: int) -> None:
        rng = random.Random(seed)
        pool = urllib3.PoolManager(maxsize=1)
        try:
            while not self.stop.is_set():
                for path in read_paths(case, 50, self.rows, self.topics, self.head, rng):
                    begun = time.perf_counter()
                    _, status, _ = get(pool, self.api_url + path)
                    self.samples.append((begun, time.perf_counter() - begun))
                    self.errors += status != 200
                    if self.stop.is_set():
                        return
        finally:
            pool.clear()

    def __enter__(self) -> Readers:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join()


def overlapping(samples: list[tuple[float, float]], start: float, end: float) -> list[float]:
    """Latencies of the samples that ran at any moment of [start, end)."""
    return [took for began, took in samples if began < end and began + took >= start]


def worst(samples: list[tuple[float, float]], start: float, end: float) -> float | None:
    """The longest latency (ms) among the samples that overlapped [start, end)."""
    during = overlapping(samples, start, end)
    return round(max(during) * 1000, 1) if during else None


def drop_days(
    database_url: str, api: Api, rounds: int, rows: int, topics: int
) -> list[dict[str, Any]]:
    """Drop the oldest day `rounds` times with a writer and two readers running."""
    results = []
    engine = make_engine(database_url, pool_size=2)
    # When the DROP statement began and ended: its ACCESS EXCLUSIVE lock on
    # events is taken in it and released in the commit, so the time from its
    # start until drop_partitions returns bounds how long the lock was held.
    drop_statement: dict[str, float] = {}

    @event.listens_for(engine, "before_cursor_execute")
    def _before(*args: Any) -> None:
        if args[2].startswith("DROP TABLE"):
            drop_statement["start"] = time.perf_counter()

    @event.listens_for(engine, "after_cursor_execute")
    def _after(*args: Any) -> None:
        if args[2].startswith("DROP TABLE"):
            drop_statement["end"] = time.perf_counter()

    writer = Writer(database_url)
    head = log_head(plain_dsn(database_url))
    try:
        with Readers(api.url, topics, rows, head) as readers:
            writer.start()
            for number in range(rounds):
                with engine.connect() as conn:
                    oldest = partitions(conn)[0]
                    dropped = conn.execute(text(f"SELECT count(*) FROM {oldest.name}")).scalar_one()
                quiet_start = time.perf_counter()
                time.sleep(2.0)  # A quiet moment to compare with, not a wait for a condition.
                quiet_end = time.perf_counter()
                report = RetentionReport()
                drop_start = time.perf_counter()
                drop_partitions(engine, oldest.end, report)
                drop_end = time.perf_counter()
                time.sleep(0.5)  # Requests that were queued behind the lock finish and are counted.
                pruned = [0]
                prune_start = time.perf_counter()
                pruned[0] = prune_keys(engine, oldest.end)
                prune_end = time.perf_counter()
                time.sleep(0.5)
                if report.dropped != [oldest.name]:
                    raise RuntimeError(f"{oldest.name} was not dropped: {report}")
                results.append(
                    {
                        "round": number + 1,
                        "partition": oldest.name,
                        "rows_dropped": dropped,
                        "drop_ms": round((drop_end - drop_start) * 1000, 1),
                        "drop_statement_ms": round(
                            (drop_statement["end"] - drop_statement["start"]) * 1000, 1
                        ),
                        "drop_to_commit_ms": round((drop_end - drop_statement["start"]) * 1000, 1),
                        "drop_lock_waits": report.drop_lock_waits,
                        "keys_pruned": pruned[0],
                        "prune_ms": round((prune_end - prune_start) * 1000, 1),
                        "writer_quiet_max_ms": worst(writer.samples, quiet_start, quiet_end),
                        "writer_drop_max_ms": worst(writer.samples, drop_start, drop_end),
                        "writer_prune_max_ms": worst(writer.samples, prune_start, prune_end),
                        "readers_quiet_max_ms": worst(readers.samples, quiet_start, quiet_end),
                        "readers_drop_max_ms": worst(readers.samples, drop_start, drop_end),
                        "readers_prune_max_ms": worst(readers.samples, prune_start, prune_end),
                    }
                )
                log(f"dropped {oldest.name}: {results[-1]}")
            writer.stop.set()
            writer.join()
        if readers.errors:
            raise RuntimeError(f"{readers.errors} reader requests failed")
    finally:
        writer.stop.set()
        engine.dispose()
    return results


def alternate(rounds: int) -> list[tuple[int, str]]:
    """Return (round, layout) in the order they run: the layouts take turns going first."""
    order = []
    for number in range(rounds):
        layouts = LAYOUTS if number % 2 == 0 else tuple(reversed(LAYOUTS))
        order += [(number, layout) for layout in layouts]
    return order


def run(args: argparse.Namespace, document: dict[str, Any]) -> bool:
    """Fill both layouts, start their APIs, measure; return whether every request succeeded."""
    rng = random.Random(args.seed)
    with contextlib.ExitStack() as stack:
        base = stack.enter_context(scratch_dir("agg-bench-partitions-"))
        server = stack.enter_context(postgres_server_url(base / "pg", durable=True))
        # The APIs only read: Redis holds nothing of the measurement.
        redis_url = os.environ.get("REDIS_URL") or (
            stack.enter_context(private_redis(base / "redis", appendonly=False)).url
        )
        urls = {
            layout: stack.enter_context(throwaway_database(server, f"agg_bench_{layout}"))
            for layout in LAYOUTS
        }
        postgres = ProcessGroup("postgres", postmaster_pid(urls["days"]))
        document["services"] = {**postgres_settings(urls["days"]), "redis": "private, no AOF"}
        for layout, url in urls.items():
            log(f"fill {layout}: {args.rows:,} events over {args.days} days")
            plan = FillPlan(args.rows, args.days, layout, args.topics)
            document["fill"][layout] = fill(plain_dsn(url), plan)
            log(f"fill {layout}: {document['fill'][layout]}")
        apis = {}
        for layout, url in urls.items():
            env = {"DATABASE_URL": url, "REDIS_URL": redis_url, "API_TOKENS": TOKEN}
            apis[layout] = Api(env, base / f"api-{layout}.log", workers=args.api_workers)
            stack.callback(apis[layout].stop)
            apis[layout].start()
        failed = False
        for number, layout in alternate(args.repeat):
            head = log_head(plain_dsn(urls[layout]))
            for case in READ_CASES:
                count = args.warmup + args.requests
                paths = read_paths(case, count, args.rows, args.topics, head, rng)
                result = time_reads(apis[layout], postgres, paths, args.warmup)
                document["reads"].append(
                    {"round": number + 1, "layout": layout, "case": case, **result}
                )
                failed |= bool(result["errors"])
            log(f"round {number + 1} {layout}: reads done")
            for size in args.sizes:
                batches = max(20, args.batches // max(1, size // 50))
                first = (number + 1) * ROUND_KEYS + size * ROUND_KEYS // 1000
                result = store.measure(urls[layout], size, batches, first=first)
                document["publish"].append(
                    {"round": number + 1, "layout": layout, "batches": batches, **result}
                )
            log(f"round {number + 1} {layout}: publish done")
        if args.drop_rounds:
            log(f"dropping {args.drop_rounds} days of the days layout, writer and readers on")
            document["drops"] = drop_days(
                urls["days"], apis["days"], args.drop_rounds, args.rows, args.topics
            )
        if failed:
            print(log_tail(apis["days"].log), log_tail(apis["single"].log), file=sys.stderr)
    return not failed


def _medians(
    results: list[dict[str, Any]], key: Callable[[dict[str, Any]], tuple[Any, ...]], field: str
) -> dict[tuple[Any, ...], float]:
    grouped: dict[tuple[Any, ...], list[float]] = {}
    for result in results:
        if result.get(field) is not None:
            grouped.setdefault(key(result), []).append(result[field])
    return {k: median(v) for k, v in grouped.items()}


def render(document: dict[str, Any]) -> str:
    """Render the result document as Markdown tables (medians over the rounds)."""
    out = [describe(document)]
    fills = document["fill"].values()
    out.append(
        table(
            "Fill (INSERT ... SELECT generate_series, keys and indexes rebuilt, VACUUM ANALYZE)",
            ["layout", "rows", "partitions", "events size", "event_keys size", "seconds"],
            [
                [
                    f["layout"],
                    fmt(f["rows"]),
                    fmt(f["partitions"]),
                    f["events_size"],
                    f["keys_size"],
                    fmt(f["total_seconds"], 1),
                ]
                for f in fills
            ],
        )
    )
    reads = document["reads"]
    fields = [
        ("p50_ms", 2),
        ("p99_ms", 2),
        ("requests_per_s", 0),
        ("events_per_s", 0),
        ("api_cpu_us_per_request", 0),
        ("postgres_cpu_us_per_request", 0),
    ]
    stats = {name: _medians(reads, lambda r: (r["case"], r["layout"]), name) for name, _ in fields}
    p99s: dict[tuple[str, str], list[str]] = {}
    for r in reads:
        p99s.setdefault((r["case"], r["layout"]), []).append(fmt(r["p99_ms"], 1))
    rows = [
        [
            case,
            layout,
            *(fmt(stats[name].get((case, layout)), digits) for name, digits in fields),
            " / ".join(p99s.get((case, layout), [])),
        ]
        for case in READ_CASES
        for layout in LAYOUTS
    ]
    rounds = document["args"]["repeat"]
    out.append(
        table(
            f"GET /events, limit={PAGE}, sequential on one connection (medians of {rounds} rounds)",
            [
                "case",
                "layout",
                "p50 ms",
                "p99 ms",
                "req/s",
                "events/s",
                "API CPU µs/req",
                "PG CPU µs/req",
                "p99 each round",
            ],
            rows,
            left=2,
        )
    )
    publish = document["publish"]
    for r in publish:
        r["client_cpu_us_per_event"] = r["client_cpu_us_per_batch"] / r["size"]
        r["postgres_cpu_us_per_event"] = r["postgres_cpu_us_per_batch"] / r["size"]
    pfields = [
        ("events_per_s", 0),
        ("wall_us_p50", 0),
        ("wall_us_max", 0),
        ("client_cpu_us_per_event", 1),
        ("postgres_cpu_us_per_event", 1),
    ]
    pstats = {
        name: _medians(publish, lambda r: (r["size"], r["layout"]), name) for name, _ in pfields
    }
    each: dict[tuple[int, str], list[str]] = {}
    for r in publish:
        each.setdefault((r["size"], r["layout"]), []).append(fmt(r["events_per_s"]))
    sizes = sorted({r["size"] for r in publish})
    out.append(
        table(
            f"Worker's store path (store_exactly_once, 10% duplicates; medians of {rounds} rounds)",
            [
                "events/batch",
                "layout",
                "events/s",
                "batch p50 µs",
                "batch max µs",
                "client CPU µs/event",
                "PG CPU µs/event",
                "events/s each round",
            ],
            [
                [
                    str(size),
                    layout,
                    *(fmt(pstats[name].get((size, layout)), d) for name, d in pfields),
                    " / ".join(each.get((size, layout), [])),
                ]
                for size in sizes
                for layout in LAYOUTS
            ],
            left=2,
        )
    )
    if document.get("drops"):
        out.append(
            table(
                "Dropping the oldest day (days layout) with a writer (one-event batches) and two"
                " readers (topic + cursor, follower) running; max ms of what overlapped each step",
                [
                    "round",
                    "rows dropped",
                    "drop ms (marks + DROP)",
                    "DROP stmt ms",
                    "DROP start to commit returned ms",
                    "lock waits",
                    "writer max: quiet / drop",
                    "readers max: quiet / drop",
                    "prune keys ms",
                    "writer / readers max: prune",
                ],
                [
                    [
                        str(d["round"]),
                        fmt(d["rows_dropped"]),
                        fmt(d["drop_ms"], 1),
                        fmt(d.get("drop_statement_ms"), 1),
                        fmt(d.get("drop_to_commit_ms"), 1),
                        fmt(d["drop_lock_waits"]),
                        f"{fmt(d['writer_quiet_max_ms'], 1)} / {fmt(d['writer_drop_max_ms'], 1)}",
                        f"{fmt(d['readers_quiet_max_ms'], 1)} / {fmt(d['readers_drop_max_ms'], 1)}",
                        fmt(d["prune_ms"], 1),
                        f"{fmt(d['writer_prune_max_ms'], 1)} / {fmt(d['readers_prune_max_ms'], 1)}",
                    ]
                    for d in document["drops"]
                ],
            )
        )
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    """Fill, measure, print the tables and write the JSON; non-zero if a request failed."""
    args = parse_args(argv)
    warn_if_busy()
    document: dict[str, Any] = {
        "kind": "partitions",
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": machine(),
        "code": code_digest(),
        "fill": {},
        "reads": [],
        "publish": [],
        "drops": [],
    }
    ok = run(args, document)
    finish(document, "partitions", args.json, render)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
