"""Command line: parse options, publish, optionally verify, and print the outcome."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping

import orjson

from publisher.client import PublishConfig
from publisher.client import PublishSummary
from publisher.client import publish
from publisher.verify import VerifyResult
from publisher.verify import wait_and_verify

EXIT_OK = 0
EXIT_VERIFY_FAILED = 1
# argparse already exits with 2 on a usage error, so failed requests get their own code.
EXIT_PUBLISH_FAILED = 3


def _ratio(raw: str) -> float:
    value = float(raw)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {raw}")
    return value


def _non_negative(raw: str) -> int:
    value = int(raw)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {raw}")
    return value


def _positive(raw: str) -> int:
    value = int(raw)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {raw}")
    return value


def _seconds(raw: str) -> float:
    value = float(raw)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {raw}")
    return value


def build_parser(environ: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    """Build the argument parser; the token defaults to API_TOKEN from `environ`."""
    env = os.environ if environ is None else environ
    parser = argparse.ArgumentParser(
        prog="python -m publisher",
        description="Publish events with a known share of duplicates to the aggregator API.",
    )
    add = parser.add_argument
    add("--url", default="http://127.0.0.1:8080", help="API base URL (default: %(default)s)")
    add("--events", type=_non_negative, default=20000, help="events to publish (%(default)s)")
    add("--duplicates", type=_ratio, default=0.1, help="share of copies, 0..<1 (%(default)s)")
    add("--batch-size", type=_positive, default=500, help="events per request; 1 sends objects")
    add("--concurrency", type=_positive, default=8, help="requests in flight (%(default)s)")
    add("--topics", type=_positive, default=4, help="topics to spread events over (%(default)s)")
    add("--topic-prefix", help="topic name prefix (default: run-<random hex>)")
    add("--source", default="publisher", help="source field of every event (%(default)s)")
    add("--max-retries", type=_non_negative, default=8, help="retries per request (%(default)s)")
    add("--timeout", type=_seconds, default=10.0, help="seconds per attempt (%(default)s)")
    add("--token", default=env.get("API_TOKEN") or None, help="bearer token (env API_TOKEN)")
    add("--seed", type=int, help="seed for which events are copied and their order")
    add("--no-progress", action="store_true", help="hide the progress bar")
    add("--verify", action="store_true", help="wait for /stats and check exact counts")
    add("--verify-timeout", type=_seconds, default=120.0, help="seconds to wait (%(default)s)")
    add("--json", action="store_true", help="print one JSON object instead of text")
    return parser


def parse_config(
    argv: list[str] | None = None, environ: Mapping[str, str] | None = None
) -> tuple[PublishConfig, argparse.Namespace]:
    """Parse the command line into a PublishConfig and the remaining options."""
    parser = build_parser(environ)
    args = parser.parse_args(argv)
    extra = {"topic_prefix": args.topic_prefix} if args.topic_prefix else {}
    try:
        config = PublishConfig(
            url=args.url,
            count=args.events,
            duplicate_ratio=args.duplicates,
            batch_size=args.batch_size,
            concurrency=args.concurrency,
            topics=args.topics,
            source=args.source,
            max_retries=args.max_retries,
            timeout=args.timeout,
            token=args.token,
            progress=not args.no_progress,
            seed=args.seed,
            **extra,
        )
    except ValueError as exc:
        parser.error(str(exc))
    return config, args


def format_summary(summary: PublishSummary) -> str:
    """Render the publish summary as a small text table."""
    rows = [
        ("planned", f"{summary.planned} events in {summary.requests} requests"),
        ("sent", f"{summary.sent} events answered 202"),
        ("unique", f"{summary.unique}"),
        ("duplicates", f"{summary.duplicates}"),
        ("errors", f"{summary.errors} requests failed ({summary.failed_events} events)"),
        (
            "ambiguous",
            f"{summary.ambiguous} events of failed requests the API may still have accepted",
        ),
        ("elapsed", f"{summary.elapsed:.3f} s"),
        ("events/s", f"{summary.events_per_second:.1f}"),
        (
            "latency",
            f"p50 {summary.latency_p50_ms:.1f} ms, p99 {summary.latency_p99_ms:.1f} ms, "
            f"max {summary.latency_max_ms:.1f} ms",
        ),
        ("statuses", ", ".join(f"{key}={n}" for key, n in summary.statuses.items()) or "-"),
        ("topics", ", ".join(summary.topics)),
    ]
    if summary.first_error:
        rows.append(("first error", summary.first_error))
    return "\n".join(f"{name:<12}{value}" for name, value in rows)


def end_to_end_rate(summary: PublishSummary, result: VerifyResult) -> float:
    """Events per second from the first request until /stats showed every event processed."""
    total = summary.elapsed + result.waited
    return summary.sent / total if total > 0 else 0.0


def format_verify(summary: PublishSummary, result: VerifyResult) -> str:
    """Render the verification result, and the end-to-end rate when it settled."""
    verdict = "OK" if result.ok else "FAILED"
    line = f"{'verify':<12}{verdict} after {result.waited:.1f} s: {result.message}"
    if result.settled:
        rate = end_to_end_rate(summary, result)
        line += f"\n{'end to end':<12}{rate:.1f} events/s (publish + drain until /stats settled)"
    return line


def main(argv: list[str] | None = None) -> int:
    """Run the CLI and return the process exit code."""
    config, args = parse_config(argv)
    summary = publish(config)
    if not args.json:
        print(format_summary(summary), flush=True)
    result = None
    if args.verify:
        if not args.json:
            print(f"{'verify':<12}waiting up to {args.verify_timeout:.0f} s for /stats", flush=True)
        # Poll often: the wait is part of the end-to-end time we report.
        result = wait_and_verify(config.url, summary, args.verify_timeout, config.token, poll=0.05)
    if args.json:
        document = {
            "summary": summary.as_dict(),
            "verify": result.as_dict() if result else None,
            "end_to_end_events_per_second": end_to_end_rate(summary, result) if result else None,
        }
        sys.stdout.write(orjson.dumps(document).decode() + "\n")
    elif result is not None:
        print(format_verify(summary, result))
    if result is not None and not result.ok:
        return EXIT_VERIFY_FAILED
    if summary.errors:
        return EXIT_PUBLISH_FAILED
    return EXIT_OK
