"""End-to-end throughput, latency, CPU and memory of the whole stack, next to PostgreSQL's ceiling.

    python -m bench.e2e [--events 20000] [--duplicates 0.1] [--workloads batched,single]
                        [--api-workers 3] [--worker-processes 2] [--json out.json] [--repeat 1]
    python -m bench.e2e --scaling        # worker processes 1, 2, 4 x API processes 1, 3

Starts private PostgreSQL (durable commits) and Redis unless DATABASE_URL/REDIS_URL are
set (it then works in a throwaway database on that server), migrates, measures the raw
PostgreSQL ceiling on a scratch copy of `events`, then runs gunicorn + one Celery worker
and publishes with the publisher's function API until /stats has settled.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import time
import traceback
import uuid
from collections.abc import Callable
from collections.abc import Iterator
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
import psycopg2
from psycopg2.extensions import connection as PgConnection
from psycopg2.extras import execute_values

from aggregator_client.client import Client
from aggregator_client.events import plan_events
from aggregator_client.events import run_prefix
from aggregator_client.events import run_topics
from aggregator_client.report import end_to_end_rate
from aggregator_client.verify import wait_and_verify
from app.db import make_engine
from app.store.ledger import store_exactly_once
from bench.harness import ProcessGroup
from bench.harness import RssSampler
from bench.harness import Services
from bench.harness import bench_services
from bench.harness import code_digest
from bench.harness import cpu_seconds
from bench.harness import describe
from bench.harness import empty_tables
from bench.harness import finish
from bench.harness import fmt
from bench.harness import log
from bench.harness import log_tail
from bench.harness import machine
from bench.harness import postmaster_pid
from bench.harness import redis_pid
from bench.harness import server_versions
from bench.harness import table
from bench.harness import warn_if_busy
from bench.harness import write_json
from bench.profiling import py_spy
from bench.profiling import summarise
from scripts.services import plain_dsn
from scripts.services import scratch_dir
from scripts.stack import Api
from scripts.stack import Worker

COLUMNS = '(topic, event_id, "timestamp", source, payload)'
GROUPS = ("api", "worker", "postgres", "redis", "client")


@dataclass(frozen=True)
class Workload:
    """How the publisher sends: events per request and requests in flight."""

    name: str
    batch_size: int
    concurrency: int


# Production settings: every request carries a bearer token and passes the rate limit.
BENCH_TOKEN = "bench-" + uuid.uuid4().hex + uuid.uuid4().hex

WORKLOADS = {
    "batched": Workload("batched", batch_size=500, concurrency=8),
    "single": Workload("single", batch_size=1, concurrency=50),
}


def _int_list(raw: str) -> list[int]:
    values = [int(part) for part in raw.split(",") if part.strip()]
    if not values or any(value < 1 for value in values):
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas: {raw}")
    return values


def _workloads(raw: str) -> list[str]:
    names = [part.strip() for part in raw.split(",") if part.strip()]
    unknown = [name for name in names if name not in WORKLOADS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"workloads are {', '.join(WORKLOADS)}; got {raw}")
    return names


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(prog="python -m bench.e2e", description=__doc__.split("\n")[0])
    add = parser.add_argument
    add("--events", type=int, default=20000, help="events per workload run (default 20000)")
    add("--duplicates", type=float, default=0.1, help="share of deliberate duplicates")
    add("--workloads", type=_workloads, default=["batched", "single"], help="batched,single")
    add("--api-workers", type=int, default=2, help="gunicorn worker processes (default 2)")
    add("--worker-processes", type=int, default=2, help="Celery --concurrency (default 2)")
    add("--repeat", type=int, default=1, help="runs per workload; tables show the median run")
    add("--warmup", type=int, default=1000, help="events published (and discarded) first")
    add("--ceiling-batch", type=int, default=500, help="rows per statement in the ceiling")
    add("--settle-timeout", type=float, default=600.0, help="max seconds to wait for /stats")
    add("--scaling", action="store_true", help="run every workload on a grid of process counts")
    add("--scaling-api", type=_int_list, default=[1, 3], help="API processes for --scaling")
    add("--scaling-workers", type=_int_list, default=[1, 2, 4], help="workers for --scaling")
    add(
        "--redis-fsync",
        choices=["always", "everysec"],
        default="always",
        help="Redis appendfsync (default always, as production runs)",
    )
    add(
        "--profile",
        type=Path,
        default=None,
        help="record py-spy profiles of the API and the worker into this directory",
    )
    add("--json", type=Path, default=None, help="default bench/results/e2e-<timestamp>.json")
    args = parser.parse_args(argv)
    if args.events < 1 or args.repeat < 1 or args.warmup < 0:
        parser.error("--events and --repeat must be >= 1, --warmup >= 0")
    if not 0.0 <= args.duplicates < 1.0:
        parser.error("--duplicates must be in [0, 1)")
    return args


# -- PostgreSQL ceiling ---------------------------------------------------------------------


def ceiling_events(count: int, duplicates: float) -> list[dict[str, Any]]:
    """Plan events shaped like the publisher's, with the same share of duplicates."""
    topics = [f"ceiling-{k}" for k in range(4)]
    return plan_events(count, duplicates, topics, "bench", seed=1)


def _as_tuples(events: Sequence[dict[str, Any]]) -> list[tuple[str, str, str, str, str]]:
    return [
        (
            e["topic"],
            e["event_id"],
            e["timestamp"],
            e["source"],
            orjson.dumps(e["payload"]).decode(),
        )
        for e in events
    ]


def _chunks(rows: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(rows), size):
        yield rows[start : start + size]


def insert_values(conn: PgConnection, table_name: str, rows: Sequence[tuple], batch: int) -> int:
    """Insert with one multi-row INSERT ... ON CONFLICT DO NOTHING per batch, one commit each."""
    sql = f"INSERT INTO {table_name} {COLUMNS} VALUES %s ON CONFLICT (topic, event_id) DO NOTHING"
    stored = 0
    with conn.cursor() as cur:
        for chunk in _chunks(rows, batch):
            # page_size covers the chunk: one statement, and rowcount counts all of it.
            execute_values(cur, sql, chunk, page_size=len(chunk))
            stored += cur.rowcount
            conn.commit()
    return stored


def _copy_field(value: str) -> str:
    return (
        value.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")
    )


def copy_then_insert(conn: PgConnection, table_name: str, rows: Sequence[tuple], batch: int) -> int:
    """COPY each batch into a temp table, then INSERT ... SELECT ... ON CONFLICT DO NOTHING."""
    stage = f"bench_stage_{os.getpid()}"
    stored = 0
    with conn.cursor() as cur:
        cur.execute(
            f'CREATE TEMP TABLE {stage} (topic text, event_id text, "timestamp" timestamptz,'
            " source text, payload jsonb) ON COMMIT DELETE ROWS"
        )
        conn.commit()
        for chunk in _chunks(rows, batch):
            buffer = io.StringIO(
                "".join("\t".join(_copy_field(v) for v in row) + "\n" for row in chunk)
            )
            cur.copy_expert(f"COPY {stage} {COLUMNS} FROM STDIN", buffer)
            cur.execute(
                f"INSERT INTO {table_name} {COLUMNS} SELECT {COLUMNS[1:-1]} FROM {stage}"
                " ON CONFLICT (topic, event_id) DO NOTHING"
            )
            stored += cur.rowcount
            conn.commit()
        cur.execute(f"DROP TABLE {stage}")
        conn.commit()
    return stored


def app_store_batches(database_url: str, events: Sequence[dict[str, Any]], batch: int) -> int:
    """Store batches in-process as the worker does (store_exactly_once), one transaction each."""
    engine = make_engine(database_url, pool_size=1)
    stored = 0
    try:
        for chunk in _chunks(events, batch):
            stored += store_exactly_once(engine, uuid.uuid4().hex, list(chunk)).stored
    finally:
        engine.dispose()
    return stored


def _timed(label: str, rows: int, expected: int, run: Callable[[], int]) -> dict[str, Any]:
    started = time.perf_counter()
    stored = run()
    seconds = time.perf_counter() - started
    result = {
        "method": label,
        "rows": rows,
        "stored": stored,
        "expected_stored": expected,
        "seconds": round(seconds, 3),
        "rows_per_second": round(rows / seconds, 1),
    }
    log(f"ceiling {label}: {rows} rows in {seconds:.2f} s = {rows / seconds:,.0f} rows/s")
    return result


def measure_ceiling(
    services: Services, count: int, duplicates: float, batch: int
) -> dict[str, Any]:
    """Measure raw insert rates on a scratch copy of events (same columns, keys and indexes)."""
    events = ceiling_events(count, duplicates)
    rows = _as_tuples(events)
    expected = len({(e["topic"], e["event_id"]) for e in events})
    scratch = f"bench_ceiling_events_{os.getpid()}"
    conn = psycopg2.connect(plain_dsn(services.database_url))
    results: dict[str, Any] = {"batch": batch}
    try:
        with conn.cursor() as cur:
            # LIKE ... INCLUDING ALL copies defaults, identity and the indexes. Since 0008 the
            # dedup key is event_keys' and events is partitioned: the ceiling is one plain
            # table holding the key itself, what a single INSERT ... ON CONFLICT can reach.
            cur.execute(f"CREATE TABLE {scratch} (LIKE events INCLUDING ALL)")
            cur.execute(f"ALTER TABLE {scratch} ADD UNIQUE (topic, event_id)")
        conn.commit()
        methods: list[tuple[str, str, Callable[[], int]]] = [
            (
                "values",
                f"multi-row INSERT ... ON CONFLICT DO NOTHING, {batch} rows/statement",
                lambda: insert_values(conn, scratch, rows, batch),
            ),
            (
                "copy",
                f"COPY to temp + INSERT ... SELECT ON CONFLICT, {batch} rows/txn",
                lambda: copy_then_insert(conn, scratch, rows, batch),
            ),
        ]
        for key, label, run in methods:
            with conn.cursor() as cur:
                cur.execute(f"TRUNCATE {scratch}")
            conn.commit()
            results[key] = _timed(label, len(rows), expected, run)
    finally:
        with contextlib.suppress(psycopg2.Error):
            conn.rollback()
            with conn.cursor() as cur:
                cur.execute(f"DROP TABLE IF EXISTS {scratch}")
            conn.commit()
        conn.close()
    # The application's own store path, in-process: it needs the real tables,
    # which are emptied again before any workload runs.
    label = f"app.store.ledger.store_exactly_once in-process (the worker's path), {batch} rows/txn"
    try:
        results["app_store"] = _timed(
            label,
            len(events),
            expected,
            lambda: app_store_batches(services.database_url, events, batch),
        )
    except Exception as exc:  # The store API is changing; report rather than abort.
        log(f"ceiling {label} failed: {exc!r}")
        results["app_store"] = {"method": label, "error": repr(exc)}
    finally:
        empty_tables(services)
    return results


# -- the stack ------------------------------------------------------------------------------


@contextlib.contextmanager
def running_stack(
    services: Services, logs: Path, api_workers: int, worker_processes: int
) -> Iterator[tuple[Api, Worker]]:
    """Start gunicorn and one Celery worker; stop both on the way out."""
    tag = f"api{api_workers}-wrk{worker_processes}"
    env = {**services.env, "API_TOKENS": BENCH_TOKEN}
    with contextlib.ExitStack() as stack:
        # Stops are registered before starts: a worker that never logs "ready"
        # is still running when start() gives up, and must not outlive us.
        api = Api(env, logs / f"api-{tag}.log", workers=api_workers)
        stack.callback(api.stop)
        api.start()
        worker = Worker(env, logs / f"worker-{tag}.log", concurrency=worker_processes, name="bench")
        stack.callback(worker.stop)
        worker.start()
        yield api, worker


def process_groups(services: Services, api: Api, worker: Worker) -> list[ProcessGroup]:
    """Name the processes whose CPU and memory we account: one group per role."""
    return [
        ProcessGroup("api", api.executor.process.pid),
        ProcessGroup("worker", worker.pid),
        ProcessGroup("postgres", postmaster_pid(services.database_url)),
        ProcessGroup("redis", redis_pid(services.redis_url)),
        # This process: the publisher's threads, the /stats polling, the sampler.
        ProcessGroup("client", os.getpid(), descendants=False),
    ]


def tasks_stored(database_url: str) -> int:
    """Return how many batches (tasks) the workers stored, to tell events per task."""
    conn = psycopg2.connect(plain_dsn(database_url))
    try:
        with conn, conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM batches")
            return int(cur.fetchone()[0])
    finally:
        conn.close()


def run_workload(
    services: Services,
    url: str,
    workload: Workload,
    events: int,
    duplicates: float,
    groups: Sequence[ProcessGroup],
    settle_timeout: float,
) -> dict[str, Any]:
    """Publish one workload, wait until /stats settles, and account time, CPU and memory."""
    planned = plan_events(events, duplicates, run_topics(run_prefix(), 4), "publisher")
    client = Client(url, BENCH_TOKEN, concurrency=workload.concurrency)
    before = {group.name: group.cpu() for group in groups}
    with client, RssSampler(groups) as sampler:
        summary = client.publish(planned, batch_size=workload.batch_size)
        verify = wait_and_verify(client, summary, timeout=settle_timeout, poll=0.05)
    after = {group.name: group.cpu() for group in groups}
    cpu = {group.name: cpu_seconds(before[group.name], after[group.name]) for group in groups}
    sent = max(summary.sent, 1)
    server_cpu = [cpu[name] for name in ("api", "worker", "postgres", "redis")]
    cpu["servers_total"] = sum(v for v in server_cpu if v is not None)
    return {
        "workload": workload.name,
        "batch_size": workload.batch_size,
        "concurrency": workload.concurrency,
        "events": summary.sent,
        "unique": summary.unique,
        "duplicates": summary.duplicates,
        "errors": summary.errors,
        "requests": summary.requests,
        "tasks": tasks_stored(services.database_url),
        "publish_seconds": summary.elapsed,
        "drain_seconds": verify.waited,
        "accepted_events_per_second": summary.events_per_second,
        "end_to_end_events_per_second": (
            round(end_to_end_rate(summary, verify), 1) if verify.settled else None
        ),
        "latency_ms": {
            "p50": summary.latency_p50_ms,
            "p99": summary.latency_p99_ms,
            "max": summary.latency_max_ms,
        },
        "cpu_seconds": {k: None if v is None else round(v, 3) for k, v in cpu.items()},
        "cpu_us_per_event": {
            k: None if v is None else round(v * 1e6 / sent, 1) for k, v in cpu.items()
        },
        "peak_rss_mb": {k: round(v / 2**20, 1) for k, v in sampler.peaks.items()},
        "verify": {"ok": verify.ok, "settled": verify.settled, "message": verify.message},
        "statuses": summary.statuses,
        "first_error": summary.first_error,
    }


def warm_up(url: str, workload: Workload, events: int, settle_timeout: float) -> None:
    """Publish a few events first, so connections and imports are warm when we measure."""
    planned = plan_events(events, 0.0, run_topics(run_prefix(), 4), "publisher")
    with Client(url, BENCH_TOKEN, concurrency=workload.concurrency) as client:
        summary = client.publish(planned, batch_size=workload.batch_size)
        verify = wait_and_verify(client, summary, timeout=settle_timeout, poll=0.05)
    if not verify.ok:
        raise RuntimeError(f"warm-up of {workload.name} failed: {verify.message}")


# -- output ---------------------------------------------------------------------------------


def representative(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Return the run with the median end-to-end rate (the lower middle for an even count)."""
    ordered = sorted(runs, key=lambda run: run["end_to_end_events_per_second"] or 0.0)
    return ordered[(len(ordered) - 1) // 2]


def _ratio(value: float | None, ceiling: dict[str, Any]) -> str:
    if value is None or "rows_per_second" not in ceiling:
        return "-"
    return f"{value / ceiling['rows_per_second']:.2f}"


def render(document: dict[str, Any]) -> str:
    """Render the result document as text tables."""
    ceiling = document["ceiling"]
    chosen = [document["runs"][i] for i in document["median_runs"]]
    out = [describe(document)]
    repeat = document["args"]["repeat"]
    note = f" (median run of {repeat})" if repeat > 1 else ""
    rows = [
        [
            run["workload"],
            str(run["api_workers"]),
            str(run["worker_processes"]),
            fmt(run["events"]),
            fmt(run["accepted_events_per_second"]),
            fmt(run["end_to_end_events_per_second"]),
            _ratio(run["end_to_end_events_per_second"], ceiling["copy"]),
            _ratio(run["end_to_end_events_per_second"], ceiling["values"]),
            fmt(run["latency_ms"]["p50"], 1),
            fmt(run["latency_ms"]["p99"], 1),
            fmt(run["latency_ms"]["max"], 1),
            fmt(run["events"] / max(run.get("tasks", 0), 1), 1),
            "ok" if run["verify"]["ok"] else "FAILED",
        ]
        for run in chosen
    ]
    headers = [
        "workload",
        "API procs",
        "worker procs",
        "events",
        "accepted ev/s",
        "e2e ev/s",
        "e2e/COPY",
        "e2e/VALUES",
        "p50 ms",
        "p99 ms",
        "max ms",
        "events/task",
        "verify",
    ]
    out.append(table(f"End to end{note}", headers, rows))

    rows = []
    for run in chosen:
        cells = [run["workload"], str(run["api_workers"]), str(run["worker_processes"])]
        for name in (*GROUPS, "servers_total"):
            seconds = run["cpu_seconds"].get(name)
            per_event = run["cpu_us_per_event"].get(name)
            cells.append("-" if seconds is None else f"{per_event:,.0f} ({seconds:.2f} s)")
        rows.append(cells)
    headers = ["workload", "API procs", "worker procs", *GROUPS, "servers total"]
    out.append(table("CPU µs per event (CPU seconds in the run)", headers, rows))

    rows = [
        [
            run["workload"],
            str(run["api_workers"]),
            str(run["worker_processes"]),
            *(fmt(run["peak_rss_mb"].get(name), 1) for name in GROUPS),
        ]
        for run in chosen
    ]
    out.append(table("Peak RSS MB (summed over each group's processes)", headers[:-1], rows))

    rows = []
    for key in ("values", "copy", "app_store"):
        result = ceiling.get(key, {})
        if "error" in result:
            rows.append([result["method"], "-", "-", "-", f"error: {result['error'][:60]}"])
            continue
        rows.append(
            [
                result["method"],
                fmt(result["rows"]),
                fmt(result["stored"])
                + ("" if result["stored"] == result["expected_stored"] else " (!)"),
                f"{result['seconds']:.2f}",
                fmt(result["rows_per_second"]),
            ]
        )
    out.append(
        table(
            "PostgreSQL ceiling (one connection, same server, scratch table shaped like events)",
            ["method", "rows", "stored", "seconds", "rows/s"],
            rows,
        )
    )

    if document["args"]["scaling"]:
        workers = document["args"]["scaling_workers"]
        rows = []
        for workload in document["args"]["workloads"]:
            for api_workers in document["args"]["scaling_api"]:
                cells = [workload, str(api_workers)]
                for count in workers:
                    match = [
                        run
                        for run in chosen
                        if run["workload"] == workload
                        and run["api_workers"] == api_workers
                        and run["worker_processes"] == count
                    ]
                    rate = match[0]["end_to_end_events_per_second"] if match else None
                    cells.append(fmt(rate))
                rows.append(cells)
        headers = ["workload", "API procs", *(f"worker procs={n}" for n in workers)]
        out.append(table("Scaling: end-to-end events/s", headers, rows))

    for run in chosen:
        for name, profile in run.get("profiles", {}).items():
            rows = [[frame, f"{share:.1f}"] for frame, share in profile["self"][:15]]
            title = f"py-spy, {name}, {run['workload']}: functions by own share of samples (%)"
            out.append(table(title, ["function (file)", "%"], rows))
            rows = [[frame, f"{share:.1f}"] for frame, share in profile["inclusive"][:25]]
            title = f"py-spy, {name}, {run['workload']}: functions by inclusive share (%)"
            out.append(table(title, ["function (file)", "%"], rows))
    return "\n".join(out)


def run_config(
    services: Services,
    logs: Path,
    args: argparse.Namespace,
    workloads: Sequence[Workload],
    api_workers: int,
    worker_processes: int,
    runs: list[dict[str, Any]],
) -> bool:
    """Run every workload on one stack shape, appending to runs; True if any run failed."""
    failed = False
    log(f"starting API ({api_workers} procs) and worker ({worker_processes} procs)")
    with running_stack(services, logs, api_workers, worker_processes) as (api, worker):
        groups = process_groups(services, api, worker)
        for workload in workloads:
            if args.warmup:
                warm_up(api.url, workload, args.warmup, args.settle_timeout)
            for repeat in range(args.repeat):
                empty_tables(services)
                log(f"{workload.name}: {args.events} events, run {repeat + 1}/{args.repeat}")
                label = f"{workload.name}-api{api_workers}-wrk{worker_processes}-{repeat + 1}"
                with contextlib.ExitStack() as profiling:
                    if args.profile:
                        pids = {"api": api.executor.process.pid, "worker": worker.pid}
                        profiling.enter_context(py_spy(pids, args.profile, label))
                    run = run_workload(
                        services,
                        api.url,
                        workload,
                        args.events,
                        args.duplicates,
                        groups,
                        args.settle_timeout,
                    )
                if args.profile:
                    run["profiles"] = {
                        name: summarise(args.profile / f"{label}-{name}.txt")
                        for name in ("api", "worker")
                    }
                run.update(
                    api_workers=api_workers, worker_processes=worker_processes, repeat=repeat
                )
                runs.append(run)
                accepted = fmt(run["accepted_events_per_second"])
                e2e = fmt(run["end_to_end_events_per_second"])
                log(f"{workload.name}: accepted {accepted} ev/s, end to end {e2e} ev/s")
                log(f"{workload.name}: {run['verify']['message']}")
                if not run["verify"]["ok"] or run["errors"]:
                    failed = True
                    print(log_tail(api.log), file=sys.stderr)
                    print(log_tail(worker.log), file=sys.stderr)
        empty_tables(services)
    return failed


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark, print its tables and write its JSON; non-zero if a run failed."""
    args = parse_args(argv)
    warn_if_busy()
    if args.scaling:
        configs = [(a, w) for a in args.scaling_api for w in args.scaling_workers]
    else:
        configs = [(args.api_workers, args.worker_processes)]
    workloads = [WORKLOADS[name] for name in args.workloads]
    document: dict[str, Any] = {
        "kind": "e2e",
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": machine(),
        "code": code_digest(),
        "runs": [],
    }
    failed = False
    with contextlib.ExitStack() as stack:
        base = stack.enter_context(scratch_dir("agg-bench-"))
        logs = base / "logs"
        logs.mkdir()
        services = stack.enter_context(
            bench_services(base, durable=True, redis_aof=True, redis_fsync=args.redis_fsync)
        )
        document["services"] = {
            **server_versions(services),
            "private_postgres": services.private_postgres,
            "private_redis": services.private_redis,
        }
        log(f"PostgreSQL ceiling: {args.events} rows, {args.duplicates:.0%} duplicates")
        document["ceiling"] = measure_ceiling(
            services, args.events, args.duplicates, args.ceiling_batch
        )
        try:
            for api_workers, worker_processes in configs:
                failed |= run_config(
                    services, logs, args, workloads, api_workers, worker_processes, document["runs"]
                )
        except BaseException:
            document["error"] = traceback.format_exc()
            path = write_json(args.json, "e2e", document)
            log(f"interrupted; partial results in {path}")
            raise
    groups_of = {}
    for run in document["runs"]:
        key = (run["workload"], run["api_workers"], run["worker_processes"])
        groups_of.setdefault(key, []).append(run)
    chosen = [representative(runs) for runs in groups_of.values()]
    document["median_runs"] = [document["runs"].index(run) for run in chosen]
    finish(document, "e2e", args.json, render)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
