"""Publishing over HTTP: concurrent batches with urllib3 retries, and a summary of the outcome."""

from __future__ import annotations

import math
import secrets
import sys
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import as_completed
from dataclasses import asdict
from dataclasses import dataclass
from dataclasses import field
from typing import Any
from typing import Self

import orjson
import urllib3
from tqdm import tqdm
from urllib3.exceptions import ConnectTimeoutError
from urllib3.exceptions import HTTPError
from urllib3.exceptions import MaxRetryError
from urllib3.exceptions import ProxyError
from urllib3.util import parse_url
from urllib3.util.retry import RequestHistory
from urllib3.util.retry import Retry

from publisher.events import batched
from publisher.events import event_key
from publisher.events import plan_events

MAX_BATCH = 1000
RETRY_STATUSES = frozenset({429, 502, 503, 504})
# Our API answers 429 and 503 before it enqueues anything. A gateway's 502 or 504
# says nothing of the sort: the API behind it may have accepted the batch.
GATEWAY_STATUSES = frozenset({502, 504})


def _default_prefix() -> str:
    return f"run-{secrets.token_hex(4)}"


@dataclass
class PublishConfig:
    """What to publish, where to, and how hard to push."""

    url: str
    count: int = 20000
    duplicate_ratio: float = 0.1
    batch_size: int = 500
    concurrency: int = 8
    topics: int = 4
    topic_prefix: str = field(default_factory=_default_prefix)
    source: str = "publisher"
    max_retries: int = 8
    timeout: float = 10.0
    token: str | None = None
    progress: bool = True
    seed: int | None = None

    def __post_init__(self) -> None:
        if parse_url(self.url).scheme not in ("http", "https"):
            raise ValueError(f"url must start with http:// or https://, got {self.url!r}")
        if self.count < 0:
            raise ValueError(f"count must be >= 0, got {self.count}")
        if not 0.0 <= self.duplicate_ratio < 1.0:
            raise ValueError(f"duplicate ratio must be in [0, 1), got {self.duplicate_ratio}")
        if not 1 <= self.batch_size <= MAX_BATCH:
            raise ValueError(f"batch size must be in [1, {MAX_BATCH}], got {self.batch_size}")
        if self.concurrency < 1 or self.topics < 1:
            raise ValueError("concurrency and topics must be >= 1")
        if self.max_retries < 0 or self.timeout <= 0:
            raise ValueError("max retries must be >= 0 and timeout > 0")
        if not self.topic_prefix:
            raise ValueError("topic prefix must not be empty")

    def topic_names(self) -> list[str]:
        """Return this run's topics, which no other run shares."""
        return [f"{self.topic_prefix}-{k}" for k in range(self.topics)]


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

    def as_dict(self) -> dict[str, Any]:
        """Return the summary as JSON-ready primitives."""
        return asdict(self)


class RecordedRetry(Retry):
    """A Retry whose attempt history survives MaxRetryError, which urllib3 raises without it."""

    # Retry-After on a 413 must not turn a body that is too large into a retry.
    RETRY_AFTER_STATUS_CODES = frozenset({429, 503})

    def __init__(self, *args: Any, log: list[RequestHistory] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.log: list[RequestHistory] = [] if log is None else log

    def new(self, **kw: Any) -> Self:
        """Return the next Retry, sharing this one's log and recording its history in it."""
        retry = super().new(**kw)
        retry.log = self.log
        self.log[:] = retry.history
        return retry


def make_retry(max_retries: int) -> RecordedRetry:
    """Build the retry policy for one request: backoff with jitter, honouring Retry-After."""
    return RecordedRetry(
        total=max_retries,
        allowed_methods=frozenset({"GET", "POST"}),
        status_forcelist=RETRY_STATUSES,
        backoff_factor=0.2,
        backoff_jitter=0.2,
        backoff_max=10.0,
        respect_retry_after_header=True,
        raise_on_status=False,
    )


def is_ambiguous(attempt: RequestHistory) -> bool:
    """Say whether a failed attempt may still have been accepted by the API."""
    if attempt.error is not None:
        error = attempt.error
        if isinstance(error, ProxyError):
            error = error.original_error
        # Only a failed connect proves the request never left this process.
        return not isinstance(error, ConnectTimeoutError)
    return attempt.status in GATEWAY_STATUSES


def _error_message(data: bytes) -> str:
    try:
        body = orjson.loads(data)
    except orjson.JSONDecodeError:
        return data[:200].decode(errors="replace")
    if isinstance(body, dict) and "message" in body:
        return str(body["message"])[:300]
    return str(body)[:300]


def encode_body(batch: list[dict[str, Any]], as_object: bool) -> bytes:
    """Encode a batch as a JSON array, or its only event as a bare object."""
    if as_object:
        if len(batch) != 1:
            raise ValueError(f"only a batch of one can be sent as an object, got {len(batch)}")
        return orjson.dumps(batch[0])
    return orjson.dumps(batch)


def send_batch(
    pool: urllib3.PoolManager,
    url: str,
    batch: list[dict[str, Any]],
    *,
    headers: dict[str, str],
    as_object: bool,
    max_retries: int,
    timeout: float,
    idempotency_key: str | None = None,
) -> RequestOutcome:
    """POST one batch with its own Idempotency-Key, sent again on every retry; report the end."""
    body = encode_body(batch, as_object)
    retry = make_retry(max_retries)
    key = idempotency_key or uuid.uuid4().hex
    started = time.perf_counter()
    try:
        response = pool.request(
            "POST",
            url,
            body=body,
            headers={**headers, "Idempotency-Key": key},
            retries=retry,
            timeout=timeout,
        )
    except HTTPError as exc:
        reason = exc.reason if isinstance(exc, MaxRetryError) and exc.reason else exc
        final, accepted, error = type(reason).__name__, False, f"{type(reason).__name__}: {reason}"
    else:
        final, accepted = str(response.status), response.status == 202
        error = None if accepted else f"HTTP {response.status}: {_error_message(response.data)}"
    latency = time.perf_counter() - started
    ambiguous = sum(1 for attempt in retry.log if is_ambiguous(attempt))
    batch_id = _batch_id(response.data) if accepted else None
    return RequestOutcome(batch, final, accepted, ambiguous, latency, error, key, batch_id)


def _batch_id(data: bytes) -> str | None:
    try:
        body = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    return body.get("batch_id") if isinstance(body, dict) else None


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
    return PublishSummary(
        planned=planned,
        sent=sent,
        unique=len(accepted_keys),
        duplicates=sent - len(accepted_keys),
        errors=len(failed),
        failed_events=sum(len(outcome.events) for outcome in failed),
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
    )


def auth_headers(token: str | None) -> dict[str, str]:
    """Return the Authorization header for a bearer token, or nothing."""
    return {"Authorization": f"Bearer {token}"} if token else {}


def publish(config: PublishConfig) -> PublishSummary:
    """Publish the planned events in concurrent batches and summarise the outcome."""
    topics = config.topic_names()
    events = plan_events(config.count, config.duplicate_ratio, topics, config.source, config.seed)
    url = config.url.rstrip("/") + "/publish"
    headers = {"Content-Type": "application/json", **auth_headers(config.token)}
    pool = urllib3.PoolManager(maxsize=config.concurrency)
    executor = ThreadPoolExecutor(config.concurrency, thread_name_prefix="publish")
    outcomes: list[RequestOutcome] = []
    started = time.perf_counter()
    try:
        futures = [
            executor.submit(
                send_batch,
                pool,
                url,
                batch,
                headers=headers,
                as_object=config.batch_size == 1,
                max_retries=config.max_retries,
                timeout=config.timeout,
            )
            for batch in batched(events, config.batch_size)
        ]
        with tqdm(
            total=len(events), unit="ev", file=sys.stderr, disable=not config.progress
        ) as bar:
            for future in as_completed(futures):
                outcome = future.result()
                outcomes.append(outcome)
                bar.update(len(outcome.events))
    finally:
        # On Ctrl-C, drop the batches not yet started instead of sending them first.
        executor.shutdown(wait=True, cancel_futures=True)
        pool.clear()
    return summarize(len(events), outcomes, time.perf_counter() - started, topics)
