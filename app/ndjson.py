"""NDJSON publish bodies: one event per line, blank lines ignored, problems named by line.

Errors of a JSON array are keyed by the event's index (`"249"`); those of an
NDJSON body by its line, counted from 1 over every line, blank ones included,
as editors and `sed -n 750p` count them: `{"line 750": {"timestamp": [...]}}`.
Problems of the body as a whole keep their key (`_schema`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson
from marshmallow import ValidationError
from werkzeug.exceptions import BadRequest

from app.schemas import MAX_BATCH
from app.schemas import dotted
from app.schemas import inexact_numbers
from app.schemas import may_hold_inexact_numbers
from app.schemas import number_complaint

# Media types of a body of one JSON event per line (application/jsonl is the
# name jsonlines.org proposes; both mean the same here).
NDJSON_TYPES = frozenset({"application/x-ndjson", "application/jsonl"})


@dataclass(frozen=True)
class Lines:
    """The events of an NDJSON body as parsed, and the line each one came from."""

    events: list[Any]
    numbers: list[int]


def line_key(number: int) -> str:
    """Name a line of the body the way errors do."""
    return f"line {number}"


def split_lines(body: bytes) -> tuple[list[bytes], list[int]]:
    """Return the non-blank lines of a body and their numbers (from 1).

    Refuses (422) more than MAX_BATCH events before any line is parsed.
    """
    lines: list[bytes] = []
    numbers: list[int] = []
    for number, line in enumerate(body.split(b"\n"), start=1):
        if line.strip():
            lines.append(line)
            numbers.append(number)
    if not 1 <= len(lines) <= MAX_BATCH:
        raise ValidationError(
            {"_schema": [f"a batch holds 1 to {MAX_BATCH} events (lines), got {len(lines)}"]}
        )
    return lines, numbers


def parse_lines(body: bytes) -> Lines:
    """Parse each non-blank line as JSON; a line that is not JSON is refused (400) by number."""
    lines, numbers = split_lines(body)
    events: list[Any] = []
    for line, number in zip(lines, numbers, strict=True):
        try:
            events.append(orjson.loads(line))
        except orjson.JSONDecodeError as exc:
            raise BadRequest(
                f"malformed NDJSON: {line_key(number)} is not JSON: {exc.msg} at column {exc.colno}"
            ) from None
    return Lines(events, numbers)


def by_line(messages: Any, numbers: list[int]) -> Any:
    """Key a batch's errors by line instead of by index (`_schema` and the like stay)."""
    if not isinstance(messages, dict):
        return messages
    return {
        line_key(numbers[key]) if isinstance(key, int) else key: value
        for key, value in messages.items()
    }


def refuse_inexact_numbers_by_line(body: bytes, numbers: list[int]) -> None:
    """Refuse (422) numbers that would be stored changed, naming each by line and path."""
    if not may_hold_inexact_numbers(body):
        return
    lines = body.split(b"\n")
    errors: dict[str, dict[str, list[str]]] = {}
    for number in numbers:
        try:
            problems = inexact_numbers(lines[number - 1])
        except ValueError as exc:  # JSON to orjson, not to the standard library: never seen.
            raise BadRequest(f"malformed NDJSON: {line_key(number)}: {exc}") from None
        for path, text in problems:
            errors.setdefault(line_key(number), {})[dotted(path)] = [number_complaint(text)]
    if errors:
        raise ValidationError(errors)
