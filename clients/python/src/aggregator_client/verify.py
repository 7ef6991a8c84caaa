"""Verification: poll /stats and /stats/topics until a run's topics settle, then check counts."""

from __future__ import annotations

import os
import time
from dataclasses import asdict
from dataclasses import dataclass
from dataclasses import replace
from typing import Any

from aggregator_client.client import ApiError
from aggregator_client.client import Client
from aggregator_client.client import Unreachable
from aggregator_client.outcomes import PublishSummary


@dataclass(frozen=True)
class TopicTotals:
    """Counters summed over a run's topics, plus the API-wide queue length."""

    stored: int
    duplicates: int
    failed: int
    queued: int

    @property
    def processed(self) -> int:
        """Return how many of the run's events the workers have finished with."""
        return self.stored + self.duplicates + self.failed


@dataclass
class VerifyResult:
    """Whether /stats matches what the publisher knows it sent, with both sets of figures."""

    ok: bool
    settled: bool
    expected_stored_min: int
    expected_stored_max: int
    expected_duplicates_min: int
    expected_duplicates_max: int
    observed_stored: int
    observed_duplicates: int
    observed_failed: int
    observed_queued: int
    waited: float
    message: str

    def as_dict(self) -> dict[str, Any]:
        """Return the result as JSON-ready primitives."""
        return asdict(self)


def sum_topics(stats: dict[str, Any], topics: list[str]) -> TopicTotals:
    """Sum the /stats counters of the given topics (absent topics count as zero)."""
    per_topic = stats.get("topics") or {}
    rows = [per_topic.get(topic, {}) for topic in topics]
    return TopicTotals(
        stored=sum(row.get("stored", 0) for row in rows),
        duplicates=sum(row.get("duplicates", 0) for row in rows),
        failed=sum(row.get("failed", 0) for row in rows),
        queued=int(stats.get("queued_events", 0)),
    )


def fetch_topic_counters(client: Client, topics: list[str]) -> dict[str, dict[str, int]]:
    """Walk GET /stats/topics for the topics' common prefix; return topic -> counters."""
    wanted = set(topics)
    return {
        row.pop("topic"): row
        for row in client.topic_stats(os.path.commonprefix(topics) or None)
        if row["topic"] in wanted
    }


def compare(
    summary: PublishSummary, totals: TopicTotals, settled: bool, waited: float
) -> VerifyResult:
    """Check observed counters against the bounds the summary allows."""
    stored_min = summary.unique
    stored_max = summary.unique + summary.uncertain_unique
    duplicates_min = summary.duplicates
    duplicates_max = summary.duplicates + summary.ambiguous
    problems = []
    if not settled:
        problems.append("counters did not settle before the timeout")
    if not stored_min <= totals.stored <= stored_max:
        problems.append(f"stored {totals.stored}, expected {_bounds(stored_min, stored_max)}")
    if not duplicates_min <= totals.duplicates <= duplicates_max:
        problems.append(
            f"duplicates {totals.duplicates}, expected {_bounds(duplicates_min, duplicates_max)}"
        )
    if totals.failed:
        problems.append(f"failed {totals.failed}, expected 0")
    ok = not problems
    message = (
        f"stored {totals.stored}, duplicates {totals.duplicates}, failed 0"
        if ok
        else "; ".join(problems)
    )
    return VerifyResult(
        ok=ok,
        settled=settled,
        expected_stored_min=stored_min,
        expected_stored_max=stored_max,
        expected_duplicates_min=duplicates_min,
        expected_duplicates_max=duplicates_max,
        observed_stored=totals.stored,
        observed_duplicates=totals.duplicates,
        observed_failed=totals.failed,
        observed_queued=totals.queued,
        waited=round(waited, 3),
        message=message,
    )


def _bounds(low: int, high: int) -> str:
    return str(low) if low == high else f"{low}..{high}"


def wait_and_verify(
    client: Client, summary: PublishSummary, timeout: float = 120.0, poll: float = 0.5
) -> VerifyResult:
    """Poll /stats until the run's topics settle (or timeout), then compare exact counts."""
    # A few quick retries per poll: the loop itself keeps trying until the deadline.
    client = client.with_retries(3)
    started = time.monotonic()
    deadline = started + timeout
    previous: TopicTotals | None = None
    latest = TopicTotals(0, 0, 0, 0)
    settled = False
    problem: str | None = None
    while True:
        try:
            figures = client.stats()
            figures["topics"] = fetch_topic_counters(client, summary.topics)
            latest = sum_topics(figures, summary.topics)
        except ApiError as exc:
            if exc.status < 500 and exc.status != 429:
                result = compare(summary, latest, False, time.monotonic() - started)
                return replace(result, ok=False, message=f"/stats refused the request: {exc}")
            problem = str(exc)  # A broker or database blip: the next poll tries again.
        except Unreachable as exc:
            problem = str(exc)
        else:
            # Settled: all our events are counted, nothing is queued, and the
            # figures held still between two polls (late ambiguous copies land too).
            settled = latest.processed >= summary.sent and latest.queued == 0 and latest == previous
            previous = latest
        if settled or time.monotonic() >= deadline:
            break
        time.sleep(poll)
    result = compare(summary, latest, settled, time.monotonic() - started)
    if not settled and problem:
        return replace(result, message=f"{result.message} (last /stats error: {problem})")
    return result
