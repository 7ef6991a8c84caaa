"""What GET /stats/topics?oldest=true costs a page, next to the counters alone.

    python -m bench.oldest                              # 3,000,000 rows, 30 days, 100 topics
    python -m bench.oldest --rows 100000 --requests 20  # a quick check

Fills one throwaway database (bench.fill, daily partitions, durable commits) and
gives topic_stats a row for each of its topics plus `--gone` topics with no event
kept (as after retention dropped all of theirs). Then, alternating, times pages
through a gunicorn of its own (sequential GETs on one keep-alive connection) and
the same statement in this process with EXPLAIN (ANALYZE, BUFFERS): its time,
shared buffers touched, and the number of partition index scans in its plan.
"""

from __future__ import annotations

import argparse
import contextlib
import os
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
from sqlalchemy import Engine
from sqlalchemy.dialects import postgresql

from aggregator_client.outcomes import percentile
from app.db import make_engine
from app.store.counters import topic_page
from bench.fill import FillPlan
from bench.fill import fill
from bench.harness import code_digest
from bench.harness import finish
from bench.harness import fmt
from bench.harness import log
from bench.harness import machine
from bench.harness import median
from bench.harness import postgres_settings
from bench.harness import table
from bench.harness import warn_if_busy
from scripts.services import plain_dsn
from scripts.services import postgres_server_url
from scripts.services import private_redis
from scripts.services import scratch_dir
from scripts.services import throwaway_database
from scripts.stack import Api

TOKEN = "bench-" + uuid.uuid4().hex + uuid.uuid4().hex + ":read"
HEADERS = {"Authorization": f"Bearer {TOKEN.split(':')[0]}"}
# (case, prefix, limit, oldest): the first two pages are what the API serves by
# default and with oldest; the 1,000-topic page with oldest is what the cap refuses
# (measured in this process only).
CASES = (
    ("100 topics, counters", "topic-", 100, False),
    ("100 topics, oldest", "topic-", 100, True),
    ("100 topics none kept, oldest", "gone-", 100, True),
    ("1,000 topics, counters", "gone-", 1000, False),
    ("1,000 topics, oldest (refused by the API)", "gone-", 1000, True),
)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.oldest", description=__doc__.split("\n")[0]
    )
    add = parser.add_argument
    add("--rows", type=int, default=3_000_000, help="events (default 3,000,000)")
    add("--days", type=int, default=30, help="daily partitions the rows span (default 30)")
    add("--topics", type=int, default=100, help="topics with events (default 100)")
    add("--gone", type=int, default=1000, help="topics with none kept (default 1,000)")
    add("--requests", type=int, default=200, help="timed requests per case (default 200)")
    add("--warmup", type=int, default=20, help="untimed requests per case first (default 20)")
    add("--json", type=Path, default=None, help="default bench/results/oldest-<time>.json")
    args = parser.parse_args(argv)
    if args.rows < 1000 or args.days < 3 or args.gone < 1000 or args.requests < 1:
        parser.error("--rows >= 1000, --days >= 3, --gone >= 1000, --requests >= 1")
    return args


def add_topic_rows(dsn: str, topics: int, gone: int) -> None:
    """Give topic_stats a row per filled topic and per topic with nothing kept."""
    conn = psycopg2.connect(dsn)
    try:
        with conn, conn.cursor() as cur:
            cur.execute(
                "INSERT INTO topic_stats (topic, stored) SELECT topic, count(*)"
                " FROM events GROUP BY topic"
            )
            cur.execute(
                "INSERT INTO topic_stats (topic, stored)"
                " SELECT 'gone-' || lpad(n::text, 5, '0'), 1 FROM generate_series(1, %s) AS n",
                (gone,),
            )
            cur.execute("ANALYZE topic_stats")
    finally:
        conn.close()


def explain(engine: Engine, prefix: str, limit: int, oldest: bool) -> dict[str, Any]:
    """Run the page's statement under EXPLAIN (ANALYZE, BUFFERS); time, buffers, index scans."""
    statements: list[str] = []

    class Capture:
        def execute(self, stmt: Any) -> Any:
            compiled = stmt.compile(
                dialect=postgresql.dialect(), compile_kwargs={"literal_binds": True}
            )
            statements.append(str(compiled))
            raise _Captured

    with contextlib.suppress(_Captured):
        topic_page(Capture(), limit=limit, prefix=prefix, oldest=oldest)  # type: ignore[arg-type]
    with engine.connect() as conn:
        raw = conn.exec_driver_sql(
            "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + statements[0]
        ).scalar_one()
    plan = (raw if isinstance(raw, list) else orjson.loads(raw))[0]
    nodes: list[dict[str, Any]] = []

    def walk(node: dict[str, Any]) -> None:
        nodes.append(node)
        for child in node.get("Plans", []):
            walk(child)

    walk(plan["Plan"])
    index_scans = sum(
        n.get("Actual Loops", 0)
        for n in nodes
        if n["Node Type"] in ("Index Scan", "Index Only Scan")
        and n.get("Relation Name", "").startswith("events")
    )
    top = plan["Plan"]
    return {
        "execution_ms": plan["Execution Time"],
        "shared_hit": top.get("Shared Hit Blocks", 0),
        "shared_read": top.get("Shared Read Blocks", 0),
        "event_index_scans": index_scans,
        "merge_append": any(n["Node Type"] == "Merge Append" for n in nodes),
    }


class _Captured(Exception):
    pass


def time_pages(api: Api, prefix: str, limit: int, oldest: bool, count: int, warmup: int) -> dict:
    """GET the page count + warmup times; latency of the timed ones."""
    query = {"prefix": prefix, "limit": str(limit)} | ({"oldest": "true"} if oldest else {})
    url = f"{api.url}/stats/topics?{urllib.parse.urlencode(query)}"
    pool = urllib3.PoolManager(maxsize=1)
    seconds = []
    rows = 0
    for n in range(warmup + count):
        started = time.perf_counter()
        response = pool.request("GET", url, headers=HEADERS, retries=False, timeout=60.0)
        elapsed = time.perf_counter() - started
        if response.status != 200:
            raise RuntimeError(f"{url}: {response.status} {response.data[:300]!r}")
        rows = len(orjson.loads(response.data)["topics"])
        if n >= warmup:
            seconds.append(elapsed)
    return {
        "rows": rows,
        "p50_ms": median(seconds) * 1000,
        "p99_ms": percentile(seconds, 99) * 1000,
    }


def run(args: argparse.Namespace, document: dict[str, Any]) -> None:
    """Fill, start the API, measure every case (alternating, twice over)."""
    with contextlib.ExitStack() as stack:
        base = stack.enter_context(scratch_dir("agg-bench-oldest-"))
        server = stack.enter_context(postgres_server_url(base / "pg", durable=True))
        redis_url = os.environ.get("REDIS_URL") or (
            stack.enter_context(private_redis(base / "redis", appendonly=False)).url
        )
        url = stack.enter_context(throwaway_database(server, "agg_bench_oldest"))
        document["services"] = postgres_settings(url)
        log(f"fill: {args.rows:,} events over {args.days} days, {args.topics} topics")
        document["fill"] = fill(plain_dsn(url), FillPlan(args.rows, args.days, "days", args.topics))
        add_topic_rows(plain_dsn(url), args.topics, args.gone)
        log(f"fill: {document['fill']}")
        api = Api(
            {"DATABASE_URL": url, "REDIS_URL": redis_url, "API_TOKENS": TOKEN},
            base / "api.log",
            workers=1,
        )
        stack.callback(api.stop)
        api.start()
        engine = make_engine(url)
        stack.callback(engine.dispose)
        half = max(1, args.requests // 2)
        for round_ in (1, 2):
            for case, prefix, limit, oldest in CASES:
                result: dict[str, Any] = {"round": round_, "case": case}
                result |= explain(engine, prefix, limit, oldest)
                if limit <= 100 or not oldest:
                    result |= time_pages(api, prefix, limit, oldest, half, args.warmup)
                document["cases"].append(result)
                log(f"round {round_}: {result}")


def render(document: dict[str, Any]) -> str:
    """The table: per case, HTTP latency and the statement's own time, buffers and scans."""
    rows = []
    for case, *_ in CASES:
        results = [r for r in document["cases"] if r["case"] == case]
        if not results:
            continue

        def mid(field: str, results: list[dict[str, Any]] = results) -> float | None:
            values = [r[field] for r in results if r.get(field) is not None]
            return median(values) if values else None

        rows.append(
            [
                case,
                fmt(mid("p50_ms"), 2),
                fmt(mid("p99_ms"), 2),
                fmt(mid("execution_ms"), 2),
                fmt(mid("shared_hit")),
                fmt(mid("shared_read")),
                fmt(mid("event_index_scans")),
                "yes" if all(r["merge_append"] for r in results) else "no",
            ]
        )
    fill_ = document["fill"]
    title = (
        f"GET /stats/topics, {fill_['rows']:,} events in {fill_['partitions']} partitions"
        f" ({fill_.get('events_size', '?')}); medians of 2 rounds"
    )
    return table(
        title,
        [
            "page",
            "HTTP p50 ms",
            "HTTP p99 ms",
            "SQL ms",
            "buffers hit",
            "buffers read",
            "index scans",
            "Merge Append",
        ],
        rows,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Fill, measure, print the table and write the JSON."""
    args = parse_args(argv)
    warn_if_busy()
    document: dict[str, Any] = {
        "kind": "oldest",
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": machine(),
        "code": code_digest(),
        "cases": [],
    }
    run(args, document)
    finish(document, "oldest", args.json, render)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
