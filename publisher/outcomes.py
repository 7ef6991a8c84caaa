"""What each publish request ended with, and a run's summary of them (pure, no I/O)."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict
from dataclasses import dataclass
from typing import Any

from publisher.events import event_key


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
    """What a run sent and what the API answered; event counts unless named otherwise."""

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
    )
