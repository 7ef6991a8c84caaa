"""Handing publish requests to the broker, joining small concurrent ones into one task."""

from __future__ import annotations

import queue
import threading
import time

from tasks.acceptance import Acceptor
from tasks.acceptance import BrokerUnavailable
from tasks.acceptance import Outcome
from tasks.acceptance import Receipt
from tasks.acceptance import Request


class _Waiter:
    """One request, waiting for the task that carries it to be accepted."""

    def __init__(self, request: Request) -> None:
        self.request = request
        self.done = threading.Event()
        self.outcome: Outcome | None = None
        self._state = "waiting"
        self._lock = threading.Lock()

    def take(self) -> bool:
        """Claim the request for a task, unless it gave up waiting."""
        with self._lock:
            if self._state != "waiting":
                return False
            self._state = "taken"
            return True

    def give_up(self) -> bool:
        """Withdraw the request, unless a task already carries it."""
        with self._lock:
            if self._state != "waiting":
                return False
            self._state = "abandoned"
            return True

    def finish(self, outcome: Outcome) -> None:
        self.outcome = outcome
        self.done.set()


def _result(outcome: Outcome | None) -> Receipt:
    if isinstance(outcome, Receipt):
        return outcome
    if isinstance(outcome, Exception):
        raise outcome
    raise BrokerUnavailable("no outcome")


class GroupCommit:
    """Joins the small requests that arrive together in this process into one task.

    One acceptance costs the API a Redis round trip (and with `appendfsync
    always`, an fsync), and a task costs a worker about a millisecond however
    small it is. Requests wait at most `linger` seconds for company; each gets
    its answer only after the task carrying it was accepted, and keeps its own
    idempotency key and answer.
    """

    def __init__(
        self,
        acceptor: Acceptor,
        max_events: int = 1000,
        linger: float = 0.002,
        timeout: float = 5,
    ) -> None:
        self._acceptor = acceptor
        self._max_events = max_events
        self._linger = linger
        self._timeout = timeout
        self._queue: queue.SimpleQueue[_Waiter] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()

    def submit(self, request: Request) -> Receipt:
        """Return the request's receipt once accepted; raise what refused it otherwise."""
        self._ensure_thread()
        waiter = _Waiter(request)
        self._queue.put(waiter)
        if not waiter.done.wait(self._timeout) and waiter.give_up():
            raise BrokerUnavailable("timed out waiting for the broker")
        # Taken just before the timeout: the acceptance is under way, its outcome decides.
        waiter.done.wait()
        return _result(waiter.outcome)

    def _ensure_thread(self) -> None:
        # Started on first use, so it lives in the process that serves requests
        # (gunicorn forks before the app is created; nothing runs before that).
        # _run never returns, so a started thread needs no is_alive() per request.
        if self._thread is not None:
            return
        with self._start_lock:
            if self._thread is None:
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
                size += len(waiter.request.events)
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
            if not group:  # every waiter gave up before it was taken
                continue
            try:
                outcomes = self._acceptor.accept([waiter.request for waiter in group])
            except Exception as exc:  # Every waiter learns the outcome, whatever it was.
                outcomes = [exc] * len(group)
            for waiter, outcome in zip(group, outcomes, strict=True):
                waiter.finish(outcome)


def accept_now(acceptor: Acceptor, request: Request) -> Receipt:
    """Accept one large request as its own task."""
    return _result(acceptor.accept([request])[0])
