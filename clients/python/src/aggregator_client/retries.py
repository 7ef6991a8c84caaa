"""The retry policy of every request, and which failed attempts may still have been accepted."""

from __future__ import annotations

from typing import Any
from typing import Self

from urllib3.exceptions import ConnectTimeoutError
from urllib3.exceptions import ProxyError
from urllib3.util.retry import RequestHistory
from urllib3.util.retry import Retry

RETRY_STATUSES = frozenset({429, 502, 503, 504})
# Answers after which the batch may still have been accepted. Our API answers 429
# before it touches the broker, but a 503 may follow a Redis call that timed out
# and that Redis runs later (a stall); a gateway's 502 or 504 says nothing about
# the API behind it. A retry with the same key is answered from the acceptance.
AMBIGUOUS_STATUSES = frozenset({502, 503, 504})


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
    return attempt.status in AMBIGUOUS_STATUSES
