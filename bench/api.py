"""The API alone: POST /publish from wrk (one event, or --events N), and the API's CPU per request.

    python -m bench.api                          # 10 s, 50 connections, 2 gunicorn processes
    python -m bench.api --events 500 --connections 8   # batches of 500 events
    python -m bench.api --duration 20 --connections 50 --worker-class gthread
    python -m bench.api --replicas 1             # broker: primary + replica + 3 Sentinels, WAIT 1

wrk (Debian package `wrk`; a C load generator, so the client costs little of the
two cores) sends each request with a bearer token, its own Idempotency-Key and a
new event id (a batch: N new ids). The API runs with production settings (tokens, the rate limit,
Redis with `appendfsync always`). No Celery worker runs: accepted batches stay on
the broker, so this measures acceptance only; `bench.e2e` measures the whole path.
Reports requests/s, wrk's latency percentiles, non-202 answers, and CPU µs per
request of the API processes and of Redis.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import shutil
import subprocess
import uuid
from collections.abc import Sequence
from datetime import UTC
from datetime import datetime
from pathlib import Path
from typing import Any

from bench.harness import ProcessGroup
from bench.harness import bench_services
from bench.harness import code_digest
from bench.harness import cpu_seconds
from bench.harness import describe
from bench.harness import finish
from bench.harness import log
from bench.harness import machine
from bench.harness import redis_pid
from bench.harness import server_versions
from bench.harness import table
from bench.harness import warn_if_busy
from bench.profiling import py_spy
from bench.profiling import summarise
from scripts.services import scratch_dir
from scripts.stack import Api

TOKEN = "bench-" + uuid.uuid4().hex + uuid.uuid4().hex

# Each request: a new event id and idempotency key from a per-thread counter.
WRK_SCRIPT = """
local counter = 0
local thread_id = 0
local threads = {}
function setup(thread)
  thread:set("id", #threads)
  table.insert(threads, thread)
end
function init(args)
  thread_id = id
end
function event(key, n)
  return string.format(
    '{"topic":"bench","event_id":"%s","timestamp":"2026-01-01T00:00:00Z",'
    .. '"source":"wrk","payload":{"n":%d}}', key, n)
end
function request()
  counter = counter + 1
  local key = string.format("%d-%d-%d", RUN, thread_id, counter)
  local body
  if EVENTS == 1 then
    body = event(key, counter)
  else
    local events = {}
    for i = 1, EVENTS do
      events[i] = event(key .. "-" .. i, i)
    end
    body = "[" .. table.concat(events, ",") .. "]"
  end
  return wrk.format("POST", "/publish", {
    ["Content-Type"] = "application/json",
    ["Authorization"] = "Bearer TOKEN",
    ["Idempotency-Key"] = key,
  }, body)
end
"""


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.api", description=__doc__.split("\n")[0])
    add = parser.add_argument
    add("--duration", type=int, default=10, help="seconds of load per run (default 10)")
    add("--connections", type=int, default=50, help="concurrent connections (default 50)")
    add("--events", type=int, default=1, help="events per request (1: an object; more: an array)")
    add("--api-workers", type=int, default=2, help="gunicorn processes (default 2)")
    add("--rate-limit", default=None, help="RATE_LIMIT for the API (default: the production one)")
    add("--worker-class", default="gevent", help="gunicorn worker class (default gevent)")
    add("--repeat", type=int, default=1, help="runs; the table shows each")
    add(
        "--replicas",
        type=int,
        default=0,
        help="a replicated broker: this many replicas and 3 Sentinels, WAIT for 1 (default 0)",
    )
    add("--profile", type=Path, default=None, help="record py-spy profiles into this directory")
    add("--json", type=Path, default=None, help="default bench/results/api-<timestamp>.json")
    return parser.parse_args(argv)


def _millis(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s)", text).groups()  # type: ignore[union-attr]
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def parse_wrk(output: str) -> dict[str, Any]:
    """Pull requests/s, latency percentiles and non-2xx answers out of wrk's report."""
    result: dict[str, Any] = {
        "requests_per_second": float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1)),  # type: ignore[union-attr]
        "requests": int(re.search(r"(\d+) requests in", output).group(1)),  # type: ignore[union-attr]
        "non_2xx": 0,
        "socket_errors": 0,
    }
    for percentile in ("50", "99"):
        match = re.search(rf"^\s+{percentile}%\s+(\S+)", output, re.MULTILINE)
        result[f"p{percentile}_ms"] = _millis(match.group(1)) if match else None
    if match := re.search(r"Non-2xx or 3xx responses: (\d+)", output):
        result["non_2xx"] = int(match.group(1))
    if match := re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    ):
        result["socket_errors"] = sum(int(n) for n in match.groups())
    return result


def run_once(
    api: Api, redis_url: str, args: argparse.Namespace, script: Path, label: str
) -> dict[str, Any]:
    groups = [
        ProcessGroup("api", api.executor.process.pid),
        ProcessGroup("redis", redis_pid(redis_url)),
    ]
    command = ["wrk", "-t2", f"-c{args.connections}", f"-d{args.duration}s", "--latency"]
    command += ["-s", str(script), api.url]
    before = {group.name: group.cpu() for group in groups}
    with contextlib.ExitStack() as profiling:
        if args.profile:
            profiling.enter_context(py_spy({"api": api.executor.process.pid}, args.profile, label))
        output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    after = {group.name: group.cpu() for group in groups}
    result = parse_wrk(output)
    requests = max(result["requests"], 1)
    for name in ("api", "redis"):
        seconds = cpu_seconds(before[name], after[name])
        result[f"{name}_cpu_us_per_request"] = (
            None if seconds is None else round(seconds * 1e6 / requests)
        )
    if args.profile:
        result["profile"] = summarise(args.profile / f"{label}-api.txt")
    return result


def render(document: dict[str, Any]) -> str:
    rows = [
        [
            str(i + 1),
            f"{run['requests_per_second']:,.0f}",
            f"{run['p50_ms']:.1f}",
            f"{run['p99_ms']:.1f}",
            str(run["non_2xx"] + run["socket_errors"]),
            f"{run['api_cpu_us_per_request'] or 0:,}",
            f"{run['redis_cpu_us_per_request'] or 0:,}",
        ]
        for i, run in enumerate(document["runs"])
    ]
    args = document["args"]
    title = (
        f"POST /publish, {args.get('events', 1)} event(s) each: {args['connections']} connections, "
        f"{args['api_workers']} x {args['worker_class']}"
    )
    if args.get("replicas"):
        title += f", broker with {args['replicas']} replica(s), WAIT for 1"
    headers = ["run", "req/s", "p50 ms", "p99 ms", "errors", "API CPU µs/req", "Redis CPU µs/req"]
    out = [describe(document), table(title, headers, rows)]
    for run in document["runs"][:1]:
        if "profile" in run:
            rows = [[frame, f"{share:.1f}"] for frame, share in run["profile"]["inclusive"][:30]]
            out.append(
                table("py-spy, API: functions by inclusive share (%)", ["function", "%"], rows)
            )
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if shutil.which("wrk") is None:
        raise SystemExit("bench.api needs wrk: apt-get install wrk")
    warn_if_busy()
    document: dict[str, Any] = {
        "kind": "api",
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": machine(),
        "code": code_digest(),
        "runs": [],
    }
    with contextlib.ExitStack() as stack:
        base = stack.enter_context(scratch_dir("agg-bench-api-"))
        services = stack.enter_context(
            bench_services(base, durable=True, redis_aof=True, replicas=args.replicas)
        )
        document["services"] = server_versions(services)
        env = {
            **services.env,
            "API_TOKENS": TOKEN,
            "GUNICORN_WORKER_CLASS": args.worker_class,
            # Every request would otherwise wait for broker room once the queue is large.
            "BROKER_MAX_BACKLOG_BYTES": str(2**40),
        }
        if args.rate_limit is not None:
            env["RATE_LIMIT"] = args.rate_limit
        api = Api(env, base / "api.log", workers=args.api_workers)
        stack.callback(api.stop)
        api.start()
        for repeat in range(args.repeat):
            script = base / f"publish-{repeat}.lua"
            run_tag = uuid.uuid4().int % 10**9
            script.write_text(
                WRK_SCRIPT.replace("RUN", str(run_tag))
                .replace("TOKEN", TOKEN)
                .replace("EVENTS", str(args.events))
            )
            log(
                f"run {repeat + 1}/{args.repeat}: {args.duration} s, {args.connections} connections"
            )
            run = run_once(api, services.redis_url, args, script, f"api-{repeat + 1}")
            rate, cost = run["requests_per_second"], run["api_cpu_us_per_request"]
            log(f"{rate:,.0f} req/s, API {cost} µs/req")
            document["runs"].append(run)
    finish(document, "api", args.json, render)
    return 0 if all(run["non_2xx"] == 0 for run in document["runs"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
