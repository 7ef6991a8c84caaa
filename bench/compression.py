"""Publishing realistic log lines with and without gzip: bytes on the wire, publish rate, CPU.

    python -m bench.compression                   # 10,000 lines, 4 body kinds, 3 rounds (~1 min)
    python -m bench.compression --lines 10000 --repeat 5 --batch-size 500

Each round publishes the same 10,000 log lines (an access log and an application log
mixed: addresses, paths, statuses, durations, user agents, request ids, messages) through
`aggregator_client.client.Client` four ways, in turn: a JSON array, NDJSON, each
gzip-compressed or not (`compress=`, `ndjson=`), `--batch-size` events per request,
`--concurrency` in flight, each round in new topics. The API runs with production settings
and no worker (accepted batches stay on the broker), so this measures the publish path
alone: the request bodies' bytes (what the client encodes, exactly as it sends them), the
rate until the last 202, and the CPU of the client's process and of the API per 1,000
events. The table shows each kind's median round; gzip levels 1, 6 (the client's) and 9 are
compared offline on the same bodies.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import random
import statistics
import time
import uuid
from collections.abc import Sequence
from datetime import UTC
from datetime import datetime
from datetime import timedelta
from pathlib import Path
from typing import Any

from aggregator_client.client import GZIP_LEVEL
from aggregator_client.client import Client
from aggregator_client.client import encode_body
from aggregator_client.event_ids import derive_event_id
from bench.harness import ProcessGroup
from bench.harness import bench_services
from bench.harness import code_digest
from bench.harness import cpu_seconds
from bench.harness import describe
from bench.harness import finish
from bench.harness import fmt
from bench.harness import log
from bench.harness import machine
from bench.harness import server_versions
from bench.harness import table
from bench.harness import warn_if_busy
from scripts.services import scratch_dir
from scripts.stack import Api

TOKEN = "bench-" + uuid.uuid4().hex + uuid.uuid4().hex
# (label, compress, ndjson)
KINDS = (
    ("JSON array", False, False),
    ("NDJSON", False, True),
    ("JSON array, gzip", True, False),
    ("NDJSON, gzip", True, True),
)
PATHS = ("/", "/cart", "/checkout", "/api/orders", "/api/orders/{n}", "/static/app.{n}.js")
AGENTS = (
    "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_5) AppleWebKit/605.1.15 Version/17.5 Safari/605.1",
    "curl/8.5.0",
    "python-urllib3/2.2.2",
)
MESSAGES = (
    "payment failed: card declined (code {n})",
    "order {n} created for customer c-{m}",
    "cache miss for key product:{n}",
    "retrying request to inventory service (attempt {m})",
    "slow query: SELECT * FROM orders WHERE customer_id = {m} took {n} ms",
)


def log_lines(count: int, seed: int = 7) -> list[dict[str, Any]]:
    """Return `count` events that look like a web service's logs, with derived event ids."""
    pick = random.Random(seed)
    start = datetime(2026, 12, 5, 8, 0, tzinfo=UTC)
    events = []
    for n in range(count):
        when = (start + timedelta(milliseconds=n * 37)).isoformat().replace("+00:00", "Z")
        source = f"web-{pick.randint(1, 4)}"
        if pick.random() < 0.7:
            payload: dict[str, Any] = {
                "kind": "access",
                "client": f"10.{pick.randint(0, 3)}.{pick.randint(0, 255)}.{pick.randint(1, 254)}",
                "method": pick.choice(("GET", "GET", "GET", "POST")),
                "path": pick.choice(PATHS).format(n=pick.randint(1, 99999)),
                "status": pick.choice((200, 200, 200, 200, 201, 304, 404, 500)),
                "bytes": pick.randint(120, 90000),
                "duration_ms": round(pick.expovariate(1 / 40), 3),
                "user_agent": pick.choice(AGENTS),
                "request_id": uuid.UUID(int=pick.getrandbits(128)).hex,
            }
        else:
            message = pick.choice(MESSAGES).format(n=pick.randint(1, 99999), m=pick.randint(1, 9))
            payload = {
                "kind": "app",
                "level": pick.choice(("INFO", "INFO", "INFO", "WARNING", "ERROR")),
                "logger": pick.choice(("shop.payments", "shop.orders", "shop.cache")),
                "message": message,
                "request_id": uuid.UUID(int=pick.getrandbits(128)).hex,
            }
        event = {"topic": "logs", "timestamp": when, "source": source, "payload": payload}
        event["event_id"] = derive_event_id(event)
        events.append(event)
    return events


def body_bytes(events: list[dict[str, Any]], batch_size: int, compress: bool, ndjson: bool) -> int:
    """Bytes of the request bodies the client sends for these events (as Client encodes them)."""
    total = 0
    for start in range(0, len(events), batch_size):
        body = encode_body(
            events[start : start + batch_size], batch_size == 1 and not ndjson, ndjson
        )
        if compress:
            body = gzip.compress(body, compresslevel=GZIP_LEVEL, mtime=0)
        total += len(body)
    return total


def levels(events: list[dict[str, Any]], batch_size: int) -> list[list[str]]:
    """Compressed size and client CPU per gzip level, offline, on NDJSON bodies."""
    bodies = [
        encode_body(events[start : start + batch_size], False, True)
        for start in range(0, len(events), batch_size)
    ]
    raw = sum(len(body) for body in bodies)
    rows = []
    for level in (1, 6, 9):
        started = time.process_time()
        size = sum(len(gzip.compress(body, compresslevel=level, mtime=0)) for body in bodies)
        cpu = time.process_time() - started
        rows.append(
            [
                f"gzip level {level}" + (" (client)" if level == GZIP_LEVEL else ""),
                fmt(size),
                f"{raw / size:.1f}x",
                fmt(cpu * 1e6 / len(events) * 1000),
            ]
        )
    return rows


def publish_round(
    api: Api, events: list[dict[str, Any]], args: argparse.Namespace, kind: tuple[str, bool, bool]
) -> dict[str, Any]:
    label, compress, ndjson = kind
    topic = f"bench-{uuid.uuid4().hex[:8]}"
    batch = [{**event, "topic": topic} for event in events]
    server = ProcessGroup("api", api.executor.process.pid)
    with Client(
        api.url, TOKEN, concurrency=args.concurrency, compress=compress, ndjson=ndjson
    ) as client:
        client.health()
        cpu_before, api_before = time.process_time(), server.cpu()
        started = time.perf_counter()
        summary = client.publish(batch, batch_size=args.batch_size)
        elapsed = time.perf_counter() - started
        client_cpu, api_cpu = (
            time.process_time() - cpu_before,
            cpu_seconds(api_before, server.cpu()),
        )
    if summary.sent != len(events) or summary.errors:
        raise SystemExit(
            f"{label}: {summary.sent} of {len(events)} accepted: {summary.first_error}"
        )
    per_thousand = 1000 / len(events)
    return {
        "kind": label,
        "body_bytes": body_bytes(batch, args.batch_size, compress, ndjson),
        "events_per_second": len(events) / elapsed,
        "client_cpu_ms_per_1000": client_cpu * 1000 * per_thousand,
        "api_cpu_ms_per_1000": None if api_cpu is None else api_cpu * 1000 * per_thousand,
    }


def render(document: dict[str, Any]) -> str:
    rows = []
    for label, *_ in KINDS:
        runs = [run for run in document["runs"] if run["kind"] == label]
        rate = statistics.median(run["events_per_second"] for run in runs)
        median = min(runs, key=lambda run: abs(run["events_per_second"] - rate))
        rows.append(
            [
                label,
                fmt(median["body_bytes"]),
                f"{median['body_bytes'] / document['args']['lines']:.0f}",
                fmt(rate),
                " / ".join(fmt(run["events_per_second"]) for run in runs),
                fmt(median["client_cpu_ms_per_1000"], 1),
                fmt(median["api_cpu_ms_per_1000"], 1),
            ]
        )
    args = document["args"]
    title = (
        f"{args['lines']:,} log lines, {args['batch_size']} per request, {args['concurrency']} in"
        f" flight, {args['repeat']} rounds (median round; API without a worker)"
    )
    out = [
        describe(document),
        table(
            title,
            [
                "body",
                "bytes sent",
                "bytes/line",
                "events/s",
                "each round",
                "client CPU ms/1k",
                "API CPU ms/1k",
            ],
            rows,
        ),
        table(
            "gzip levels, offline, on the same NDJSON bodies",
            ["level", "bytes", "ratio", "CPU µs per 1,000 lines"],
            document["levels"],
        ),
    ]
    return "\n\n".join(out)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.compression", description=__doc__.split("\n")[0]
    )
    add = parser.add_argument
    add("--lines", type=int, default=10_000, help="log lines per round (default 10,000)")
    add("--batch-size", type=int, default=500, help="events per request (default 500)")
    add("--concurrency", type=int, default=8, help="requests in flight (default 8)")
    add("--repeat", type=int, default=3, help="rounds of the four kinds (default 3)")
    add("--api-workers", type=int, default=2, help="gunicorn processes (default 2)")
    add("--json", type=Path, default=None, help="default bench/results/compression-<time>.json")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    warn_if_busy()
    events = log_lines(args.lines)
    document: dict[str, Any] = {
        "kind": "compression",
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": machine(),
        "code": code_digest(),
        "sample": events[:2],
        "levels": levels(events, args.batch_size),
        "runs": [],
    }
    with contextlib.ExitStack() as stack:
        base = stack.enter_context(scratch_dir("agg-bench-compression-"))
        services = stack.enter_context(bench_services(base, durable=True, redis_aof=True))
        document["services"] = server_versions(services)
        env = {**services.env, "API_TOKENS": TOKEN, "BROKER_MAX_BACKLOG_BYTES": str(2**40)}
        api = Api(env, base / "api.log", workers=args.api_workers)
        stack.callback(api.stop)
        api.start()
        # One round unmeasured: connections, imports and the API's first requests warm up.
        publish_round(api, events[: args.batch_size * 2], args, KINDS[0])
        for repeat in range(args.repeat):
            for kind in KINDS:
                run = publish_round(api, events, args, kind)
                log(
                    f"round {repeat + 1}/{args.repeat} {kind[0]}: {run['body_bytes']:,} bytes,"
                    f" {run['events_per_second']:,.0f} events/s"
                )
                document["runs"].append(run)
    finish(document, "compression", args.json, render)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
