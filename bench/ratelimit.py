"""How far a rate budget overshoots: processes spending one client's budget as fast as they can.

    python -m bench.ratelimit                         # 2 processes, 6 s, 2,000 per second
    python -m bench.ratelimit --processes 3 --work-ms 5 --max-cost 200

Each process is a gevent process like an API worker (monkey-patched, the
budget's sync thread a greenlet): `--greenlets` greenlets charge random costs
(1 to `--max-cost`) for the same client in a loop and burn `--work-ms` of CPU
after each charge without yielding, as a request would, so the sync runs late
when the process is busy (as the issue measured: syncs 100-200 ms apart). Every
admitted charge is recorded with its time; the parent merges them and reports
the most admitted in any sliding period (and in any aligned period) as a
multiple of the amount, and the share of the amount a client got on average.
Runs against a private Redis; nothing else.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import json
import random
import subprocess
import sys
import time
from collections.abc import Sequence
from datetime import UTC
from datetime import datetime
from pathlib import Path
from typing import Any

from bench.harness import code_digest
from bench.harness import describe
from bench.harness import finish
from bench.harness import log
from bench.harness import machine
from bench.harness import table
from bench.harness import warn_if_busy
from scripts.services import private_redis
from scripts.services import scratch_dir


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.ratelimit", description=__doc__.split("\n")[0]
    )
    add = parser.add_argument
    add("--processes", type=int, default=2, help="processes sharing the budget (default 2)")
    add("--duration", type=float, default=6.0, help="seconds of spending (default 6)")
    add("--amount", type=int, default=2000, help="budget per period (default 2,000)")
    add("--period", type=int, default=1, help="seconds (default 1)")
    add("--max-cost", type=int, default=50, help="charges cost 1 to this (default 50)")
    add("--greenlets", type=int, default=20, help="charging greenlets per process (default 20)")
    add("--work-ms", type=float, default=2.0, help="CPU burnt after each charge (default 2)")
    add("--json", type=Path, default=None, help="default bench/results/ratelimit-<ts>.json")
    add("--child", nargs=3, metavar=("REDIS_URL", "START", "OUT"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def child(args: argparse.Namespace) -> None:
    from gevent import monkey

    monkey.patch_all()
    import gevent
    import redis

    from app.ratelimit import RateBudget

    redis_url, start_text, out = args.child
    start = float(start_text)
    budget = RateBudget(redis.Redis.from_url(redis_url), args.amount, args.period, name="bench")
    budget.start_syncing()
    admitted: list[tuple[float, int]] = []
    refused = 0

    def spend() -> None:
        nonlocal refused
        rng = random.Random()
        while time.time() < start + args.duration:
            cost = rng.randint(1, args.max_cost)
            if budget.charge("client", cost) is None:
                admitted.append((time.time(), cost))
            else:
                refused += 1
            burn_until = time.perf_counter() + args.work_ms / 1000
            while time.perf_counter() < burn_until:
                pass
            gevent.sleep(0)

    gevent.sleep(max(0.0, start - time.time()))
    gevent.joinall([gevent.spawn(spend) for _ in range(args.greenlets)])
    Path(out).write_text(json.dumps({"admitted": admitted, "refused": refused}))


def worst_window(times: list[float], costs: list[int], period: float) -> float:
    """Return the most admitted within any sliding `period` (ending at an admission)."""
    prefix = [0]
    for cost in costs:
        prefix.append(prefix[-1] + cost)
    worst = 0
    for end, moment in enumerate(times):
        first = bisect.bisect_right(times, moment - period)
        worst = max(worst, prefix[end + 1] - prefix[first])
    return worst


def run(args: argparse.Namespace, redis_url: str, base: Path) -> dict[str, Any]:
    start = time.time() + 2.0
    outs = [base / f"child-{n}.json" for n in range(args.processes)]
    command = [sys.executable, "-m", "bench.ratelimit"]
    options = [
        f"--duration={args.duration}",
        f"--amount={args.amount}",
        f"--period={args.period}",
        f"--max-cost={args.max_cost}",
        f"--greenlets={args.greenlets}",
        f"--work-ms={args.work_ms}",
    ]
    children = [
        subprocess.Popen([*command, *options, "--child", redis_url, str(start), str(out)])
        for out in outs
    ]
    for process in children:
        if process.wait(timeout=args.duration + 60) != 0:
            raise SystemExit("a spending process failed")
    admitted: list[tuple[float, int]] = []
    refused = 0
    for out in outs:
        result = json.loads(out.read_text())
        admitted += [(moment, cost) for moment, cost in result["admitted"]]
        refused += result["refused"]
    admitted.sort()
    times = [moment for moment, _ in admitted]
    costs = [cost for _, cost in admitted]
    # The first period may hold what a previous window left; measure after it.
    aligned: dict[int, int] = {}
    for moment, cost in admitted:
        window = int(moment // args.period)
        aligned[window] = aligned.get(window, 0) + cost
    sliding = worst_window(times, costs, args.period)
    periods = args.duration / args.period
    return {
        "admitted_units": sum(costs),
        "admitted_charges": len(costs),
        "refused_charges": refused,
        "worst_sliding_period": sliding,
        "worst_sliding_ratio": round(sliding / args.amount, 3),
        "worst_aligned_ratio": round(max(aligned.values(), default=0) / args.amount, 3),
        "average_share": round(sum(costs) / (periods * args.amount), 3),
    }


def render(document: dict[str, Any]) -> str:
    args = document["args"]
    result = document["result"]
    rows = [
        [
            f"{args['processes']}",
            f"{args['amount']:,} per {args['period']} s",
            f"{args['max_cost']}",
            f"{args['work_ms']}",
            f"{result['worst_sliding_ratio']:.2f}x",
            f"{result['worst_aligned_ratio']:.2f}x",
            f"{result['average_share']:.2f}",
            f"{result['admitted_charges']:,} / {result['refused_charges']:,}",
        ]
    ]
    headers = [
        "processes",
        "budget",
        "max cost",
        "work ms",
        "worst sliding period",
        "worst aligned period",
        "average share",
        "admitted / refused",
    ]
    return "\n".join([describe(document), table("Budget overshoot", headers, rows)])


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        child(args)
        return 0
    warn_if_busy()
    document: dict[str, Any] = {
        "kind": "ratelimit",
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": machine(),
        "code": code_digest(),
    }
    with contextlib.ExitStack() as stack:
        base = stack.enter_context(scratch_dir("agg-bench-rate-"))
        server = stack.enter_context(private_redis(base / "redis"))
        log(f"{args.processes} processes spending one client's budget for {args.duration} s")
        document["result"] = run(args, server.url, base)
    finish(document, "ratelimit", args.json, render)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
