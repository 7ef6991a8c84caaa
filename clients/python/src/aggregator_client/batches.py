"""A run's real outcome: GET /batches for each batch it sent, until stored or a deadline."""

from __future__ import annotations

import time
from collections.abc import Mapping
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from aggregator_client.client import ApiError
from aggregator_client.client import Client
from aggregator_client.client import ClientError
from aggregator_client.outcomes import ServerOutcome
from aggregator_client.outcomes import sum_batches

# The first pause between looks; it doubles up to POLL_MAX.
POLL_FIRST = 0.05
POLL_MAX = 1.0

Answer = Mapping[str, Any] | None


@dataclass
class Lookup:
    """The last answer for each batch looked up (None: the server does not know it)."""

    answers: dict[str, Answer]
    waited: float
    # What ended the lookup early: an answer other than 200 or 404, or no answer.
    error: ClientError | None = None


def wait_for_batches(client: Client, batch_ids: Sequence[str], wait: float = 0.0) -> Lookup:
    """Look up each batch, then again those still queued, until none is or `wait` s passed.

    With `wait` 0, each batch is looked up once. The first error (a token
    without the read scope, an API away) ends the lookup; batches it left
    unread have no answer.
    """
    client = client.with_retries(2)
    answers: dict[str, Answer] = {}
    started = time.monotonic()
    pause = POLL_FIRST
    with ThreadPoolExecutor(client.concurrency, thread_name_prefix="batches") as pool:
        while True:
            waiting = [
                batch_id
                for batch_id in batch_ids
                if batch_id not in answers or _queued(answers[batch_id])
            ]
            try:
                looked = pool.map(lambda batch_id: _look(client, batch_id), waiting)
                for batch_id, answer in zip(waiting, looked, strict=True):
                    answers[batch_id] = answer
            except ClientError as exc:
                return Lookup(answers, time.monotonic() - started, exc)
            left = wait - (time.monotonic() - started)
            if left <= 0 or not any(_queued(answers[batch_id]) for batch_id in batch_ids):
                return Lookup(answers, time.monotonic() - started)
            time.sleep(min(pause, left))
            pause = min(pause * 2, POLL_MAX)


def batch_outcome(client: Client, batches: Mapping[str, int], wait: float = 0.0) -> ServerOutcome:
    """Sum what the server's ledger says of a run's batches (id -> this run's events in it)."""
    lookup = wait_for_batches(client, list(batches), wait)
    error = None if lookup.error is None else str(lookup.error)
    return sum_batches(batches, lookup.answers, waited=lookup.waited, error=error)


def _queued(answer: Answer) -> bool:
    return answer is not None and answer["status"] == "queued"


def _look(client: Client, batch_id: str) -> dict[str, Any] | None:
    try:
        return client.batch(batch_id)
    except ApiError as exc:
        if exc.status == 404:
            return None
        raise
