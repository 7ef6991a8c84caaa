"""`AggregatorHandler`: ship Python log records to the aggregator without blocking the application.

    import logging
    from aggregator_client.logging import AggregatorHandler

    handler = AggregatorHandler("http://127.0.0.1:8080", token, topic="shop.web")
    logging.getLogger().addHandler(handler)

`emit` turns the record into an event (log_records.event_of: message, level,
logger, place, exception, extras; a random event_id kept on the record) and
puts it in a bounded queue; that is all the application's thread does. One
background thread takes batches (`batch_size` events, or fewer once the first
has waited `linger` seconds) and publishes each with its own Idempotency-Key,
through the Client's retry policy. While the API is away it keeps the batch
and the key and tries again with backoff, so an outage loses nothing the queue
can hold: when the queue is full the oldest record is dropped and counted
(`when_full="block"` makes the logging thread wait instead). A refused record
(422: the API cannot store it) is counted and the rest of its batch sent.

Nothing raises into the application: a record that cannot be turned into an
event, a refused token, an unreachable API are counted (`counts()`) and told
once on stderr (or to `report`). Records logged by the sender thread itself
or while the handler is emitting are not shipped, so the handler never logs
through itself; urllib3's records from the sender thread (a warning per retry
during an outage) are kept from every handler, the report saying it once.

`flush()` waits up to `timeout` seconds for what is queued to be delivered;
`close()` flushes too (waiting up to `timeout` again, plus at most a second for
a request in flight), and `logging.shutdown` (run at exit) calls both, so
records logged just before the program ends are delivered unless the API stays
away longer than that; what close() gives up is counted as lost and reported.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
import time
import uuid
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from typing import Literal

from aggregator_client.buffer import RecordBuffer
from aggregator_client.client import MAX_BATCH
from aggregator_client.client import Client
from aggregator_client.log_records import MAX_STRING
from aggregator_client.log_records import clean
from aggregator_client.log_records import event_of
from aggregator_client.outcomes import RequestOutcome

# urllib3's loggers: from a sender thread, their records (a warning per retry while the
# API is away) would reach the application's handlers, or stderr through logging's last
# resort. Our own reports say it once instead.
URLLIB3_LOGGERS = (
    "urllib3.connectionpool",
    "urllib3.connection",
    "urllib3.poolmanager",
    "urllib3.response",
    "urllib3.util.retry",
)
_SENDERS: set[int] = set()
_QUIETED = threading.Lock()
# Answers after which sending the same batch again can succeed (the API away or busy).
RETRYABLE_STATUSES = frozenset({"408", "429", "500", "502", "503", "504"})
BACKOFF_FIRST = 0.5
BACKOFF_MAX = 10.0


@dataclass(frozen=True)
class HandlerCounts:
    """What became of the records a handler was given, counted since it was made."""

    queued: int
    sent: int
    refused: int
    dropped: int
    lost: int
    failed: int
    resends: int
    pending: int


Report = Callable[[str], None]


def _to_stderr(message: str) -> None:
    try:
        sys.stderr.write(f"aggregator_client.logging: {message}\n")
        sys.stderr.flush()
    except (OSError, ValueError, AttributeError):  # stderr closed or gone at exit
        pass


class _NotFromSenders(logging.Filter):
    """Keep out records made in a handler's sender thread."""

    def filter(self, record: logging.LogRecord) -> bool:
        return threading.get_ident() not in _SENDERS


_NOT_FROM_SENDERS = _NotFromSenders()


def _quiet_urllib3() -> None:
    with _QUIETED:
        for name in URLLIB3_LOGGERS:
            logger = logging.getLogger(name)
            if _NOT_FROM_SENDERS not in logger.filters:
                logger.addFilter(_NOT_FROM_SENDERS)


class AggregatorHandler(logging.Handler):
    """A logging handler that publishes records as events from a background thread."""

    def __init__(
        self,
        url: str,
        token: str | None = None,
        topic: str = "logs",
        source: str | None = None,
        *,
        level: int = logging.NOTSET,
        batch_size: int = 100,
        linger: float = 0.5,
        queue_size: int = 10_000,
        when_full: Literal["drop_oldest", "block"] = "drop_oldest",
        timeout: float = 5.0,
        request_timeout: float = 5.0,
        max_retries: int = 3,
        report: Report | None = None,
    ) -> None:
        super().__init__(level)
        for name, value in (("topic", topic), ("source", source)):
            if value is not None and (not 1 <= len(value) <= MAX_STRING or "\x00" in value):
                raise ValueError(f"{name} must be 1 to {MAX_STRING} characters without NUL")
        if not 1 <= batch_size <= MAX_BATCH:
            raise ValueError(f"batch_size must be in [1, {MAX_BATCH}], got {batch_size}")
        if linger < 0 or timeout < 0 or queue_size < 1:
            raise ValueError("linger and timeout must be >= 0, queue_size >= 1")
        if when_full not in ("drop_oldest", "block"):
            raise ValueError(f"when_full must be 'drop_oldest' or 'block', got {when_full!r}")
        self.topic = topic
        self.source = source or clean(socket.gethostname(), MAX_STRING) or "unknown-host"
        self.batch_size = batch_size
        self.linger = linger
        self.queue_size = queue_size
        self.when_full = when_full
        self.timeout = timeout
        self._client_options: dict[str, Any] = {
            "url": url,
            "token": token,
            "timeout": request_timeout,
            "max_retries": max_retries,
            "concurrency": 1,
        }
        Client(**self._client_options).close()  # A bad URL is refused here, not at the first log.
        self._report = report or _to_stderr
        self._local = threading.local()
        self._closing = threading.Event()
        self._wake = threading.Event()
        self._close_deadline = float("inf")
        self._counts = dict.fromkeys(("queued", "sent", "refused", "lost", "failed", "resends"), 0)
        self._start_state()
        # After a fork the child has no sender thread and must not share the parent's
        # locks or connections: it starts afresh (the copies of queued records are the
        # parent's to send).
        reference = weakref.ref(self)
        os.register_at_fork(after_in_child=lambda: _restart(reference))

    def _start_state(self) -> None:
        self._buffer: RecordBuffer[dict[str, Any]] = RecordBuffer(
            self.queue_size, block=self.when_full == "block"
        )
        self._client = Client(**self._client_options)
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._counts_lock = threading.Lock()
        self._outage_since: float | None = None

    # -- the application's side -------------------------------------------------------------

    def emit(self, record: logging.LogRecord) -> None:
        """Queue the record as an event; never raise, never wait (unless when_full="block")."""
        if self._is_own(record):
            return
        self._local.emitting = True
        try:
            event = event_of(record, self.topic, self.source, self.formatter)
            self._ensure_sender()
            # Counted first: queued = sent + refused + dropped + lost + pending.
            self._add("queued")
            self._buffer.put(event)
        except Exception:
            self._add("failed")
        finally:
            self._local.emitting = False

    def _is_own(self, record: logging.LogRecord) -> bool:
        # The sender's own records (urllib3 warns on each retry) and anything logged
        # while this handler is emitting would loop back into it.
        thread = self._thread
        if thread is not None and thread.ident == threading.get_ident():
            return True
        return bool(getattr(self._local, "emitting", False))

    def flush(self) -> None:
        """Wait up to `timeout` seconds until every queued record has been delivered."""
        try:
            if self._thread is not None and self._thread.is_alive():
                self._wake.set()  # A batch waiting out a backoff is tried again now.
                self._buffer.wait_done(self.timeout)
        except Exception:
            self._add("failed")

    def close(self) -> None:
        """Deliver what is queued (up to `timeout` s), then stop; later records are dropped."""
        try:
            if not self._closing.is_set():
                lost_before = self.counts().lost
                self._close_deadline = time.monotonic() + self.timeout
                self._closing.set()
                self._wake.set()
                self._buffer.close()
                thread = self._thread
                if thread is not None and thread.is_alive():
                    thread.join(max(0.0, self._close_deadline - time.monotonic()) + 1.0)
                if thread is None or not thread.is_alive():
                    self._client.close()
                # Given up at the deadline, or still with a request that has not ended.
                left = self.counts().lost - lost_before + self._buffer.pending()
                if left:
                    self._report(f"{left} log records were not delivered to {self._client.url}")
        except Exception:
            self._add("failed")
        finally:
            super().close()

    def counts(self) -> HandlerCounts:
        """Return what became of the records so far (see HandlerCounts)."""
        with self._counts_lock:
            counts = dict(self._counts)
        return HandlerCounts(**counts, dropped=self._buffer.dropped, pending=self._buffer.pending())

    def _add(self, name: str, count: int = 1) -> None:
        with self._counts_lock:
            self._counts[name] += count

    # -- the sender thread ------------------------------------------------------------------

    def _ensure_sender(self) -> None:
        if self._thread is not None or self._closing.is_set():
            return
        with self._start_lock:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="aggregator-log-sender", daemon=True
                )
                self._thread.start()

    def _run(self) -> None:
        _quiet_urllib3()
        _SENDERS.add(threading.get_ident())
        try:
            self._send_batches()
        finally:
            _SENDERS.discard(threading.get_ident())

    def _send_batches(self) -> None:
        while True:
            batch = self._buffer.take(self.batch_size, self.linger)
            if batch is None:
                return
            if not batch:
                continue
            try:
                self._deliver(batch)
            except Exception as exc:  # A bug here must not stop the thread for good.
                self._add("lost", len(batch))
                self._report(f"lost {len(batch)} log records: {type(exc).__name__}: {exc}")
            finally:
                self._buffer.done(len(batch))

    def _deliver(self, events: list[dict[str, Any]]) -> None:
        """Publish a batch until it is accepted, refused, or the close deadline passes."""
        key = uuid.uuid4().hex
        backoff = BACKOFF_FIRST
        while events:
            if self._closing.is_set() and time.monotonic() >= self._close_deadline:
                self._add("lost", len(events))
                return
            outcome = self._client.publish_batch(events, idempotency_key=key)
            if outcome.accepted:
                self._recovered()
                self._add("sent", len(events))
                return
            if outcome.final == "422":
                self._recovered()
                events = self._without_refused(outcome)
                key = uuid.uuid4().hex  # Another body: another key.
                continue
            if outcome.final == "413" and len(events) > 1:
                half = len(events) // 2
                self._deliver(events[:half])
                events, key = events[half:], uuid.uuid4().hex
                continue
            if outcome.final.isdigit() and outcome.final not in RETRYABLE_STATUSES:
                self._add("refused", len(events))
                self._report(f"the API refused {len(events)} log records: {outcome.error}")
                return
            # Away or busy: the same batch with the same key, after a pause.
            self._outage(outcome)
            self._add("resends")
            self._pause(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX)

    def _without_refused(self, outcome: RequestOutcome) -> list[dict[str, Any]]:
        events = outcome.events
        errors = outcome.errors if isinstance(outcome.errors, dict) else {}
        positions = {int(key) for key in errors if str(key).isdigit() and int(key) < len(events)}
        if not positions or len(positions) != len(errors):
            positions = set(range(len(events)))  # Not about single events: none can go.
        self._add("refused", len(positions))
        first = min(positions)
        problem = errors.get(str(first), outcome.error)
        self._report(f"the API refused {len(positions)} log records, e.g. {problem}")
        return [event for index, event in enumerate(events) if index not in positions]

    def _outage(self, outcome: RequestOutcome) -> None:
        if self._outage_since is None:
            self._outage_since = time.monotonic()
            self._report(
                f"cannot deliver log records to {self._client.url} ({outcome.error});"
                f" keeping them (up to {self.queue_size} queued) and trying again"
            )

    def _recovered(self) -> None:
        if self._outage_since is not None:
            waited = time.monotonic() - self._outage_since
            self._outage_since = None
            self._report(f"delivering log records again after {waited:.1f} s")

    def _pause(self, seconds: float) -> None:
        if self._closing.is_set():
            seconds = min(seconds, max(0.0, self._close_deadline - time.monotonic()))
        # flush() and close() wake it: the batch gets another try at once.
        self._wake.wait(seconds)
        self._wake.clear()


def _restart(reference: weakref.ref[AggregatorHandler]) -> None:
    handler = reference()
    if handler is not None:
        handler._start_state()
