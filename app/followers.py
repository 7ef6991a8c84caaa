"""The log's head for the followers of one API process: one query per interval wakes them all."""

from __future__ import annotations

import logging
import threading
import time

from sqlalchemy import Engine

from app.store.reading import log_head

logger = logging.getLogger(__name__)

# A waiting follower sees an event within this of its commit.
POLL_SECONDS = 0.2


class LogHead:
    """The newest position in the log, read by one background thread while followers wait.

    A follower reads up to the head it saw, then waits here until the head moves
    past it, and reads only what was stored since: however many followers wait,
    and whatever their filters, the process asks the database one cheap question
    per interval (an index lookup), not one scan per follower.
    """

    def __init__(self, engine: Engine, interval: float = POLL_SECONDS) -> None:
        self._engine = engine
        self._interval = interval
        self._changed = threading.Condition()
        self._head = 0
        self._polls = 0
        self._last_failed_poll = 0
        self._waiting = 0
        self._polling = False

    def wait_past(self, position: int, timeout: float) -> bool:
        """Wait until the head is past position (True) or the timeout ends (False).

        Also True after a poll failed, so the follower reads for itself and
        meets the database's error, rather than waiting out an outage blind.
        """
        deadline = time.monotonic() + timeout
        with self._changed:
            self._waiting += 1
            started = self._polls
            if not self._polling:
                self._polling = True
                threading.Thread(target=self._poll, name="log-head", daemon=True).start()
            try:
                while self._head <= position and self._last_failed_poll <= started:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return False
                    self._changed.wait(remaining)
                return True
            finally:
                self._waiting -= 1

    def _poll(self) -> None:
        failing = False
        while True:
            try:
                with self._engine.connect() as conn:
                    head: int | None = log_head(conn)
            except Exception as exc:  # Whatever it is, the followers' own reads will say.
                head = None
                if not failing:
                    logger.warning("cannot read the log's head: %s", str(exc).splitlines()[0])
            failing = head is None
            with self._changed:
                self._polls += 1
                if head is None:
                    self._last_failed_poll = self._polls
                    self._changed.notify_all()
                elif head != self._head:
                    # Not max(): after a TRUNCATE the head goes back, and waiters
                    # must not be woken by a position that no longer exists.
                    self._head = head
                    self._changed.notify_all()
                if not self._waiting:
                    self._polling = False
                    return
            time.sleep(self._interval)
