"""The dedup check's cost when the key horizon is 1x and 10x the retention.

    python -m bench.horizon                          # 1,000,000 events kept; 1M vs 10M keys
    python -m bench.horizon --rows 20000 --repeat 1 --batches 100   # a quick check

Loads `--rows` events (daily partitions over `--days` days) into one throwaway
database per multiple, with event_keys holding their keys plus (multiple - 1)
x rows older keys whose events retention already dropped: a DEDUP_HORIZON_DAYS
that many times RETENTION_DAYS. Event ids are random-looking (md5), as derived
ids are, so keys land all over the unique index. Then, per round, with the
databases taking turns (order swapped each round), it stores batches through
app.store.ledger.store_exactly_once in this process, one transaction each
(durable commits): batches whose every event is new (random ids) and batches
whose every event is a duplicate (keys drawn uniformly from every key kept).
Prints events/s and CPU µs per event of this process and of PostgreSQL.
"""

from __future__ import annotations

import argparse
import contextlib
import random
import uuid
from collections.abc import Callable
from collections.abc import Sequence
from datetime import UTC
from datetime import datetime
from pathlib import Path
from typing import Any

from bench import store
from bench.fill import FillPlan
from bench.fill import event_id
from bench.fill import extra_event_id
from bench.fill import fill
from bench.fill import topic
from bench.harness import code_digest
from bench.harness import describe
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
from scripts.services import scratch_dir
from scripts.services import throwaway_database

KINDS = ("all new", "all duplicates")
TIMESTAMP = "2026-03-01T08:00:00+00:00"

Batch = list[dict[str, object]]


def _multiples(raw: str) -> list[int]:
    return [int(part) for part in raw.split(",") if part.strip()]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.horizon", description=__doc__.split("\n")[0]
    )
    add = parser.add_argument
    add("--rows", type=int, default=1_000_000, help="events kept (default 1,000,000)")
    add("--multiples", type=_multiples, default=[1, 10], help="keys per event kept (1,10)")
    add("--days", type=int, default=30, help="daily partitions the events span (default 30)")
    add("--topics", type=int, default=100, help="distinct topics (default 100)")
    add("--sizes", type=store._sizes, default=[1, 500], help="events per batch (1,500)")
    add(
        "--batches",
        type=int,
        default=1000,
        help="one-event batches per round and kind; larger sizes store proportionally fewer",
    )
    add("--repeat", type=int, default=3, help="rounds, the databases alternating (default 3)")
    add("--seed", type=int, default=1)
    add("--json", type=Path, default=None, help="default bench/results/horizon-<time>.json")
    args = parser.parse_args(argv)
    if args.rows < 1000 or args.days < 1 or args.repeat < 1 or min(args.multiples) < 1:
        parser.error("--rows >= 1000, --days, --repeat and every multiple >= 1")
    return args


def new_batches(size: int, topics: int, rng: random.Random) -> Callable[[int], Batch]:
    """Return a maker of batches whose every event has a key never stored."""

    def make(_: int) -> Batch:
        return [
            {
                "topic": f"topic-{rng.randrange(topics):04d}",
                "event_id": uuid.UUID(int=rng.getrandbits(128)).hex,
                "timestamp": TIMESTAMP,
                "source": "bench",
                "payload": {"n": n},
            }
            for n in range(size)
        ]

    return make


def duplicate_batches(
    size: int, rows: int, extra: int, topics: int, rng: random.Random
) -> Callable[[int], Batch]:
    """Return a maker of batches of keys already stored, drawn from every key kept."""

    def key() -> tuple[str, str]:
        n = rng.randrange(1, rows + extra + 1)
        if n <= rows:
            return topic(n, topics), event_id(n)
        return topic(n - rows, topics), extra_event_id(n - rows)

    def make(_: int) -> Batch:
        batch: Batch = []
        for n in range(size):
            name, ident = key()
            batch.append(
                {
                    "topic": name,
                    "event_id": ident,
                    "timestamp": TIMESTAMP,
                    "source": "bench",
                    "payload": {"n": n},
                }
            )
        return batch

    return make


def run(args: argparse.Namespace, document: dict[str, Any]) -> None:
    """Fill one database per multiple and store batches of each kind into them in turns."""
    rng = random.Random(args.seed)
    with contextlib.ExitStack() as stack:
        base = stack.enter_context(scratch_dir("agg-bench-horizon-"))
        server = stack.enter_context(postgres_server_url(base / "pg", durable=True))
        urls = {
            m: stack.enter_context(throwaway_database(server, f"agg_bench_keys{m}x"))
            for m in args.multiples
        }
        document["services"] = {**postgres_settings(next(iter(urls.values()))), "redis": "none"}
        for multiple, url in urls.items():
            extra = (multiple - 1) * args.rows
            log(f"fill {multiple}x: {args.rows:,} events, {args.rows + extra:,} keys")
            plan = FillPlan(args.rows, args.days, "days", args.topics, extra_keys=extra)
            document["fill"][str(multiple)] = fill(plain_dsn(url), plan)
            log(f"fill {multiple}x: {document['fill'][str(multiple)]}")
        for number in range(args.repeat):
            order = args.multiples if number % 2 == 0 else list(reversed(args.multiples))
            for multiple in order:
                extra = (multiple - 1) * args.rows
                for size in args.sizes:
                    batches = max(20, args.batches // max(1, size // 50))
                    for kind in KINDS:
                        if kind == "all new":
                            make = new_batches(size, args.topics, rng)
                        else:
                            make = duplicate_batches(size, args.rows, extra, args.topics, rng)
                        result = store.measure(urls[multiple], size, batches, make_batch=make)
                        document["results"].append(
                            {
                                "round": number + 1,
                                "multiple": multiple,
                                "kind": kind,
                                "batches": batches,
                                **result,
                            }
                        )
                log(f"round {number + 1}, {multiple}x: done")


def render(document: dict[str, Any]) -> str:
    """Render the result document as Markdown tables (medians over the rounds)."""
    out = [describe(document)]
    out.append(
        table(
            "Fill (INSERT ... SELECT generate_series, keys and indexes rebuilt, VACUUM ANALYZE)",
            ["keys per event kept", "events", "keys", "events size", "event_keys size", "seconds"],
            [
                [
                    f"{multiple}x",
                    fmt(f["rows"]),
                    fmt(f["keys"]),
                    f["events_size"],
                    f["keys_size"],
                    fmt(f["total_seconds"], 1),
                ]
                for multiple, f in document["fill"].items()
            ],
        )
    )
    grouped: dict[tuple[int, str, int], list[dict[str, Any]]] = {}
    for r in document["results"]:
        grouped.setdefault((r["size"], r["kind"], r["multiple"]), []).append(r)
    rows = []
    for (size, kind, multiple), runs in sorted(grouped.items()):
        rows.append(
            [
                str(size),
                kind,
                f"{multiple}x",
                fmt(median([r["events_per_s"] for r in runs])),
                fmt(median([r["wall_us_p50"] for r in runs])),
                fmt(median([r["client_cpu_us_per_batch"] / size for r in runs]), 1),
                fmt(median([r["postgres_cpu_us_per_batch"] / size for r in runs]), 1),
                " / ".join(fmt(r["events_per_s"]) for r in runs),
            ]
        )
    rounds = document["args"]["repeat"]
    out.append(
        table(
            f"store_exactly_once by key horizon (medians of {rounds} rounds)",
            [
                "events/batch",
                "batch",
                "keys",
                "events/s",
                "batch p50 µs",
                "client CPU µs/event",
                "PG CPU µs/event",
                "events/s each round",
            ],
            rows,
            left=3,
        )
    )
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    """Fill, measure, print the table and write the JSON."""
    args = parse_args(argv)
    warn_if_busy()
    document: dict[str, Any] = {
        "kind": "horizon",
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": machine(),
        "code": code_digest(),
        "services": {},
        "fill": {},
        "results": [],
    }
    run(args, document)
    finish(document, "horizon", args.json, render)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
