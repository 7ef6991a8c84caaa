"""What each publish request ended with, and a run's summary of them (pure, no I/O)."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping
from collections.abc import Sequence
from dataclasses import asdict
from dataclasses import dataclass
from dataclasses import field
from typing import Any

from aggregator_client.events import event_key


@dataclass(frozen=True)
class RequestOutcome:
    """The final result of one publish request, after its retries."""

    events: list[dict[str, Any]]
    final: str
    accepted: bool
    ambiguous_attempts: int
    latency: float
    error: str | None = None
    # The Idempotency-Key sent with every attempt (None: sent without one).
    key: str | None = None
    # The batch the API said carries the events (workers log it).
    batch_id: str | None = None
    # A refusal's problems as the API named them: per field, or per position in the batch.
    errors: Any = None
    # Where the batch's first event stood among the events of the run (from 0).
    offset: int = 0

    @property
    def possible_extra_acceptances(self) -> int:
        """How many more times than answered the API may have accepted this batch."""
        if self.key is None:
            return self.ambiguous_attempts  # Each attempt that got through counts.
        # With a key the API counts the request once, however many attempts got
        # through: only a request that never got its 202 may still have been accepted.
        return 0 if self.accepted else min(1, self.ambiguous_attempts)

    @property
    def refused(self) -> bool:
        """Say whether the API refused the token (401) or its scope (403): retrying cannot help."""
        return self.final in ("401", "403")


@dataclass
class PublishSummary:
    """What a run sent and what the API answered; event counts unless named otherwise.

    `unique` and `duplicates` are counted by the client within this run (distinct
    keys, and repeats of them); what the server stored is the batches' outcome
    (ServerOutcome), which also knows the keys earlier runs stored.
    """

    planned: int
    sent: int
    unique: int
    duplicates: int
    errors: int
    failed_events: int
    ambiguous: int
    uncertain_unique: int
    requests: int
    elapsed: float
    events_per_second: float
    latency_p50_ms: float
    latency_p99_ms: float
    latency_max_ms: float
    topics: list[str]
    statuses: dict[str, int]
    first_error: str | None = None
    # Events read but never sent: the run stopped early (a refused token, Ctrl-C).
    unsent: int = 0
    # Why the run stopped before the end of its events, if it did.
    stopped_by: str | None = None
    # Each batch the API answered 202 with, and how many of this run's events it carries.
    batches: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """Return the summary as JSON-ready primitives."""
        return asdict(self)


def percentile(values: Sequence[float], pct: float) -> float:
    """Return the nearest-rank percentile of values, or 0.0 when there are none."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[rank - 1]


def summarize(
    planned: int, outcomes: Sequence[RequestOutcome], elapsed: float, topics: list[str]
) -> PublishSummary:
    """Turn per-request outcomes into the run's event counts and latencies."""
    accepted = [outcome for outcome in outcomes if outcome.accepted]
    failed = [outcome for outcome in outcomes if not outcome.accepted]
    sent = sum(len(outcome.events) for outcome in accepted)
    accepted_keys = {event_key(event) for outcome in accepted for event in outcome.events}
    # Keys seen only in failed requests that may have got through: the API may store them.
    uncertain_keys = {
        event_key(event)
        for outcome in failed
        if outcome.possible_extra_acceptances
        for event in outcome.events
    }
    latencies = [outcome.latency for outcome in outcomes]
    errors = [outcome.error for outcome in outcomes if outcome.error]
    failed_events = sum(len(outcome.events) for outcome in failed)
    batches: dict[str, int] = {}
    for outcome in accepted:
        if outcome.batch_id is not None:
            batches[outcome.batch_id] = batches.get(outcome.batch_id, 0) + len(outcome.events)
    return PublishSummary(
        planned=planned,
        sent=sent,
        unique=len(accepted_keys),
        duplicates=sent - len(accepted_keys),
        errors=len(failed),
        failed_events=failed_events,
        # Events the API may have accepted beyond what it answered 202.
        ambiguous=sum(
            len(outcome.events) * outcome.possible_extra_acceptances for outcome in outcomes
        ),
        uncertain_unique=len(uncertain_keys - accepted_keys),
        requests=len(outcomes),
        elapsed=round(elapsed, 3),
        events_per_second=round(sent / elapsed, 1) if elapsed > 0 else 0.0,
        latency_p50_ms=round(percentile(latencies, 50) * 1000, 1),
        latency_p99_ms=round(percentile(latencies, 99) * 1000, 1),
        latency_max_ms=round(max(latencies, default=0.0) * 1000, 1),
        topics=list(topics),
        statuses=dict(sorted(Counter(outcome.final for outcome in outcomes).items())),
        first_error=errors[0] if errors else None,
        unsent=planned - sent - failed_events,
        batches=batches,
    )


@dataclass(frozen=True)
class ServerOutcome:
    """What the server's ledger says became of a run's batches, summed.

    Event counts cover the stored batches only. A batch may also carry other
    requests that arrived with ours (the API's group commit): `shared` says so,
    and then the counts include their events.
    """

    batches: int
    stored_batches: int
    queued_batches: int
    unknown_batches: int
    # Batches left unread when a lookup failed (`error` says why).
    unread_batches: int
    # This run's events in the batches still queued, and their ids.
    queued_events: int
    queued_ids: list[str]
    received: int
    stored: int
    duplicates: int
    failed: int
    shared: bool
    waited: float
    # Why some batches could not be read (e.g. a token without the read scope).
    error: str | None = None

    @property
    def complete(self) -> bool:
        """Say whether every batch was found stored."""
        return self.stored_batches == self.batches

    def as_dict(self) -> dict[str, Any]:
        """Return the outcome as JSON-ready primitives."""
        return asdict(self)


def sum_batches(
    sent: Mapping[str, int],
    answers: Mapping[str, Mapping[str, Any] | None],
    *,
    waited: float = 0.0,
    error: str | None = None,
) -> ServerOutcome:
    """Sum GET /batches answers over a run's batches.

    `sent` maps each batch id to this run's events in it; `answers` holds the
    last answer for each batch looked up, None for one the server does not
    know (404). A batch without an answer is unread.
    """
    read = {batch_id: answers[batch_id] for batch_id in sent if batch_id in answers}
    stored = [answer for answer in read.values() if answer and answer["status"] == "stored"]
    queued = [
        batch_id for batch_id, answer in read.items() if answer and answer["status"] == "queued"
    ]
    return ServerOutcome(
        batches=len(sent),
        stored_batches=len(stored),
        queued_batches=len(queued),
        unknown_batches=sum(1 for answer in read.values() if answer is None),
        unread_batches=len(sent) - len(read),
        queued_events=sum(sent[batch_id] for batch_id in queued),
        queued_ids=queued,
        received=sum(int(answer["received"]) for answer in stored),
        stored=sum(int(answer["stored"]) for answer in stored),
        duplicates=sum(int(answer["duplicates"]) for answer in stored),
        failed=sum(int(answer["failed"]) for answer in stored),
        shared=any(
            answer is not None and int(answer["received"]) > sent[batch_id]
            for batch_id, answer in read.items()
        ),
        waited=round(waited, 3),
        error=error,
    )
