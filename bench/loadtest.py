"""Locust against a stack of its own: one bounded, headless command with reports and a check.

    python -m bench.loadtest [--users 50] [--spawn-rate 10] [--time 30s]

Starts private PostgreSQL and Redis (or uses DATABASE_URL/REDIS_URL with a
throwaway database), the API (3 gunicorn workers) and a worker, runs
locustfile.py headless with LOCUST_VERIFY=1, writes reports/locust*.csv and
reports/locust.html, and exits non-zero when /stats disagrees with what Locust
had accepted. Everything started here is stopped.
"""

from __future__ import annotations

import argparse
import os
import subprocess
from pathlib import Path

from bench.harness import bench_services
from bench.harness import log
from bench.harness import migrate
from bench.harness import scratch_dir
from scripts.stack import BIN
from scripts.stack import ROOT
from scripts.stack import Api
from scripts.stack import Worker


def main(argv: list[str] | None = None) -> int:
    """Run the load test and return Locust's exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=50)
    parser.add_argument("--spawn-rate", type=float, default=10)
    parser.add_argument("--time", default="30s", help="run time, Locust notation (30s, 2m)")
    parser.add_argument("--reports", type=Path, default=ROOT / "reports")
    args = parser.parse_args(argv)
    args.reports.mkdir(parents=True, exist_ok=True)
    with (
        scratch_dir("agg-load-") as base,
        bench_services(base, durable=True, redis_aof=True) as services,
    ):
        migrate(services.database_url)
        env = {**services.env, "RATE_LIMIT": ""}
        api = Api(env, base / "api.log").start()
        worker = None
        try:
            worker = Worker(env, base / "worker.log").start()
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
                str(args.reports / "locust"),
                "--html",
                str(args.reports / "locust.html"),
            ]
            log(" ".join(command))
            done = subprocess.run(command, env={**os.environ, "LOCUST_VERIFY": "1"}, cwd=ROOT)
            return done.returncode
        finally:
            if worker is not None:
                worker.stop()
            api.stop()


if __name__ == "__main__":
    raise SystemExit(main())
