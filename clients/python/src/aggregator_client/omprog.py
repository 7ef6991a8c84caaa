"""rsyslog's omprog protocol: a batch rsyslog hands over is confirmed once the aggregator took it.

rsyslog (deploy/shippers/rsyslog/) starts this program and writes one event per
line, JSON in the aggregator's shape (its template). With `confirmMessages` and
`useTransactions` on, it wraps each batch in BEGIN/COMMIT TRANSACTION marks:
this program answers OK to BEGIN, DEFER_COMMIT to each line, and publishes the
batch at COMMIT, answering OK once it was answered 202. Any other answer makes
rsyslog keep the batch in its queue and send it again later (after
`action.resumeInterval`), so an outage of the aggregator loses nothing that
rsyslog still holds.

Each publish carries an Idempotency-Key made from its lines: a batch sent again
after an answer that got lost is counted once, as long as rsyslog sends the same
lines together again (otherwise its events are still stored once, and those sent
again are counted as duplicates). An event without an `event_id` gets the
documented content-hash id (aggregator_client.event_ids).

A line that can never be accepted (not JSON, or refused by the API's
validation) is written to stderr and confirmed, so it cannot block rsyslog's
queue forever: a refused batch is split in halves until the refused lines are
found.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
from collections.abc import Callable
from collections.abc import Iterator
from dataclasses import dataclass
from dataclasses import field
from typing import IO
from typing import Any

import orjson

from aggregator_client.client import MAX_BATCH
from aggregator_client.client import Client
from aggregator_client.event_ids import derive_event_id
from aggregator_client.outcomes import RequestOutcome

BEGIN = "BEGIN TRANSACTION"
COMMIT = "COMMIT TRANSACTION"
# Answers rsyslog understands; anything else is a failure it retries.
CONFIRM = "OK"
DEFER = "DEFER_COMMIT"
# Encoded events per request stay under the API's default body limit (MAX_BODY_BYTES, 2 MiB).
MAX_REQUEST_BYTES = 1_900_000
# Answers that say the request itself can never be accepted (anything else is retried later).
PERMANENT = frozenset({"400", "413", "415", "422"})

Publish = Callable[[list[dict[str, Any]], str], RequestOutcome]


@dataclass
class Line:
    """One line rsyslog sent, and the event it holds."""

    text: str
    event: dict[str, Any]
    size: int


@dataclass
class Bridge:
    """Answers rsyslog line by line; publishes a transaction's lines when it commits."""

    publish: Publish
    rejected: IO[str]
    topic: str | None = None
    pending: list[Line] = field(default_factory=list)
    in_transaction: bool = False
    refused_lines: int = 0

    def answer(self, text: str) -> str:
        """Return what to tell rsyslog about one line it sent."""
        if text == BEGIN:
            self.pending, self.in_transaction = [], True
            return CONFIRM
        if text == COMMIT:
            self.in_transaction = False
            return self.commit()
        line = self.parse(text)
        if line is not None:
            self.pending.append(line)
        # Outside a transaction (useTransactions off) each line is its own batch.
        return DEFER if self.in_transaction else self.commit()

    def parse(self, text: str) -> Line | None:
        """Read one event; a line that is not an event is refused here, for good."""
        try:
            event = orjson.loads(text)
        except orjson.JSONDecodeError as exc:
            self.refuse(text, f"not JSON: {exc}")
            return None
        if not isinstance(event, dict):
            self.refuse(text, "not a JSON object")
            return None
        if self.topic and "topic" not in event:
            event["topic"] = self.topic
        if "event_id" not in event:
            event["event_id"] = derive_event_id(event)
        return Line(text, event, len(orjson.dumps(event)) + 1)

    def commit(self) -> str:
        """Publish what is pending; OK once all of it was accepted or refused for good."""
        lines, self.pending = self.pending, []
        for chunk in chunks(lines):
            problem = self.send(chunk)
            if problem is not None:
                # rsyslog sends the whole transaction again: chunks already accepted
                # are replays then (same lines, same key), counted once.
                return f"ERROR {problem}"
        return CONFIRM

    def send(self, chunk: list[Line]) -> str | None:
        """Publish a chunk; None when done, else why it must be tried again later."""
        outcome = self.publish([line.event for line in chunk], key_of(chunk))
        if outcome.accepted:
            return None
        if outcome.final not in PERMANENT:
            return outcome.error or outcome.final
        if len(chunk) == 1:
            self.refuse(chunk[0].text, outcome.error or outcome.final)
            return None
        middle = len(chunk) // 2
        return self.send(chunk[:middle]) or self.send(chunk[middle:])

    def refuse(self, text: str, reason: str) -> None:
        self.refused_lines += 1
        print(f"refused for good ({reason}): {text}", file=self.rejected, flush=True)


def chunks(lines: list[Line]) -> Iterator[list[Line]]:
    """Cut a transaction into requests the API takes: MAX_BATCH events, MAX_REQUEST_BYTES."""
    chunk: list[Line] = []
    size = 0
    for line in lines:
        if chunk and (len(chunk) == MAX_BATCH or size + line.size > MAX_REQUEST_BYTES):
            yield chunk
            chunk, size = [], 0
        chunk.append(line)
        size += line.size
    if chunk:
        yield chunk


def key_of(chunk: list[Line]) -> str:
    """The Idempotency-Key of a chunk: the same lines give the same key, on any retry."""
    digest = hashlib.sha256()
    for line in chunk:
        digest.update(line.text.encode())
        digest.update(b"\n")
    return "rsyslog-" + digest.hexdigest()[:40]


def serve(bridge: Bridge, source: IO[str], answers: IO[str]) -> None:
    """Tell rsyslog it may start, then answer each line until it closes our stdin."""
    print(CONFIRM, file=answers, flush=True)
    for raw in source:
        text = raw.rstrip("\r\n")
        if text:
            print(bridge.answer(text), file=answers, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m aggregator_client.omprog",
        description="rsyslog omprog program: publish what rsyslog sends, confirming it"
        " only once the aggregator accepted it (deploy/shippers/rsyslog/).",
    )
    parser.add_argument("--url", default=os.environ.get("AGGREGATOR_URL", "http://127.0.0.1:8080"))
    parser.add_argument(
        "--token-file", help="file holding the bearer token (default: env API_TOKEN)"
    )
    parser.add_argument("--topic", help="topic of events whose line names none")
    parser.add_argument(
        "--retries", type=int, default=3, help="retries per request before rsyslog's own"
    )
    args = parser.parse_args(argv)
    token = os.environ.get("API_TOKEN")
    if args.token_file:
        with open(args.token_file, encoding="utf-8") as handle:
            token = handle.read().strip()
    with Client(args.url, token, max_retries=args.retries) as client:

        def publish(events: list[dict[str, Any]], key: str) -> RequestOutcome:
            return client.publish_batch(events, idempotency_key=key)

        serve(Bridge(publish, sys.stderr, args.topic), sys.stdin, sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
