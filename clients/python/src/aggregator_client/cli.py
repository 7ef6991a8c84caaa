"""The `aggregator` command: publish, follow the log, read batches, counters and dead letters.

Built on click: options are checked by the types of `aggregator_client.options`
(refused in our own words, exit 2), the global options (--url, --token,
--timeout, --max-retries, --json) are taken before or after the command, and
click supplies --version and shell completion (`_AGGREGATOR_COMPLETE`, see
--help). Parsing only collects an `Invocation`; `run` carries it out.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
import signal
import socket
import sys
from collections.abc import Callable
from collections.abc import Iterator
from collections.abc import Mapping
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from dataclasses import field
from dataclasses import replace
from types import SimpleNamespace
from typing import IO
from typing import Any
from typing import Self

import click
import orjson
from click.shell_completion import CompletionItem
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
from aggregator_client.events import LineNumbers
from aggregator_client.events import plan_events
from aggregator_client.events import read_lines
from aggregator_client.events import read_ndjson
from aggregator_client.events import run_prefix
from aggregator_client.events import run_topics
from aggregator_client.options import JsonObject
from aggregator_client.options import Moment
from aggregator_client.options import Number
from aggregator_client.options import OneOf
from aggregator_client.options import Whole
from aggregator_client.outcomes import RequestOutcome
from aggregator_client.report import MAX_REFUSALS
from aggregator_client.report import InputPlaces
from aggregator_client.report import Refusal
from aggregator_client.report import end_to_end_rate
from aggregator_client.report import format_batch
from aggregator_client.report import format_event
from aggregator_client.report import format_outcome
from aggregator_client.report import format_rows
from aggregator_client.report import format_summary
from aggregator_client.report import format_verify
from aggregator_client.report import refusals_of
from aggregator_client.verify import wait_and_verify

PROG = "aggregator"
DISTRIBUTION = "log-aggregator-client"

EXIT_OK = 0
EXIT_VERIFY_FAILED = 1
EXIT_USAGE = 2  # click's own code for a bad option; also unreadable input.
EXIT_PUBLISH_FAILED = 3
EXIT_UNREACHABLE = 4
EXIT_REFUSED = 5
EXIT_NOT_FOUND = 6
EXIT_INTERRUPTED = 130

# How long publish waits by default for its batches to be stored, and the most it may.
WAIT_STORED = 5.0
MAX_WAIT_STORED = 3600.0
# Defaults of the global options (given before or after the command).
TIMEOUT = 10.0
MAX_RETRIES = 8
# Completing a topic asks the API; a shell must not hang on it.
COMPLETION_TIMEOUT = 1.0
COMPLETION_LIMIT = 100

# click keeps a paragraph after a \b line as written, indented by two spaces.
EXIT_CODES = f"""\b
exit codes:
{EXIT_OK}    done: every event accepted (publish), or the command did what it says
{EXIT_VERIFY_FAILED}    publish --verify: /stats does not match what was accepted
{EXIT_USAGE}    bad options, or input that is not NDJSON (the line is named)
{EXIT_PUBLISH_FAILED}    the API refused a request or some events were not accepted
{EXIT_UNREACHABLE}    the API did not answer (checked first, within {HEALTH_TIMEOUT:g} s)
{EXIT_REFUSED}    the API refused the token (401) or its scope (403)
{EXIT_NOT_FOUND}    batch: the API knows no such batch (404)
{EXIT_INTERRUPTED}  interrupted (Ctrl-C) before the end
"""

EXAMPLES = """\b
examples:
aggregator publish events.ndjson                 # one JSON event per line
some-program | aggregator publish -              # from stdin, as it arrives
aggregator publish --gzip --ndjson app.ndjson    # NDJSON bodies, gzip-compressed
aggregator publish --generate 20000 --duplicates 0.1 --verify
aggregator batch 8ba58774272c486180a68d6196e9a079 # queued, or stored N / duplicates N
aggregator --url http://host:8080 stats          # global options before or after the command
aggregator tail --topic orders --since 10m       # the last 10 minutes, then follow
aggregator stats --topics --prefix orders
aggregator dead-letters list
"""

COMPLETION = """\b
shell completion (bash; zsh and fish alike, with zsh_source or fish_source):
eval "$(_AGGREGATOR_COMPLETE=bash_source aggregator)"    # in ~/.bashrc
"""


class Fail(Exception):
    """End the command with a message on stderr and an exit code."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class State:
    """What the command line's parts share: the environment and the global options given."""

    environ: Mapping[str, str]
    given: dict[str, Any] = field(default_factory=dict)

    def options(self, local: dict[str, Any]) -> SimpleNamespace:
        """Merge a command's options with the global ones; the command's own win."""
        merged = dict(local)
        for name in GLOBAL_OPTIONS:
            value = local.get(name)
            if value is None or value is False:
                value = self.given.get(name)
            merged[name] = value
        merged["url"] = merged["url"] or self.environ.get("AGGREGATOR_URL") or DEFAULT_URL
        merged["token"] = merged["token"] or self.environ.get("API_TOKEN") or None
        merged["timeout"] = TIMEOUT if merged["timeout"] is None else merged["timeout"]
        retries = merged["max_retries"]
        merged["max_retries"] = MAX_RETRIES if retries is None else retries
        merged["json"] = bool(merged["json"])
        return SimpleNamespace(**merged)


@dataclass(frozen=True)
class Invocation:
    """A parsed command line: which command, with every option's value."""

    command: str
    args: SimpleNamespace


GLOBAL_OPTIONS = ("url", "token", "timeout", "max_retries", "json")


def _endpoint(ctx: click.Context) -> tuple[str, str | None]:
    """Return the URL and token of the command line being completed."""
    given: dict[str, Any] = {}
    for context in reversed(list(_lineage(ctx))):
        given.update({k: v for k, v in context.params.items() if v is not None})
    state = ctx.find_object(State)
    environ = state.environ if state is not None else os.environ
    url = given.get("url") or environ.get("AGGREGATOR_URL") or DEFAULT_URL
    return url, given.get("token") or environ.get("API_TOKEN") or None


def _lineage(ctx: click.Context) -> Iterator[click.Context]:
    current: click.Context | None = ctx
    while current is not None:
        yield current
        current = current.parent


def complete_topics(ctx: click.Context, _: click.Parameter, incomplete: str) -> list[Any]:
    """Offer the topics the API knows that start with what was typed (none if it is away)."""
    url, token = _endpoint(ctx)
    try:
        with Client(url, token, timeout=COMPLETION_TIMEOUT, max_retries=0) as client:
            rows = itertools.islice(client.topic_stats(incomplete or None), COMPLETION_LIMIT)
            return [CompletionItem(row["topic"]) for row in rows]
    except (ClientError, ValueError):
        return []


def global_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Add --url, --token, --timeout, --max-retries and --json (before or after the command)."""
    decorators = [
        click.option(
            "--url",
            metavar="URL",
            help=f"API base URL (env AGGREGATOR_URL, default {DEFAULT_URL})",
        ),
        click.option("--token", metavar="TOKEN", help="bearer token (env API_TOKEN)"),
        click.option(
            "--timeout",
            type=Number(0, above=True, unit="seconds"),
            metavar="SECONDS",
            help=f"seconds per request attempt ({TIMEOUT:g})",
        ),
        click.option(
            "--max-retries",
            type=Whole(0),
            metavar="N",
            help=f"retries per request ({MAX_RETRIES})",
        ),
        click.option("--json", is_flag=True, default=None, help="print JSON for machines"),
    ]
    for decorate in reversed(decorators):
        command = decorate(command)
    return command


CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


@click.group(
    name=PROG,
    context_settings=CONTEXT,
    epilog=EXAMPLES + "\n" + EXIT_CODES + "\n" + COMPLETION,
)
@global_options
@click.version_option(
    package_name=DISTRIBUTION, prog_name=PROG, message="%(prog)s %(version)s (%(package)s)"
)
@click.pass_context
def cli(ctx: click.Context, **given: Any) -> None:
    """Publish events to the log aggregator and read back what it stored."""
    ctx.ensure_object(State).given = given


def _options(*decorators: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """Apply option decorators in the order listed (as --help shows them)."""

    def apply(command: Any) -> Any:
        for decorate in reversed(decorators):
            command = decorate(command)
        return command

    return apply


publish_options = _options(
    click.argument(
        "file",
        required=False,
        type=click.Path(dir_okay=False, allow_dash=True),
    ),
    click.option("--generate", type=Whole(0), metavar="N", help="publish N generated events"),
    click.option(
        "--duplicates",
        type=Number(0, 1, below=True),
        default=0.1,
        show_default=True,
        help="--generate: share of copies",
    ),
    click.option(
        "--topics", type=Whole(1), default=4, show_default=True, help="--generate: topics"
    ),
    click.option("--topic-prefix", help="--generate: topic prefix (default run-<random hex>)"),
    click.option(
        "--source",
        help="--generate: source field (default publisher); --lines: (default this host's name)",
    ),
    click.option(
        "--lines",
        is_flag=True,
        help="FILE holds raw log lines, not JSON events: each line becomes an event of --topic"
        " (docs/shipping.md)",
    ),
    click.option("--topic", help="--lines: the topic of the lines' events"),
    click.option("--seed", type=Whole(), help="--generate: seed for the copies and order"),
    click.option(
        "--batch-size",
        type=Whole(1, MAX_BATCH),
        default=500,
        show_default=True,
        help="events per request; 1 sends objects",
    ),
    click.option(
        "--concurrency",
        type=Whole(1),
        default=8,
        show_default=True,
        help="requests in flight",
    ),
    click.option(
        "--linger",
        type=Number(0, above=True, unit="seconds"),
        default=0.5,
        show_default=True,
        metavar="SECONDS",
        help="stdin: send a batch that is not full after this long",
    ),
    click.option(
        "--gzip",
        "compress",
        is_flag=True,
        help="gzip each request body (Content-Encoding: gzip)",
    ),
    click.option(
        "--ndjson",
        is_flag=True,
        help="send each batch as NDJSON lines (application/x-ndjson), not a JSON array",
    ),
    click.option("--no-progress", is_flag=True, help="hide the progress bar"),
    click.option("--verify", is_flag=True, help="--generate: wait for /stats, check counts"),
    click.option(
        "--verify-timeout",
        type=Number(0, above=True, unit="seconds"),
        default=120.0,
        show_default=True,
        metavar="SECONDS",
        help="how long --verify waits",
    ),
    click.option(
        "--wait-stored",
        type=Number(0, MAX_WAIT_STORED, unit="seconds"),
        default=WAIT_STORED,
        show_default=True,
        metavar="SECONDS",
        help="then wait up to this long for the batches to be stored, and print their"
        " outcome from the server's ledger; 0 looks once",
    ),
)


@cli.command("publish", epilog=EXIT_CODES, context_settings=CONTEXT)
@publish_options
@global_options
@click.pass_obj
def publish_command(state: State, **options: Any) -> Invocation:
    """Publish NDJSON events, raw log lines (--lines --topic T), or generated ones.

    FILE holds one JSON event per line (or, with --lines, one log line per line);
    - reads stdin as it arrives.
    """
    return Invocation("publish", state.options(options))


@cli.command("batch", epilog=EXIT_CODES, context_settings=CONTEXT)
@click.argument("ids", nargs=-1, required=True, metavar="ID...")
@click.option(
    "--wait",
    type=Number(0, MAX_WAIT_STORED, unit="seconds"),
    default=0.0,
    show_default=True,
    metavar="SECONDS",
    help="wait up to this long for queued batches to be stored",
)
@global_options
@click.pass_obj
def batch_command(state: State, **options: Any) -> Invocation:
    """Print what became of accepted batches: queued, or stored N."""
    return Invocation("batch", state.options(options))


@cli.command("tail", epilog=EXIT_CODES, context_settings=CONTEXT)
@click.option("--topic", shell_complete=complete_topics, help="only this topic")
@click.option("--source", help="only this source")
@click.option(
    "--payload",
    type=JsonObject(),
    help='payload contains this JSON object, e.g. \'{"level": "error"}\' (needs --topic)',
)
@click.option(
    "--since",
    type=Moment(),
    help="timestamp >= this: 10m, 2h, 3d (ago) or ISO 8601 (local time if no offset)",
)
@click.option("--until", type=Moment(), help="timestamp < this (as --since)")
@click.option("--cursor", help="start after this cursor (printed when tail stops)")
@click.option("--no-follow", is_flag=True, help="stop at the end instead of waiting")
@click.option("--limit", type=Whole(1), help="stop after this many events")
@click.option(
    "--wait",
    type=Whole(1),
    default=20,
    show_default=True,
    metavar="SECONDS",
    help="seconds each follow request waits",
)
@global_options
@click.pass_obj
def tail_command(state: State, **options: Any) -> Invocation:
    """Print stored events oldest first, then follow new ones."""
    return Invocation("tail", state.options(options))


@cli.command("stats", epilog=EXIT_CODES, context_settings=CONTEXT)
@click.option("--topics", is_flag=True, help="per-topic counters instead")
@click.option(
    "--oldest",
    is_flag=True,
    help="with --topics: also each topic's oldest retained event (100 topics per request)",
)
@click.option(
    "--prefix", shell_complete=complete_topics, help="with --topics: only topics starting with this"
)
@global_options
@click.pass_obj
def stats_command(state: State, **options: Any) -> Invocation:
    """Print exact counters: totals, or per topic."""
    return Invocation("stats", state.options(options))


@cli.command("dead-letters", epilog=EXIT_CODES, context_settings=CONTEXT)
@click.argument("action", type=OneOf(["list", "replay"]))
@click.argument("ids", nargs=-1, type=Whole(1), metavar="[ID]...")
@global_options
@click.pass_obj
def dead_letters_command(state: State, **options: Any) -> Invocation:
    """List or replay (ID...) the events the database refused."""
    return Invocation("dead-letters", state.options(options))


# -- output ---------------------------------------------------------------------------------


def emit_json(document: Any) -> None:
    sys.stdout.write(orjson.dumps(document).decode() + "\n")
    sys.stdout.flush()


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
    args: SimpleNamespace, stack: ExitStack
) -> tuple[Iterator[dict[str, Any]], int | None, list[InputError], InputPlaces]:
    """Return the events to publish, how many (when known), a list that collects a bad line
    and where each event came from."""
    problems: list[InputError] = []
    if args.generate is not None:
        prefix = args.topic_prefix or run_prefix()
        try:
            events = plan_events(
                args.generate,
                args.duplicates,
                run_topics(prefix, args.topics),
                args.source or "publisher",
                args.seed,
            )
        except ValueError as exc:
            raise Fail(EXIT_USAGE, str(exc)) from None
        return iter(events), len(events), problems, InputPlaces()
    if args.lines and not args.topic:
        raise Fail(EXIT_USAGE, "--lines needs --topic: the topic of the lines' events")
    if args.topic and not args.lines:
        raise Fail(EXIT_USAGE, "--topic goes with --lines (NDJSON events name their own)")
    read: Callable[..., Iterator[dict[str, Any]]] = read_ndjson
    if args.lines:
        origin = "stdin" if args.file in (None, "-") else os.path.abspath(args.file)
        read = functools.partial(
            read_lines,
            topic=args.topic,
            source=args.source or socket.gethostname(),
            origin=origin,
        )
    if args.file in (None, "-"):
        if args.file is None and sys.stdin.isatty():
            raise Fail(EXIT_USAGE, "give an NDJSON file, - for stdin, or --generate N")
        stream: IO[bytes] = sys.stdin.buffer
        total = None
        name = "stdin"
    else:
        try:
            stream = stack.enter_context(open(args.file, "rb"))
        except OSError as exc:
            raise Fail(EXIT_USAGE, f"cannot read {args.file}: {exc.strerror}") from None
        # A file is checked whole before anything is sent: a broken line
        # never leaves half of a file published.
        try:
            total = sum(1 for _ in read(stream))
        except InputError as exc:
            raise Fail(EXIT_USAGE, f"{args.file}: {exc}; nothing was sent") from None
        stream.seek(0)
        name = args.file
    lines = LineNumbers()

    def checked() -> Iterator[dict[str, Any]]:
        try:
            yield from read(stream, lines=lines)
        except InputError as exc:  # From a pipe: stop there, report what was sent.
            problems.append(exc)

    return checked(), total, problems, InputPlaces(name, lines)


def run_publish(client: Client, args: SimpleNamespace) -> int:
    """Publish, print the summary (and verification), and return the exit code."""
    if args.generate is not None and args.file is not None:
        raise Fail(EXIT_USAGE, "give either a file or --generate, not both")
    if args.verify and args.generate is None:
        # Verification compares whole topics with this run: only a generated
        # run's topics are known to hold nothing else.
        raise Fail(EXIT_USAGE, "--verify needs --generate (its topics are new)")
    with ExitStack() as stack:
        events, total, problems, places = _read_input(args, stack)
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
        refused: list[Refusal] = []
        refused_total = 0

        def advance(outcome: RequestOutcome) -> None:
            # Called for one outcome at a time (Client.publish holds a lock around it).
            nonlocal failed, refused_total
            if outcome.accepted:
                progress.update(len(outcome.events))
                return
            failed += len(outcome.events)
            found = refusals_of(outcome, places)
            refused_total += len(found)
            refused.extend(found[: MAX_REFUSALS - len(refused)])
            last = f"{found[0].where}: {found[0].problems}" if found else outcome.error
            progress.set_postfix(failed=failed, last=last, refresh=False)

        # A pipe may trickle: send what came within --linger rather than wait for a full batch.
        linger = args.linger if total is None else None
        summary = client.publish(
            events, batch_size=args.batch_size, linger=linger, on_outcome=advance
        )
    if total is not None and summary.stopped_by is not None:
        # Stopped early: the events never read count as not sent too.
        unsent = total - summary.sent - summary.failed_events
        summary = replace(summary, planned=total, unsent=unsent)
    # Requests end in any order; refusals are listed in the order of the input.
    refused.sort(key=lambda refusal: (refusal.line is None, refusal.line or 0))
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
                "refused": [refusal.as_dict() for refusal in refused],
                "refused_total": refused_total,
            }
        )
    elif result is None:
        print(format_summary(summary, outcome, refused, refused_total))
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


def run_tail(client: Client, args: SimpleNamespace) -> int:
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

    def gap(line: dict[str, Any]) -> None:
        print(
            "aggregator: retention dropped events after this point; continuing with the"
            " oldest kept",
            file=sys.stderr,
            flush=True,
        )

    with HeldInterrupt() as interrupt:
        try:
            while True:
                for event in client.export(cursor=cursor, on_gap=gap, **filters):
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


def run_stats(client: Client, args: SimpleNamespace) -> int:
    """Print /stats, or every topic's counters."""
    check_reachable(client)
    if args.topics:
        rows = list(client.topic_stats(args.prefix, oldest=args.oldest))
        if args.json:
            emit_json(rows)
        else:
            oldest = f" {'oldest_position':>16} oldest_stored_at" if args.oldest else ""
            print(f"{'topic':<40} {'stored':>10} {'duplicates':>10} {'failed':>8}{oldest}")
            for row in rows:
                counts = f"{row['stored']:>10} {row['duplicates']:>10} {row['failed']:>8}"
                if args.oldest:
                    position, stored_at = row["oldest_position"], row["oldest_stored_at"]
                    counts += f" {'-' if position is None else position:>16} {stored_at or '-'}"
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


def run_batch(client: Client, args: SimpleNamespace) -> int:
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


def run_dead_letters(client: Client, args: SimpleNamespace) -> int:
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


COMMANDS: dict[str, Callable[[Client, SimpleNamespace], int]] = {
    "publish": run_publish,
    "batch": run_batch,
    "tail": run_tail,
    "stats": run_stats,
    "dead-letters": run_dead_letters,
}


def _parse(argv: Sequence[str] | None, environ: Mapping[str, str] | None) -> Invocation | int:
    # Shell completion (_AGGREGATOR_COMPLETE set) answers and exits inside click.
    result = cli.main(
        args=None if argv is None else list(argv),
        prog_name=PROG,
        standalone_mode=False,
        obj=State(os.environ if environ is None else environ),
    )
    # Not an Invocation: --help or --version printed, and this is the exit code.
    return result if isinstance(result, Invocation) else int(result or 0)


def parse_args(argv: Sequence[str], environ: Mapping[str, str] | None = None) -> Invocation:
    """Parse a command line without running it; click.UsageError says what is wrong."""
    parsed = _parse(argv, environ)
    if isinstance(parsed, int):
        raise SystemExit(parsed)
    return parsed


def usage_error(exc: click.ClickException) -> int:
    """Print a bad command line's message in our form and return its exit code."""
    if isinstance(exc, click.exceptions.NoArgsIsHelpError):
        exc.show()  # No command at all: the help, on stderr.
        return exc.exit_code
    message = exc.format_message()
    if type(exc) is click.BadParameter and exc.param is not None:
        param = exc.param
        name = (
            "/".join(param.opts) if isinstance(param, click.Option) else param.human_readable_name
        )
        message = f"{name}: {exc.message}"
    print(f"{PROG}: {message}", file=sys.stderr)
    ctx = getattr(exc, "ctx", None)
    if ctx is not None:
        print(f"(see {ctx.command_path} --help)", file=sys.stderr)
    return exc.exit_code


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """Run the command line and return the process exit code."""
    try:
        parsed = _parse(argv, environ)
    except click.ClickException as exc:
        return usage_error(exc)
    except click.Abort:
        return EXIT_INTERRUPTED
    if isinstance(parsed, int):
        return parsed
    return run(parsed)


def run(invocation: Invocation) -> int:
    """Carry out a parsed command line and return the exit code."""
    args = invocation.args
    concurrency = getattr(args, "concurrency", 1)
    try:
        with Client(
            args.url,
            args.token,
            timeout=args.timeout,
            max_retries=args.max_retries,
            concurrency=concurrency,
            compress=getattr(args, "compress", False),
            ndjson=getattr(args, "ndjson", False),
        ) as client:
            return COMMANDS[invocation.command](client, args)
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
