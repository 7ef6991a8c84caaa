"""Putting accepted batches on the broker, joining small concurrent ones into one task."""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from typing import Any

import redis

from app import pending
from app.metrics import TASK_EVENTS
from tasks.ingest import store_batch

logger = logging.getLogger(__name__)

Events = list[dict[str, Any]]


class BrokerUnavailable(Exception):
    """The broker did not take a batch, so the request must not be acknowledged."""


def send(batch_id: str, events: Events) -> None:
    """Put one batch on the broker as one task (again, when resending)."""
    # The task id is the batch id, so Flower and the ledger name the same thing.
    # A short argsrepr spares Celery a saferepr() of every event (~0.2-0.5 ms).
    store_batch.apply_async(
        args=(batch_id, events),
        task_id=batch_id,
        argsrepr=f"({batch_id!r}, <{len(events)} events>)",
        kwargsrepr="{}",
    )


def enqueue(client: redis.Redis, events: Events) -> str:
    """Send one batch to the workers as one task; raise if the broker did not take it."""
    batch_id = uuid.uuid4().hex
    send(batch_id, events)
    TASK_EVENTS.observe(len(events))
    try:
        pending.record(client, batch_id, events)
    except redis.RedisError:
        # The batch is on the queue and will be stored and counted; only the
        # queued figure of /stats misses it until then. 202 is still the truth.
        logger.warning("batch %s enqueued; could not mark it pending", batch_id)
    return batch_id


class _Waiter:
    """One request's events, waiting for the task that carries them to be enqueued."""

    def __init__(self, events: Events) -> None:
        self.events = events
        self.done = threading.Event()
        self.error: BaseException | None = None
        self._state = "waiting"
        self._lock = threading.Lock()

    def take(self) -> bool:
        """Claim the events for a task, unless the request gave up waiting."""
        with self._lock:
            if self._state != "waiting":
                return False
            self._state = "taken"
            return True

    def give_up(self) -> bool:
        """Withdraw the events, unless a task already carries them."""
        with self._lock:
            if self._state != "waiting":
                return False
            self._state = "abandoned"
            return True

    def finish(self, error: BaseException | None) -> None:
        self.error = error
        self.done.set()


class GroupCommit:
    """Joins the small batches of concurrent requests in this process into one task.

    One publish costs the API about as much CPU as the rest of a request, and
    a task costs a worker about a millisecond however small it is. Requests
    wait at most `linger` seconds for company; each gets its answer only after
    the task carrying its events was accepted by the broker.
    """

    def __init__(
        self, client: redis.Redis, max_events: int = 1000, linger: float = 0.002, timeout: float = 5
    ) -> None:
        self._client = client
        self._max_events = max_events
        self._linger = linger
        self._timeout = timeout
        self._queue: queue.SimpleQueue[_Waiter] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()

    def submit(self, events: Events) -> None:
        """Return once the events are on the broker; raise BrokerUnavailable if they are not."""
        self._ensure_thread()
        waiter = _Waiter(events)
        self._queue.put(waiter)
        if not waiter.done.wait(self._timeout) and waiter.give_up():
            raise BrokerUnavailable("timed out waiting for the broker")
        # Taken just before the timeout: the publish is under way, its outcome decides.
        waiter.done.wait()
        if waiter.error is not None:
            raise BrokerUnavailable(str(waiter.error)) from waiter.error

    def _ensure_thread(self) -> None:
        # Started on first use, so it lives in the process that serves requests
        # (gunicorn forks before the app is created; nothing runs before that).
        if self._thread is not None and self._thread.is_alive():
            return
        with self._start_lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="group-commit", daemon=True)
                self._thread.start()

    def _collect(self) -> list[_Waiter]:
        group: list[_Waiter] = []
        size = 0
        waiter = self._queue.get()
        deadline = time.monotonic() + self._linger
        while True:
            if waiter.take():
                group.append(waiter)
                size += len(waiter.events)
            if size >= self._max_events:
                return group
            # After the linger time, still take whatever is already waiting.
            remaining = deadline - time.monotonic()
            try:
                waiter = (
                    self._queue.get(timeout=remaining)
                    if remaining > 0
                    else self._queue.get_nowait()
                )
            except queue.Empty:
                return group

    def _run(self) -> None:
        while True:
            group = self._collect()
            if not group:
                continue
            error: BaseException | None = None
            try:
                enqueue(self._client, [event for waiter in group for event in waiter.events])
            except Exception as exc:  # Every waiter learns the outcome, whatever it was.
                error = exc
            for waiter in group:
                waiter.finish(error)
