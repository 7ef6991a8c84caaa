"""How a background loop logs its failures: a traceback per outage, not per round.

The loops (broker check, message leases, resend sweep) run every second or so; while
the database or the broker is away each round fails the same way. Logging the
traceback every round buried everything else (a full traceback a second per process
while PostgreSQL was down). Now the first failure of an outage is logged with its
traceback, the same failure again as one line at most every `repeat_every` seconds,
a different failure with its traceback, and the recovery once, with how long it took.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable


class FailureLog:
    """The failures of one background loop, logged once per outage and kind."""

    def __init__(
        self,
        logger: logging.Logger,
        what: str,
        repeat_every: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._logger = logger
        self._what = what
        self._repeat_every = repeat_every
        self._clock = clock
        self._since: float | None = None
        self._failures = 0
        self._last_kind: tuple[str, str] | None = None
        self._last_logged = 0.0

    def failed(self, exc: BaseException) -> None:
        """Log this failure: in full when it is new, as a line now and then when repeated."""
        now = self._clock()
        kind = (type(exc).__name__, _first_line(exc))
        self._failures += 1
        if self._since is None:
            self._since = now
        if kind != self._last_kind:
            self._last_kind = kind
            self._last_logged = now
            self._logger.warning("%s failed", self._what, exc_info=exc)
        elif now - self._last_logged >= self._repeat_every:
            self._last_logged = now
            self._logger.warning(
                "%s still failing after %.0f s (%d times): %s: %s",
                self._what,
                now - self._since,
                self._failures,
                *kind,
                extra={"failures": self._failures},
            )

    def succeeded(self) -> None:
        """Say once that the loop works again, if it had failed."""
        if self._since is None:
            return
        # At the failures' level: whoever was shown the outage is shown its end.
        self._logger.warning(
            "%s works again after %.1f s (%d failures)",
            self._what,
            self._clock() - self._since,
            self._failures,
            extra={"failures": self._failures},
        )
        self._since = None
        self._failures = 0
        self._last_kind = None


def _first_line(exc: BaseException) -> str:
    text = str(exc)
    return text.splitlines()[0] if text else ""
