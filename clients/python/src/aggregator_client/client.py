"""The aggregator's HTTP client: publish with retries and exact accounting, read events and stats.

    with Client("http://127.0.0.1:8080", token) as client:
        client.health()                             # Unreachable within 2 s if nobody answers
        summary = client.publish(events)            # batches, Idempotency-Keys, Retry-After
        for event in client.events(topic="orders"): # every stored event, oldest first
            ...
        for page in client.follow(topic="orders"):  # and then whatever arrives next
            ...
        for event in client.export(topic="orders"): # one streamed read, a cursor per event
            ...
        client.batch(batch_id)                      # what became of a batch: queued or stored

    Client(url, token, compress=True, ndjson=True) sends each batch as NDJSON lines,
    gzip-compressed (Content-Encoding: gzip); `publish_batch(..., compress=, ndjson=)`
    chooses per request.

aggregator_client.batches.batch_outcome(client, summary.batches) sums the server's
outcome over a run's batches, waiting a bounded time for them to be stored.

Every publish request carries its own Idempotency-Key and sends it again on
each retry, so a retry after an ambiguous failure (a timeout, a reset, a
gateway's 502, a 503 after a stall) is counted once by the API. The summary says how many events the
API may have accepted beyond the 202s it answered (see aggregator_client.outcomes).
"""

from __future__ import annotations

import copy
import gzip
import threading
import time
import uuid
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Iterator
from concurrent.futures import Future
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from dataclasses import replace
from typing import Any
from typing import Self
from urllib.parse import quote
from urllib.parse import urlencode

import orjson
import urllib3
from urllib3.exceptions import HTTPError
from urllib3.exceptions import MaxRetryError
from urllib3.util import parse_url
from urllib3.util.retry import Retry

from aggregator_client.events import iter_batches
from aggregator_client.events import iter_lingering_batches
from aggregator_client.outcomes import PublishSummary
from aggregator_client.outcomes import RequestOutcome
from aggregator_client.outcomes import summarize
from aggregator_client.retries import RETRY_STATUSES
from aggregator_client.retries import is_ambiguous
from aggregator_client.retries import make_retry

DEFAULT_URL = "http://127.0.0.1:8080"
NDJSON = "application/x-ndjson"
# The API's limit on events per request.
MAX_BATCH = 1000
# zlib's own default: log lines shrink about as much as at 9 for a fraction of the CPU
# (bench/compression.py measures both ends).
GZIP_LEVEL = 6
# How long `health()` waits before saying the API is unreachable.
HEALTH_TIMEOUT = 2.0
# A follower that lost the API tries again after at most this long.
FOLLOW_BACKOFF_MAX = 5.0


class ClientError(Exception):
    """Something the caller should hear about: the API is away or said no."""


class Unreachable(ClientError):
    """The API did not answer (refused, reset, timed out) after the retries."""


class ApiError(ClientError):
    """The API answered with an error status; `errors` names the fields of a 422."""

    def __init__(self, status: int, message: str, errors: Any = None) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message
        self.errors = errors


@dataclass(frozen=True)
class Page:
    """One page of GET /events, and the cursor to ask for the next."""

    events: list[dict[str, Any]]
    next_cursor: str | None
    # Retention dropped events (of any topic) after the cursor asked for.
    retention_gap: bool = False


def encode_body(batch: list[dict[str, Any]], as_object: bool, ndjson: bool = False) -> bytes:
    """Encode a batch as a JSON array, its only event as a bare object, or NDJSON lines."""
    if ndjson:
        # No blank lines: line N of the body is event N - 1 (the API names lines in errors).
        return b"".join(orjson.dumps(event, option=orjson.OPT_APPEND_NEWLINE) for event in batch)
    if as_object:
        if len(batch) != 1:
            raise ValueError(f"only a batch of one can be sent as an object, got {len(batch)}")
        return orjson.dumps(batch[0])
    return orjson.dumps(batch)


def _error_of(data: bytes) -> tuple[str, Any]:
    """Return the message and field errors of an error body (the API's one JSON shape)."""
    try:
        body = orjson.loads(data)
    except orjson.JSONDecodeError:
        return data[:200].decode(errors="replace"), None
    if isinstance(body, dict) and "message" in body:
        return str(body["message"])[:300], body.get("errors")
    return str(body)[:300], None


def _describe(errors: Any) -> str:
    return f" {orjson.dumps(errors).decode()[:500]}" if errors else ""


def _reason(exc: HTTPError) -> str:
    reason = exc.reason if isinstance(exc, MaxRetryError) and exc.reason else exc
    return f"{type(reason).__name__}: {reason}"


class Client:
    """A connection pool to one aggregator API, with its token and retry policy.

    Thread-safe: `publish` sends from a pool of `concurrency` threads itself.
    """

    def __init__(
        self,
        url: str = DEFAULT_URL,
        token: str | None = None,
        *,
        timeout: float = 10.0,
        max_retries: int = 8,
        concurrency: int = 8,
        compress: bool = False,
        ndjson: bool = False,
    ) -> None:
        if parse_url(url).scheme not in ("http", "https"):
            raise ValueError(f"url must start with http:// or https://, got {url!r}")
        if max_retries < 0 or timeout <= 0 or concurrency < 1:
            raise ValueError("max_retries must be >= 0, timeout > 0 and concurrency >= 1")
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.max_retries = max_retries
        self.concurrency = concurrency
        # Defaults of every publish: gzip bodies (Content-Encoding), NDJSON instead of arrays.
        self.compress = compress
        self.ndjson = ndjson
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._pool = urllib3.PoolManager(maxsize=concurrency)

    def with_retries(self, max_retries: int) -> Client:
        """Return a client sharing this one's connections, with another retry budget."""
        other = copy.copy(self)
        other.max_retries = max_retries
        return other

    def close(self) -> None:
        """Close the pooled connections."""
        self._pool.clear()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # -- health ---------------------------------------------------------------------------

    def health(self, timeout: float = HEALTH_TIMEOUT) -> dict[str, Any]:
        """Check that the API answers GET /health, once, within `timeout` seconds."""
        try:
            response = self._pool.request(
                "GET",
                f"{self.url}/health",
                retries=False,
                timeout=urllib3.Timeout(total=timeout),
            )
        except HTTPError as exc:
            raise Unreachable(f"no answer from {self.url} within {timeout:g} s ({exc})") from None
        if response.status != 200:
            message, _ = _error_of(response.data)
            raise ApiError(response.status, f"{self.url}/health: {message}")
        return orjson.loads(response.data)

    # -- publishing -----------------------------------------------------------------------

    def publish_batch(
        self,
        events: list[dict[str, Any]],
        *,
        as_object: bool = False,
        idempotency_key: str | None = None,
        compress: bool | None = None,
        ndjson: bool | None = None,
    ) -> RequestOutcome:
        """POST one batch with its own Idempotency-Key, sent again on each retry; report the end.

        `compress` gzips the body and `ndjson` sends one event per line (each defaults
        to the client's setting); a retry sends the same bytes, as the key requires.
        """
        compress = self.compress if compress is None else compress
        ndjson = self.ndjson if ndjson is None else ndjson
        body = encode_body(events, as_object and not ndjson, ndjson)
        retry = make_retry(self.max_retries)
        key = idempotency_key or uuid.uuid4().hex
        headers = {
            **self._headers,
            "Content-Type": NDJSON if ndjson else "application/json",
            "Idempotency-Key": key,
        }
        if compress:
            # mtime=0: the same events give the same bytes, so a resend under the same
            # Idempotency-Key matches the digest of the first attempt.
            body = gzip.compress(body, compresslevel=GZIP_LEVEL, mtime=0)
            headers["Content-Encoding"] = "gzip"
        started = time.perf_counter()
        batch_id: str | None = None
        errors: Any = None
        error: str | None
        try:
            response = self._pool.request(
                "POST",
                f"{self.url}/publish",
                body=body,
                headers=headers,
                retries=retry,
                timeout=self.timeout,
            )
        except HTTPError as exc:
            error = _reason(exc)
            final, accepted = error.split(":", 1)[0], False
        else:
            final, accepted = str(response.status), response.status == 202
            if accepted:
                error = None
                batch_id = orjson.loads(response.data).get("batch_id")
            else:
                message, errors = _error_of(response.data)
                error = f"HTTP {response.status}: {message}{_describe(errors)}"
        latency = time.perf_counter() - started
        ambiguous = sum(1 for attempt in retry.log if is_ambiguous(attempt))
        return RequestOutcome(
            events, final, accepted, ambiguous, latency, error, key, batch_id, errors
        )

    def publish(
        self,
        events: Iterable[dict[str, Any]],
        *,
        batch_size: int = 500,
        linger: float | None = None,
        on_outcome: Callable[[RequestOutcome], None] | None = None,
    ) -> PublishSummary:
        """Publish `events` in batches, `concurrency` requests at a time, and summarise.

        `events` is read only as fast as batches are sent, so a large file or a
        pipe streams through; with `linger`, a batch that is not full is sent once
        its first event has waited that many seconds (for a live pipe). With
        batch_size 1, each event is sent as a bare object. A refused
        token (401/403) stops the run: nothing more is sent, and `unsent` counts
        what was left. Ctrl-C does the same after the requests in flight end.
        """
        if not 1 <= batch_size <= MAX_BATCH:
            raise ValueError(f"batch size must be in [1, {MAX_BATCH}], got {batch_size}")
        topics: set[str] = set()
        read = 0
        outcomes: list[RequestOutcome] = []
        stop = threading.Event()
        report = threading.Lock()
        # Bounds the batches read ahead of the requests, so memory stays flat.
        in_flight = threading.BoundedSemaphore(self.concurrency * 2)

        def finished(future: Future[RequestOutcome]) -> None:
            in_flight.release()
            if future.cancelled():  # Dropped at a stop: never sent, counted as unsent.
                return
            outcome = future.result()
            with report:
                outcomes.append(outcome)
                if outcome.refused:
                    stop.set()
                if on_outcome is not None:
                    on_outcome(outcome)

        def send(batch: list[dict[str, Any]], offset: int) -> RequestOutcome:
            outcome = self.publish_batch(batch, as_object=batch_size == 1)
            return replace(outcome, offset=offset)

        started = time.perf_counter()
        executor = ThreadPoolExecutor(self.concurrency, thread_name_prefix="publish")
        stopped_by: str | None = None
        try:
            if linger is None:
                batches = iter_batches(events, batch_size)
            else:
                batches = iter_lingering_batches(events, batch_size, linger)
            for batch in batches:
                offset = read
                read += len(batch)
                topics.update(str(event.get("topic")) for event in batch)
                in_flight.acquire()
                if stop.is_set():
                    in_flight.release()
                    stopped_by = "the API refused the token"
                    break
                executor.submit(send, batch, offset).add_done_callback(finished)
        except KeyboardInterrupt:
            stopped_by = "interrupted"
        finally:
            # Requests in flight end and are counted; when stopped early the
            # batches still queued are dropped rather than sent.
            executor.shutdown(wait=True, cancel_futures=stopped_by is not None or stop.is_set())
        if stop.is_set():
            stopped_by = "the API refused the token"
        summary = summarize(read, outcomes, time.perf_counter() - started, sorted(topics))
        return replace(summary, stopped_by=stopped_by)

    # -- reading --------------------------------------------------------------------------

    def _get(self, path: str, params: dict[str, Any] | None = None, *, wait: float = 0) -> Any:
        """GET a JSON document, retrying 429, 502-504 and dropped connections (safe for reads)."""
        query = {k: v for k, v in (params or {}).items() if v is not None}
        url = f"{self.url}{path}" + (f"?{urlencode(query)}" if query else "")
        return self._request("GET", url, make_retry(self.max_retries), self.timeout + wait)

    def _request(self, method: str, url: str, retries: Retry, timeout: float) -> Any:
        try:
            response = self._pool.request(
                method, url, headers=self._headers, retries=retries, timeout=timeout
            )
        except HTTPError as exc:
            raise Unreachable(f"{method} {url}: {_reason(exc)}") from None
        if 200 <= response.status < 300:
            return orjson.loads(response.data)
        message, errors = _error_of(response.data)
        raise ApiError(response.status, message + _describe(errors), errors)

    def pages(
        self, *, cursor: str | None = None, limit: int = 500, wait: int = 0, **filters: Any
    ) -> Iterator[Page]:
        """Yield pages of GET /events from `cursor` (or the start) until the last one.

        Filters are the endpoint's: topic, source, since, until, payload (a JSON
        object, or its text). With `wait`, the last page is awaited for that long.
        """
        if isinstance(filters.get("payload"), dict):
            filters["payload"] = orjson.dumps(filters["payload"]).decode()
        while True:
            params = {"cursor": cursor, "limit": limit, "wait": wait or None, **filters}
            body = self._get("/events", params, wait=wait)
            yield Page(body["events"], body["next_cursor"], body.get("retention_gap", False))
            if body["next_cursor"] is None:
                return
            cursor = body["next_cursor"]

    def export(
        self,
        *,
        cursor: str | None = None,
        on_gap: Callable[[dict[str, Any]], None] | None = None,
        **filters: Any,
    ) -> Iterator[dict[str, Any]]:
        """Yield every stored event matching `filters` from `cursor` on, each with its `cursor`.

        One streamed request (`Accept: application/x-ndjson`): the server reads one
        snapshot in constant memory. Resume an interrupted export from the
        `cursor` of the last event received. The stream's retention-gap lines
        (`{"retention_gap": true, "cursor": ...}`: retention dropped events after
        the cursor) are never yielded; `on_gap` is called with each.
        """
        if isinstance(filters.get("payload"), dict):
            filters["payload"] = orjson.dumps(filters["payload"]).decode()
        query = {k: v for k, v in {"cursor": cursor, **filters}.items() if v is not None}
        url = f"{self.url}/events" + (f"?{urlencode(query)}" if query else "")
        headers = {**self._headers, "Accept": NDJSON}
        try:
            response = self._pool.request(
                "GET",
                url,
                headers=headers,
                retries=make_retry(self.max_retries),
                timeout=self.timeout,
                preload_content=False,
            )
        except HTTPError as exc:
            raise Unreachable(f"GET {url}: {_reason(exc)}") from None
        try:
            if response.status != 200:
                message, errors = _error_of(response.read())
                raise ApiError(response.status, message + _describe(errors), errors)
            for line in response:
                if not line.strip():
                    continue
                item = orjson.loads(line)
                if item.get("retention_gap") is True and "event_id" not in item:
                    if on_gap is not None:
                        on_gap(item)
                    continue
                yield item
        except HTTPError as exc:
            raise Unreachable(f"GET {url}: the stream broke ({_reason(exc)})") from None
        finally:
            response.release_conn()

    def events(self, *, cursor: str | None = None, **filters: Any) -> Iterator[dict[str, Any]]:
        """Yield every stored event matching `filters`, oldest first."""
        for page in self.pages(cursor=cursor, **filters):
            yield from page.events

    def follow(
        self,
        *,
        cursor: str | None = None,
        wait: int = 20,
        on_error: Callable[[ClientError], None] | None = None,
        **filters: Any,
    ) -> Iterator[Page]:
        """Yield pages from `cursor` on, then wait for new events, for ever.

        The API holds each request up to `wait` seconds until something arrives.
        When it is away, or busy (503 to followers), this keeps trying with
        backoff, after telling `on_error`; a refused token or bad filter raises.
        """
        backoff = 0.5
        while True:
            try:
                for page in self.pages(cursor=cursor, wait=wait, **filters):
                    backoff = 0.5
                    yield page
                    cursor = page.next_cursor or cursor
            except (Unreachable, ApiError) as exc:
                if isinstance(exc, ApiError) and exc.status not in RETRY_STATUSES:
                    raise
                if on_error is not None:
                    on_error(exc)
                time.sleep(backoff)
                backoff = min(backoff * 2, FOLLOW_BACKOFF_MAX)

    def batch(self, batch_id: str) -> dict[str, Any]:
        """Return GET /batches/<id>: queued, or stored with its counts (ApiError 404: unknown)."""
        return self._get(f"/batches/{quote(batch_id, safe='')}")

    def stats(self) -> dict[str, Any]:
        """Return GET /stats: exact totals across topics."""
        return self._get("/stats")

    def topic_stats(
        self, prefix: str | None = None, *, oldest: bool = False
    ) -> Iterator[dict[str, Any]]:
        """Yield each topic's counters from GET /stats/topics, walking every page.

        With oldest, each also has oldest_position and oldest_stored_at (None when no
        event of the topic is kept); the API then pages 100 topics at a time.
        """
        params: dict[str, Any] = {"limit": 1000, "prefix": prefix or None}
        if oldest:
            params.update(limit=100, oldest="true")
        while True:
            page = self._get("/stats/topics", params)
            yield from page["topics"]
            if page["next_cursor"] is None:
                return
            params["cursor"] = page["next_cursor"]

    def dead_letters(self) -> list[dict[str, Any]]:
        """Return the newest events the database refused, with the reason."""
        return self._get("/dead-letters")

    def replay_dead_letter(self, letter_id: int) -> dict[str, Any]:
        """Store a dead-lettered event again; its result is "stored" or "duplicate"."""
        # Retry only answers the API gave before doing anything (429, 503) and
        # failed connects: a replay that may have run is not sent again.
        retries = Retry(
            total=self.max_retries,
            connect=self.max_retries,
            read=0,
            other=0,
            allowed_methods=frozenset({"POST"}),
            status_forcelist=frozenset({429, 503}),
            backoff_factor=0.2,
            respect_retry_after_header=True,
            raise_on_status=False,
        )
        url = f"{self.url}/dead-letters/{int(letter_id)}/replay"
        return self._request("POST", url, retries, self.timeout)
