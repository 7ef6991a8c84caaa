"""Events to publish: read from NDJSON or generated with exact duplicates; batching."""

from __future__ import annotations

import bisect
import itertools
import queue
import random
import secrets
import threading
import time
import uuid
from collections.abc import Iterable
from collections.abc import Iterator
from datetime import UTC
from datetime import datetime
from typing import IO
from typing import Any

import orjson

from aggregator_client.event_ids import line_event_id


class InputError(ValueError):
    """A line of the input is not a JSON object; names the line."""

    def __init__(self, line: int, reason: str) -> None:
        super().__init__(f"line {line}: {reason}")
        self.line = line


class LineNumbers:
    """The line of the input each event came from, by its position among the events.

    Only the blank lines (which hold no event) are recorded, so a file of
    millions of lines costs nothing unless it is full of gaps: an event's line
    is its position plus one plus the blank lines before it. Safe to read from
    other threads while the input is being read (an event is looked up only
    after it was read).
    """

    def __init__(self) -> None:
        # (position of the next event, blank lines before it), positions increasing.
        self._gaps: list[tuple[int, int]] = []
        self._lock = threading.Lock()

    def blank_before(self, position: int) -> None:
        """Record a blank line read before the event at `position`."""
        with self._lock:
            if self._gaps and self._gaps[-1][0] == position:
                self._gaps[-1] = (position, self._gaps[-1][1] + 1)
            else:
                self._gaps.append((position, (self._gaps[-1][1] if self._gaps else 0) + 1))

    def line(self, position: int) -> int:
        """Return the line number (from 1) of the event at `position` (from 0)."""
        with self._lock:
            index = bisect.bisect_right(self._gaps, position, key=lambda gap: gap[0])
            blank = self._gaps[index - 1][1] if index else 0
        return position + 1 + blank


def read_ndjson(stream: IO[bytes], lines: LineNumbers | None = None) -> Iterator[dict[str, Any]]:
    """Yield one event per non-blank line of `stream`, as it is read.

    The API validates each event's fields; this only makes sure each line is a
    JSON object, so a broken line is reported with its number before anything
    after it is sent. `lines`, if given, learns where each event came from.
    """
    position = 0
    for number, line in enumerate(stream, start=1):
        if not line.strip():
            if lines is not None:
                lines.blank_before(position)
            continue
        try:
            event = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            raise InputError(number, f"not JSON ({exc})") from None
        if not isinstance(event, dict):
            raise InputError(number, f"expected a JSON object, got {type(event).__name__}")
        position += 1
        yield event


def read_lines(
    stream: IO[bytes],
    *,
    topic: str,
    source: str,
    origin: str,
    lines: LineNumbers | None = None,
    now: datetime | None = None,
) -> Iterator[dict[str, Any]]:
    """Yield one event per non-blank raw line of `stream` (a log file as it is), as it is read.

    The line, without its line break, is the payload's `message`, beside `origin`
    and `line`; the id is `line_event_id` of where it is and what it says, so
    publishing the same file again stores nothing new. `timestamp` is when it was
    read (`now`, for tests), since raw lines carry their time in formats of their own.
    A line that is not UTF-8 is refused by number rather than changed.
    """
    position = 0
    for number, raw in enumerate(stream, start=1):
        if not raw.strip():
            if lines is not None:
                lines.blank_before(position)
            continue
        try:
            message = raw.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError as exc:
            raise InputError(number, f"not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        stamp = (now or datetime.now(UTC)).isoformat()
        position += 1
        yield {
            "topic": topic,
            "event_id": line_event_id(topic, source, origin, number, message),
            "timestamp": stamp,
            "source": source,
            "payload": {"message": message, "origin": origin, "line": number},
        }


def run_prefix() -> str:
    """Return a topic prefix no other generated run shares."""
    return f"run-{secrets.token_hex(4)}"


def run_topics(prefix: str, count: int) -> list[str]:
    """Return the topics of a generated run: `count` names under `prefix`."""
    return [f"{prefix}-{k}" for k in range(count)]


def duplicate_count(count: int, duplicate_ratio: float) -> int:
    """Return how many of `count` events are copies for this ratio."""
    return round(count * duplicate_ratio)


def plan_events(
    count: int,
    duplicate_ratio: float,
    topics: list[str],
    source: str,
    seed: int | None = None,
    *,
    run_id: str | None = None,
) -> list[dict[str, Any]]:
    """Return `count` shuffled events of which exactly `round(count * ratio)` are copies."""
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    if not 0.0 <= duplicate_ratio < 1.0:
        raise ValueError(f"duplicate ratio must be in [0, 1), got {duplicate_ratio}")
    if not topics:
        raise ValueError("at least one topic is needed")
    copies = duplicate_count(count, duplicate_ratio)
    unique = count - copies
    if count > 0 and unique == 0:
        raise ValueError(f"{count} events at ratio {duplicate_ratio} leave nothing to copy")
    rng = random.Random(seed)
    # The run id is random even with a seed, so that two seeded runs never share keys.
    run = run_id or uuid.uuid4().hex[:12]
    originals = [
        {
            "topic": topics[i % len(topics)],
            "event_id": f"{run}-{i:07d}",
            "timestamp": datetime.now(UTC).isoformat(timespec="microseconds"),
            "source": source,
            "payload": {"seq": i, "message": f"event {i} of run {run}"},
        }
        for i in range(unique)
    ]
    duplicates = [_copy(rng.choice(originals)) for _ in range(copies)]
    events = originals + duplicates
    # A full shuffle spreads the copies over all batches instead of the last ones.
    rng.shuffle(events)
    return events


def _copy(event: dict[str, Any]) -> dict[str, Any]:
    return {**event, "payload": dict(event["payload"])}


def batched(events: list[dict[str, Any]], size: int) -> list[list[dict[str, Any]]]:
    """Split events into consecutive batches of at most `size`."""
    if size < 1:
        raise ValueError(f"batch size must be >= 1, got {size}")
    return [events[start : start + size] for start in range(0, len(events), size)]


def iter_batches(events: Iterable[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    """Yield consecutive batches of at most `size`, reading `events` only as far as needed."""
    if size < 1:
        raise ValueError(f"batch size must be >= 1, got {size}")
    iterator = iter(events)
    while batch := list(itertools.islice(iterator, size)):
        yield batch


def iter_lingering_batches(
    events: Iterable[dict[str, Any]], size: int, linger: float
) -> Iterator[list[dict[str, Any]]]:
    """Yield batches of at most `size`, or fewer once the first has waited `linger` seconds.

    For a live pipe: events that trickle in are sent within `linger` of arriving
    instead of waiting for a full batch. A reader thread consumes `events`; an
    error it meets is raised here, after the events before it were yielded.
    """
    if size < 1 or linger <= 0:
        raise ValueError(f"batch size must be >= 1 and linger > 0, got {size} and {linger}")
    end = object()
    # Bounded, so a fast producer waits for the requests instead of filling memory.
    buffered: queue.Queue[Any] = queue.Queue(maxsize=size * 4)

    def read() -> None:
        try:
            for event in events:
                buffered.put(event)
        except Exception as exc:  # Handed over to the consumer, in order.
            buffered.put(exc)
        buffered.put(end)

    threading.Thread(target=read, name="read-events", daemon=True).start()
    while True:
        item = buffered.get()
        batch: list[dict[str, Any]] = []
        deadline = time.monotonic() + linger
        while item is not end and not isinstance(item, Exception):
            batch.append(item)
            remaining = deadline - time.monotonic()
            if len(batch) >= size or remaining <= 0:
                break
            try:
                item = buffered.get(timeout=remaining)
            except queue.Empty:
                break
        else:
            if batch:
                yield batch
            if isinstance(item, Exception):
                raise item
            return
        yield batch


def event_key(event: dict[str, Any]) -> tuple[str, str]:
    """Return the dedup key the aggregator uses: (topic, event_id)."""
    return event["topic"], event["event_id"]
