"""The `aggregator` command: publish, follow the log, read batches, counters and dead letters."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
from collections.abc import Callable
from collections.abc import Iterator
from collections.abc import Mapping
from contextlib import ExitStack
from dataclasses import replace
from typing import IO
from typing import Any
from typing import Self

import orjson
from tqdm import tqdm

from aggregator_client.batches import batch_outcome
from aggregator_client.batches import wait_for_batches
from aggregator_client.client import DEFAULT_URL
from aggregator_client.client import HEALTH_TIMEOUT
from aggregator_client.client import MAX_BATCH
from aggregator_client.client import ApiError
from aggregator_client.client import Client
from aggregator_client.client import ClientError
from aggregator_client.client import Unreachable
from aggregator_client.events import InputError
from aggregator_client.events import plan_events
from aggregator_client.events import read_ndjson
from aggregator_client.events import run_prefix
from aggregator_client.events import run_topics
from aggregator_client.outcomes import PublishSummary
from aggregator_client.outcomes import RequestOutcome
from aggregator_client.outcomes import ServerOutcome
from aggregator_client.verify import VerifyResult
from aggregator_client.verify import wait_and_verify

EXIT_OK = 0
EXIT_VERIFY_FAILED = 1
EXIT_USAGE = 2  # argparse's own code for a bad option; also unreadable input.
EXIT_PUBLISH_FAILED = 3
EXIT_UNREACHABLE = 4
EXIT_REFUSED = 5
EXIT_NOT_FOUND = 6
EXIT_INTERRUPTED = 130

# How long publish waits by default for its batches to be stored, and the most it may.
WAIT_STORED = 5.0
MAX_WAIT_STORED = 3600.0

EXIT_CODES = f"""exit codes:
  {EXIT_OK}    done: every event accepted (publish), or the command did what it says
  {EXIT_VERIFY_FAILED}    publish --verify: /stats does not match what was accepted
  {EXIT_USAGE}    bad options, or input that is not NDJSON (the line is named)
  {EXIT_PUBLISH_FAILED}    the API refused a request or some events were not accepted
  {EXIT_UNREACHABLE}    the API did not answer (checked first, within {HEALTH_TIMEOUT:g} s)
  {EXIT_REFUSED}    the API refused the token (401) or its scope (403)
  {EXIT_NOT_FOUND}    batch: the API knows no such batch (404)
  {EXIT_INTERRUPTED}  interrupted (Ctrl-C) before the end
"""

EXAMPLES = """examples:
  aggregator publish events.ndjson                 # one JSON event per line
  some-program | aggregator publish -              # from stdin, as it arrives
  aggregator publish --generate 20000 --duplicates 0.1 --verify
  aggregator batch 8ba58774272c486180a68d6196e9a079 # queued, or stored N / duplicates N
  aggregator tail --topic orders                   # everything stored, then follow
  aggregator stats --topics --prefix orders
  aggregator dead-letters list
"""


class Fail(Exception):
    """End the command with a message on stderr and an exit code."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


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


def _batch_size(raw: str) -> int:
    value = _positive(raw)
    if value > MAX_BATCH:
        raise argparse.ArgumentTypeError(f"must be <= {MAX_BATCH}, got {raw}")
    return value


def _seconds(raw: str) -> float:
    value = float(raw)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {raw}")
    return value


def _wait_seconds(raw: str) -> float:
    value = float(raw)
    if not 0 <= value <= MAX_WAIT_STORED:
        raise argparse.ArgumentTypeError(f"must be in [0, {MAX_WAIT_STORED:g}], got {raw}")
    return value


def _json_object(raw: str) -> str:
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return raw


def build_parser(environ: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    """Build the parser; --url and --token default to AGGREGATOR_URL and API_TOKEN."""
    env = os.environ if environ is None else environ
    common = argparse.ArgumentParser(add_help=False)
    add = common.add_argument
    add(
        "--url",
        default=env.get("AGGREGATOR_URL") or DEFAULT_URL,
        help="API base URL (env AGGREGATOR_URL, default %(default)s)",
    )
    add("--token", default=env.get("API_TOKEN") or None, help="bearer token (env API_TOKEN)")
    add("--timeout", type=_seconds, default=10.0, help="seconds per request attempt (%(default)s)")
    add("--max-retries", type=_non_negative, default=8, help="retries per request (%(default)s)")
    add("--json", action="store_true", help="print JSON for machines instead of text")

    parser = argparse.ArgumentParser(
        prog="aggregator",
        description="Publish events to the log aggregator and read back what it stored.",
        epilog=EXAMPLES + "\n" + EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        return commands.add_parser(
            name,
            parents=[common],
            help=help_text,
            description=help_text,
            epilog=EXIT_CODES,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    publish = command("publish", "Publish NDJSON events from a file or stdin, or generated ones.")
    add = publish.add_argument
    add("file", nargs="?", help="NDJSON file, one event per line; - for stdin")
    add("--generate", type=_non_negative, metavar="N", help="publish N generated events instead")
    add("--duplicates", type=_ratio, default=0.1, help="--generate: share of copies (%(default)s)")
    add("--topics", type=_positive, default=4, help="--generate: topics (%(default)s)")
    add("--topic-prefix", help="--generate: topic prefix (default run-<random hex>)")
    add("--source", default="publisher", help="--generate: source field (%(default)s)")
    add("--seed", type=int, help="--generate: seed for which events are copied and their order")
    add("--batch-size", type=_batch_size, default=500, help="events per request; 1 sends objects")
    add("--concurrency", type=_positive, default=8, help="requests in flight (%(default)s)")
    add(
        "--linger",
        type=_seconds,
        default=0.5,
        help="stdin: send a batch that is not full after this many seconds (%(default)s)",
    )
    add("--no-progress", action="store_true", help="hide the progress bar")
    add("--verify", action="store_true", help="--generate: wait for /stats, check exact counts")
    add("--verify-timeout", type=_seconds, default=120.0, help="seconds to wait (%(default)s)")
    add(
        "--wait-stored",
        type=_wait_seconds,
        default=WAIT_STORED,
        metavar="SECONDS",
        help="then wait up to this long for the batches to be stored, and print their outcome"
        " from the server's ledger; 0 looks once (%(default)s)",
    )

    batch = command("batch", "Print what became of accepted batches: queued, or stored N.")
    batch.add_argument("ids", nargs="+", metavar="ID", help="batch_id from a 202 answer")
    batch.add_argument(
        "--wait",
        type=_wait_seconds,
        default=0.0,
        metavar="SECONDS",
        help="wait up to this long for queued batches to be stored (%(default)s)",
    )

    tail = command("tail", "Print stored events oldest first, then follow new ones.")
    add = tail.add_argument
    add("--topic", help="only this topic")
    add("--source", help="only this source")
    add(
        "--payload",
        type=_json_object,
        help='payload contains this JSON object, e.g. \'{"level": "error"}\' (needs --topic)',
    )
    add("--since", help="timestamp >= this (ISO 8601)")
    add("--until", help="timestamp < this (ISO 8601)")
    add("--cursor", help="start after this cursor (printed when tail stops)")
    add("--no-follow", action="store_true", help="stop at the end instead of waiting")
    add("--limit", type=_positive, help="stop after this many events")
    add(
        "--wait", type=_positive, default=20, help="seconds each follow request waits (%(default)s)"
    )

    stats = command("stats", "Print exact counters: totals, or per topic.")
    stats.add_argument("--topics", action="store_true", help="per-topic counters instead")
    stats.add_argument("--prefix", help="with --topics: only topics starting with this")

    letters = command("dead-letters", "List events the database refused, or replay them.")
    letters.add_argument("action", choices=["list", "replay"])
    letters.add_argument("ids", nargs="*", type=int, metavar="ID", help="replay: dead letter ids")
    return parser


# -- output ---------------------------------------------------------------------------------


def emit_json(document: Any) -> None:
    sys.stdout.write(orjson.dumps(document).decode() + "\n")
    sys.stdout.flush()


def _plural(count: int, noun: str, plural: str | None = None) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {plural or noun + 's'}"


def _batches(count: int) -> str:
    return _plural(count, "batch", "batches")


def format_rows(rows: list[tuple[str, str]]) -> str:
    """Render (name, value) rows as the summary's two columns."""
    return "\n".join(f"{name:<12}{value}" for name, value in rows)


def format_outcome(outcome: ServerOutcome) -> list[tuple[str, str]]:
    """Render what the server's ledger says of a run's batches as rows of the summary."""
    if outcome.unread_batches == outcome.batches:
        return [("outcome", f"not read: {outcome.error or 'no answer'}")]
    counts = f"stored {outcome.stored}, duplicates {outcome.duplicates}, failed {outcome.failed}"
    done = f"{outcome.stored_batches} of {_batches(outcome.batches)} stored"
    so_far = "" if outcome.complete else " so far"
    rows = [("outcome", f"{counts}{so_far} (server's ledger: {done})")]
    if outcome.queued_batches:
        which = outcome.queued_ids[0] if outcome.queued_batches == 1 else "ID (--json lists them)"
        rows.append(
            (
                "queued",
                f"still queued: {_batches(outcome.queued_batches)}"
                f" ({outcome.queued_events} events) after {outcome.waited:.1f} s;"
                f" aggregator batch {which}",
            )
        )
    if outcome.unknown_batches:
        rows.append(
            ("unknown", f"{_batches(outcome.unknown_batches)} the server does not know (404)")
        )
    if outcome.unread_batches:
        rows.append(
            ("not read", f"{_batches(outcome.unread_batches)}: {outcome.error or 'no answer'}")
        )
    if outcome.shared:
        rows.append(("shared", "batches also carried requests that arrived with ours: counted too"))
    return rows


def format_summary(summary: PublishSummary, outcome: ServerOutcome | None = None) -> str:
    """Render the publish summary as a small text table, with the server's outcome if given."""
    accepted = f"{summary.sent} events answered 202"
    if summary.batches:
        accepted += f", in {_batches(len(summary.batches))}"
    rows = [
        ("read", f"{summary.planned} events, sent in {_plural(summary.requests, 'request')}"),
        ("accepted", accepted),
        *(format_outcome(outcome) if outcome is not None else []),
        (
            "client-side",
            f"{summary.unique} distinct keys, {summary.duplicates} repeated within this run"
            " (not the outcome)",
        ),
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
        ("topics", ", ".join(summary.topics[:10]) + (" ..." if len(summary.topics) > 10 else "")),
    ]
    if summary.first_error:
        rows.append(("first error", summary.first_error))
    if summary.stopped_by:
        rows.append(("stopped", f"{summary.stopped_by}; {summary.unsent} events not sent"))
    return format_rows(rows)


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


def format_event(event: dict[str, Any]) -> str:
    """Render one stored event as a line: time, topic, source, id, payload."""
    payload = orjson.dumps(event.get("payload"), option=orjson.OPT_SORT_KEYS).decode()
    return (
        f"{event['timestamp']}  {event['topic']}  {event['source']}  {event['event_id']}  {payload}"
    )


# -- commands -------------------------------------------------------------------------------


def check_reachable(client: Client) -> None:
    """Fail within HEALTH_TIMEOUT, with a clear message, when nobody answers at the URL."""
    try:
        client.health()
    except Unreachable as exc:
        raise Fail(
            EXIT_UNREACHABLE,
            f"cannot reach the API: {exc}. Is it running? Check --url or AGGREGATOR_URL.",
        ) from None
    except ApiError as exc:
        raise Fail(
            EXIT_UNREACHABLE, f"{client.url} does not look like the aggregator API: {exc}"
        ) from None


def _read_input(
    args: argparse.Namespace, stack: ExitStack
) -> tuple[Iterator[dict[str, Any]], int | None, list[InputError]]:
    """Return the events to publish, how many (when known) and a list that collects a bad line."""
    problems: list[InputError] = []
    if args.generate is not None:
        prefix = args.topic_prefix or run_prefix()
        try:
            events = plan_events(
                args.generate,
                args.duplicates,
                run_topics(prefix, args.topics),
                args.source,
                args.seed,
            )
        except ValueError as exc:
            raise Fail(EXIT_USAGE, str(exc)) from None
        return iter(events), len(events), problems
    if args.file in (None, "-"):
        if args.file is None and sys.stdin.isatty():
            raise Fail(EXIT_USAGE, "give an NDJSON file, - for stdin, or --generate N")
        stream: IO[bytes] = sys.stdin.buffer
        total = None
    else:
        try:
            stream = stack.enter_context(open(args.file, "rb"))
        except OSError as exc:
            raise Fail(EXIT_USAGE, f"cannot read {args.file}: {exc.strerror}") from None
        # A file is checked whole before anything is sent: a broken line
        # never leaves half of a file published.
        try:
            total = sum(1 for _ in read_ndjson(stream))
        except InputError as exc:
            raise Fail(EXIT_USAGE, f"{args.file}: {exc}; nothing was sent") from None
        stream.seek(0)

    def checked() -> Iterator[dict[str, Any]]:
        try:
            yield from read_ndjson(stream)
        except InputError as exc:  # From a pipe: stop there, report what was sent.
            problems.append(exc)

    return checked(), total, problems


def run_publish(client: Client, args: argparse.Namespace) -> int:
    """Publish, print the summary (and verification), and return the exit code."""
    if args.generate is not None and args.file is not None:
        raise Fail(EXIT_USAGE, "give either a file or --generate, not both")
    if args.verify and args.generate is None:
        # Verification compares whole topics with this run: only a generated
        # run's topics are known to hold nothing else.
        raise Fail(EXIT_USAGE, "--verify needs --generate (its topics are new)")
    with ExitStack() as stack:
        events, total, problems = _read_input(args, stack)
        check_reachable(client)
        progress = stack.enter_context(
            tqdm(
                total=total,
                unit="ev",
                desc="accepted",
                file=sys.stderr,
                # None: shown only on a terminal.
                disable=True if args.no_progress or args.json else None,
            )
        )
        failed = 0

        def advance(outcome: RequestOutcome) -> None:
            nonlocal failed
            if outcome.accepted:
                progress.update(len(outcome.events))
            else:
                failed += len(outcome.events)
                progress.set_postfix(failed=failed, last=outcome.error, refresh=False)

        # A pipe may trickle: send what came within --linger rather than wait for a full batch.
        linger = args.linger if total is None else None
        summary = client.publish(
            events, batch_size=args.batch_size, linger=linger, on_outcome=advance
        )
    if total is not None and summary.stopped_by is not None:
        # Stopped early: the events never read count as not sent too.
        unsent = total - summary.sent - summary.failed_events
        summary = replace(summary, planned=total, unsent=unsent)
    result = None
    if args.verify and summary.stopped_by is None:
        if not args.json:
            print(format_summary(summary), flush=True)
            print(f"{'verify':<12}waiting up to {args.verify_timeout:.0f} s for /stats", flush=True)
        # Poll often: the wait is part of the end-to-end time we report.
        result = wait_and_verify(client, summary, args.verify_timeout, poll=0.05)
    outcome = None
    if summary.batches and summary.stopped_by is None:
        # After any verification, so its end-to-end time is not ours to wait.
        with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C: the summary, without it.
            outcome = batch_outcome(client, summary.batches, args.wait_stored)
    if args.json:
        emit_json(
            {
                "summary": summary.as_dict(),
                "verify": result.as_dict() if result else None,
                "end_to_end_events_per_second": end_to_end_rate(summary, result)
                if result
                else None,
                "input_error": str(problems[0]) if problems else None,
                "outcome": outcome.as_dict() if outcome else None,
            }
        )
    elif result is None:
        print(format_summary(summary, outcome))
    else:
        print(format_verify(summary, result))
        if outcome is not None:
            print(format_rows(format_outcome(outcome)))
    if problems:
        raise Fail(EXIT_USAGE, f"stdin: {problems[0]}; the events before it were published")
    if summary.stopped_by == "interrupted":
        return EXIT_INTERRUPTED
    if summary.stopped_by is not None:
        raise Fail(EXIT_REFUSED, f"the API refused the token: {summary.first_error}")
    if result is not None and not result.ok:
        return EXIT_VERIFY_FAILED
    return EXIT_PUBLISH_FAILED if summary.errors else EXIT_OK


class HeldInterrupt:
    """Ctrl-C that waits for the end of a `hold()`: an event printed is an event passed.

    Elsewhere (waiting on the network) it interrupts at once, as usual.
    """

    def __init__(self) -> None:
        self._holding = False
        self._pending = False

    def __enter__(self) -> Self:
        self._previous = signal.signal(signal.SIGINT, self._interrupt)
        return self

    def __exit__(self, *_: object) -> None:
        signal.signal(signal.SIGINT, self._previous)

    def _interrupt(self, *_: object) -> None:
        if self._holding:
            self._pending = True
        else:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        self._holding = True
        try:
            yield
        finally:
            self._holding = False
        if self._pending:
            raise KeyboardInterrupt


def run_tail(client: Client, args: argparse.Namespace) -> int:
    """Print matching events oldest first; follow unless --no-follow; stop at --limit.

    Events come from the streamed export, each with its cursor, so a stop anywhere
    (the end, --limit, Ctrl-C) names exactly where to resume. Following, a long
    poll waits until something is stored past the cursor, then the export resumes.
    """
    check_reachable(client)
    filters = {
        name: getattr(args, name)
        for name in ("topic", "source", "payload", "since", "until")
        if getattr(args, name) is not None
    }
    cursor: str | None = args.cursor
    printed = 0

    def warn(exc: ClientError) -> None:
        print(f"aggregator: {exc}; trying again", file=sys.stderr, flush=True)

    with HeldInterrupt() as interrupt:
        try:
            while True:
                for event in client.export(cursor=cursor, **filters):
                    with interrupt.hold():
                        position = event.pop("cursor")
                        # Sorted keys: an event prints the same way whatever its source.
                        line = orjson.dumps(event, option=orjson.OPT_SORT_KEYS).decode()
                        print(line if args.json else format_event(event), flush=True)
                        cursor = position
                    printed += 1
                    if args.limit is not None and printed >= args.limit:
                        return _resume_from(cursor)
                if args.no_follow:
                    return _resume_from(cursor)
                # One page of one event is enough to know there is more to export.
                follow = client.follow(
                    cursor=cursor, wait=args.wait, limit=1, on_error=warn, **filters
                )
                while not next(follow).events:
                    pass
        except KeyboardInterrupt:
            pass
    return _resume_from(cursor)


def _resume_from(cursor: str | None) -> int:
    if cursor:
        print(f"aggregator: resume with --cursor {cursor}", file=sys.stderr)
    return EXIT_OK


def run_stats(client: Client, args: argparse.Namespace) -> int:
    """Print /stats, or every topic's counters."""
    check_reachable(client)
    if args.topics:
        rows = list(client.topic_stats(args.prefix))
        if args.json:
            emit_json(rows)
        else:
            print(f"{'topic':<40} {'stored':>10} {'duplicates':>10} {'failed':>8}")
            for row in rows:
                counts = f"{row['stored']:>10} {row['duplicates']:>10} {row['failed']:>8}"
                print(f"{row['topic']:<40} {counts}")
        return EXIT_OK
    figures = client.stats()
    if args.json:
        emit_json(figures)
    else:
        for name, value in figures.items():
            shown = orjson.dumps(value).decode() if isinstance(value, dict | list) else value
            print(f"{name:<32}{shown}")
    return EXIT_OK


def format_batch(answer: dict[str, Any]) -> str:
    """Render one batch's answer as a line: id, status, counts."""
    line = f"{answer['batch_id']}  {answer['status']:<7} received {answer['received']}"
    if answer["status"] == "stored":
        line += (
            f": stored {answer['stored']}, duplicates {answer['duplicates']},"
            f" failed {answer['failed']} (at {answer['processed_at']})"
        )
    return line


def run_batch(client: Client, args: argparse.Namespace) -> int:
    """Print what became of each batch; wait up to --wait for queued ones to be stored."""
    check_reachable(client)
    lookup = wait_for_batches(client, args.ids, args.wait)
    if lookup.error is not None:
        raise lookup.error
    answers = []
    for batch_id in args.ids:
        answer = lookup.answers[batch_id]
        if answer is None:
            print(f"aggregator: no batch {batch_id} (never accepted, or gone)", file=sys.stderr)
        answers.append(answer or {"batch_id": batch_id, "status": "unknown"})
    if args.json:
        emit_json(answers)
    else:
        for answer in answers:
            if answer["status"] != "unknown":
                print(format_batch(dict(answer)))
    return EXIT_NOT_FOUND if any(a["status"] == "unknown" for a in answers) else EXIT_OK


def run_dead_letters(client: Client, args: argparse.Namespace) -> int:
    """List dead letters, or replay the given ones."""
    check_reachable(client)
    if args.action == "list":
        if args.ids:
            raise Fail(EXIT_USAGE, "list takes no ids")
        letters = client.dead_letters()
        if args.json:
            emit_json(letters)
        else:
            for letter in letters:
                where = f"{letter['topic']}  {letter['event_id']}"
                print(f"{letter['id']:>6}  {letter['failed_at']}  {where}  {letter['error']}")
            print(f"{len(letters)} dead letters", file=sys.stderr)
        return EXIT_OK
    if not args.ids:
        raise Fail(EXIT_USAGE, "replay needs at least one dead letter id (see: dead-letters list)")
    results = []
    code = EXIT_OK
    for letter_id in args.ids:
        try:
            results.append(client.replay_dead_letter(letter_id))
        except ApiError as exc:
            if exc.status in (401, 403):
                raise
            results.append({"id": letter_id, "error": str(exc)})
            code = EXIT_PUBLISH_FAILED
    if args.json:
        emit_json(results)
    else:
        for result in results:
            print(f"{result['id']:>6}  {result.get('result') or result['error']}")
    return code


COMMANDS: dict[str, Callable[[Client, argparse.Namespace], int]] = {
    "publish": run_publish,
    "batch": run_batch,
    "tail": run_tail,
    "stats": run_stats,
    "dead-letters": run_dead_letters,
}


def main(argv: list[str] | None = None) -> int:
    """Run the CLI and return the process exit code."""
    args = build_parser().parse_args(argv)
    concurrency = getattr(args, "concurrency", 1)
    try:
        with Client(
            args.url,
            args.token,
            timeout=args.timeout,
            max_retries=args.max_retries,
            concurrency=concurrency,
        ) as client:
            return COMMANDS[args.command](client, args)
    except Fail as exc:
        print(f"aggregator: {exc}", file=sys.stderr)
        return exc.code
    except ApiError as exc:
        print(f"aggregator: {exc}", file=sys.stderr)
        return EXIT_REFUSED if exc.status in (401, 403) else EXIT_PUBLISH_FAILED
    except Unreachable as exc:
        print(f"aggregator: lost the API: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except ValueError as exc:  # e.g. a --url that is not http(s)
        print(f"aggregator: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # Piped into `head`: the reader is gone; say nothing more.
        sys.stderr.close()
        return EXIT_OK
