"""Locust against a stack of its own: one bounded, headless command with reports and a check.

    python -m bench.loadtest [--users 50] [--spawn-rate 10] [--time 30s]
    python -m bench.loadtest --compare-readers     # publishers alone, then beside readers

Starts private PostgreSQL and Redis (or uses DATABASE_URL/REDIS_URL with a
throwaway database), the API (2 gunicorn workers, a bearer token, the default
rate limit) and a worker, runs locustfile.py headless with LOCUST_VERIFY=1,
writes reports/<run>*.csv and reports/<run>.html, and exits non-zero when /stats
disagrees with what Locust had accepted. `--compare-readers` runs twice on the
same stack, first with the publishing users only, then with the readers of
/events and /stats beside them, and prints the publish latencies of both and
their ratio. Everything started here is stopped.
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import uuid
from pathlib import Path

from bench.harness import bench_services
from bench.harness import log
from bench.harness import table
from scripts.services import ROOT
from scripts.services import scratch_dir
from scripts.stack import BIN
from scripts.stack import Api
from scripts.stack import Worker

PUBLISHERS = ("SingleEventPublisher", "BatchPublisher")
READERS = ("Reader",)
PUBLISH_ROWS = ("/publish [1 event]", "/publish [100 events]")


def run_locust(
    api: Api, args: argparse.Namespace, token: str, name: str, users: tuple[str, ...]
) -> int:
    """Run Locust headless with the given user classes; reports go to reports/<name>*."""
    command = [
        str(BIN / "locust"),
        "-f",
        str(ROOT / "locustfile.py"),
        "--headless",
        "-u",
        str(args.users),
        "-r",
        str(args.spawn_rate),
        "-t",
        args.time,
        # Let users finish the request in flight: one killed after the
        # server accepted it would be stored but missing from the tally.
        "--stop-timeout",
        "10",
        "--host",
        api.url,
        "--csv",
        str(args.reports / name),
        "--html",
        str(args.reports / f"{name}.html"),
        *users,
    ]
    log(" ".join(command))
    env = {**os.environ, "LOCUST_VERIFY": "1", "API_TOKEN": token}
    return subprocess.run(command, env=env, cwd=ROOT).returncode


def publish_latencies(stats_csv: Path) -> dict[str, dict[str, float]]:
    """Return p50 and p99 (ms) and requests of the publish rows of Locust's stats CSV."""
    rows = {}
    with stats_csv.open() as handle:
        for row in csv.DictReader(handle):
            if row["Name"] in PUBLISH_ROWS:
                rows[row["Name"]] = {
                    "requests": float(row["Request Count"]),
                    "p50": float(row["50%"]),
                    "p99": float(row["99%"]),
                }
    return rows


def main(argv: list[str] | None = None) -> int:
    """Run the load test(s) and return non-zero if Locust or its verification failed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=50)
    parser.add_argument("--spawn-rate", type=float, default=10)
    parser.add_argument("--time", default="30s", help="run time, Locust notation (30s, 2m)")
    parser.add_argument("--reports", type=Path, default=ROOT / "reports")
    parser.add_argument(
        "--compare-readers",
        action="store_true",
        help="run publishers alone, then with readers, and compare publish latency",
    )
    args = parser.parse_args(argv)
    args.reports.mkdir(parents=True, exist_ok=True)
    token = "load-" + uuid.uuid4().hex + uuid.uuid4().hex
    with (
        scratch_dir("agg-load-") as base,
        bench_services(base, durable=True, redis_aof=True) as services,
    ):
        # Production settings: a token and the default rate limit.
        env = {**services.env, "API_TOKENS": token}
        api = Api(env, base / "api.log", workers=2).start()
        worker = None
        try:
            worker = Worker(env, base / "worker.log").start()
            if not args.compare_readers:
                return run_locust(api, args, token, "locust", PUBLISHERS + READERS)
            codes = [
                run_locust(api, args, token, "locust-publish-only", PUBLISHERS),
                run_locust(api, args, token, "locust-mixed", PUBLISHERS + READERS),
            ]
            alone = publish_latencies(args.reports / "locust-publish-only_stats.csv")
            mixed = publish_latencies(args.reports / "locust-mixed_stats.csv")
            rows = [
                [
                    name,
                    f"{alone[name]['p50']:.0f} / {alone[name]['p99']:.0f}",
                    f"{mixed[name]['p50']:.0f} / {mixed[name]['p99']:.0f}",
                    f"{mixed[name]['p99'] / max(alone[name]['p99'], 1):.2f}",
                ]
                for name in PUBLISH_ROWS
                if name in alone and name in mixed
            ]
            headers = ["request", "alone p50 / p99 ms", "with readers p50 / p99 ms", "p99 ratio"]
            print(table("Publish latency, alone and beside readers", headers, rows))
            return max(codes)
        finally:
            if worker is not None:
                worker.stop()
            api.stop()


if __name__ == "__main__":
    raise SystemExit(main())
