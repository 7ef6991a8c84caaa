"""What the `aggregator` command prints: summaries, outcomes, events, batches and refusals.

Pure functions of what the client returned; the command writes their text out.
A refusal (422) is named by where its event came from, a file's line, rather
than by its position in the batch the API saw.
"""

from __future__ import annotations

from collections.abc import Mapping
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from aggregator_client.events import LineNumbers
from aggregator_client.outcomes import PublishSummary
from aggregator_client.outcomes import RequestOutcome
from aggregator_client.outcomes import ServerOutcome
from aggregator_client.verify import VerifyResult

# Refusals listed in a text summary; --json lists up to MAX_REFUSALS.
SHOWN_REFUSALS = 5
MAX_REFUSALS = 100


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


def batch_ids(ids: list[str], shown: int = 2) -> str:
    """Name a run's batches for `aggregator batch ID`: all of a few, else the first ones."""
    if len(ids) <= shown:
        return " ".join(ids)
    return " ".join(ids[:shown]) + f" ... ({len(ids) - shown} more: --json lists every one)"


def format_summary(
    summary: PublishSummary,
    outcome: ServerOutcome | None = None,
    refused: Sequence[Refusal] = (),
    refused_total: int = 0,
) -> str:
    """Render the publish summary as a small text table, with the server's outcome if given.

    Refused events (422) are named by their place in the input; the first error
    is then not repeated with the API's positions in the batch.
    """
    accepted = f"{summary.sent} events answered 202"
    if summary.batches:
        accepted += f", in {_batches(len(summary.batches))}: {batch_ids(list(summary.batches))}"
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
        *format_refusals(list(refused), max(refused_total, len(refused))),
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
    if summary.first_error and not (refused and summary.first_error.startswith("HTTP 422")):
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


def format_batch(answer: dict[str, Any]) -> str:
    """Render one batch's answer as a line: id, status, counts."""
    line = f"{answer['batch_id']}  {answer['status']:<7} received {answer['received']}"
    if answer["status"] == "stored":
        line += (
            f": stored {answer['stored']}, duplicates {answer['duplicates']},"
            f" failed {answer['failed']} (at {answer['processed_at']})"
        )
    return line


@dataclass(frozen=True)
class InputPlaces:
    """Names where the events of a run came from: a file's or stdin's lines, or their order."""

    name: str | None = None
    lines: LineNumbers | None = None

    def where(self, position: int) -> str:
        """Name the event at `position` of the run (from 0): `events.ndjson line 750`."""
        if self.lines is None:
            return f"event {position + 1}"
        return f"{self.name or 'input'} line {self.lines.line(position)}"

    def line(self, position: int) -> int | None:
        """Return the event's line, when the events came from lines."""
        return None if self.lines is None else self.lines.line(position)


@dataclass(frozen=True)
class Refusal:
    """Events of a request the API refused (422), named by where they came from."""

    where: str
    line: int | None
    errors: Any

    @property
    def problems(self) -> str:
        """Return the API's messages as one line: `timestamp: Not a valid datetime.`."""
        return "; ".join(_flatten(self.errors)) or "refused"

    def as_dict(self) -> dict[str, Any]:
        """Return the refusal as JSON-ready primitives."""
        return {"where": self.where, "line": self.line, "errors": self.errors}


def _flatten(errors: Any, prefix: str = "") -> list[str]:
    if isinstance(errors, Mapping):
        found: list[str] = []
        for key, value in errors.items():
            name = "" if key == "_schema" else f"{prefix}{key}"
            found.extend(_flatten(value, f"{name}." if name else prefix))
        return found
    if isinstance(errors, list) and all(isinstance(item, str) for item in errors):
        label = prefix.rstrip(".")
        return [f"{label}: {'; '.join(errors)}" if label else "; ".join(errors)]
    label = prefix.rstrip(".")
    text = orjson.dumps(errors).decode() if not isinstance(errors, str) else errors
    return [f"{label}: {text}" if label else text]


def _event_index(key: Any) -> int | None:
    """The batch position an error key names: "249" (JSON array) or "line 250" (NDJSON)."""
    if not isinstance(key, str):
        return None
    if key.isdigit():
        return int(key)
    number = key.removeprefix("line ")
    if number != key and number.isdigit() and int(number) >= 1:
        return int(number) - 1
    return None


def refusals_of(outcome: RequestOutcome, places: InputPlaces) -> list[Refusal]:
    """Name each event a 422 refused by its place in the input instead of in the batch.

    The API keys a batch's problems by the event's position in the array
    (`"249"`), by its line in an NDJSON body (`"line 250"`, from 1; the client
    writes no blank lines, so line N is event N - 1), or by field when the batch
    was a single object; problems of the whole batch (`_schema`) are named by the
    range of its events.
    """
    if outcome.final != "422" or not isinstance(outcome.errors, Mapping):
        return []
    count = len(outcome.events)
    per_event: dict[int, Any] = {}
    keys: set[str] = set()
    for key, value in outcome.errors.items():
        index = _event_index(key)
        # An event's problems are per field; a list under a digit is a field named so.
        if index is not None and index < count and isinstance(value, Mapping):
            per_event[index] = value
            keys.add(key)
    rest = {key: value for key, value in outcome.errors.items() if key not in keys}
    found = [
        Refusal(places.where(outcome.offset + index), places.line(outcome.offset + index), value)
        for index, value in sorted(per_event.items())
    ]
    if rest:
        first, last = outcome.offset, outcome.offset + count - 1
        where = places.where(first)
        if count > 1:
            end = places.line(last) if places.lines is not None else last + 1
            where = f"{where} to {end}"
        found.append(Refusal(where, places.line(first), rest))
    return found


def format_refusals(refusals: list[Refusal], total: int) -> list[tuple[str, str]]:
    """Render the first refusals as rows of the summary, and how many more there were."""
    rows = [
        ("refused" if n == 0 else "", f"{refusal.where}: {refusal.problems}")
        for n, refusal in enumerate(refusals[:SHOWN_REFUSALS])
    ]
    if total > len(rows):
        rows.append(("", f"... and {total - len(rows)} more (--json lists up to {MAX_REFUSALS})"))
    return rows
