"""A background loop's failures: one traceback per outage, repeats as a line, the recovery once."""

from __future__ import annotations

import logging

import pytest

from app.failure_log import FailureLog


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def records(caplog: pytest.LogCaptureFixture) -> list[tuple[str, bool]]:
    return [(r.getMessage(), r.exc_info is not None) for r in caplog.records]


def test_an_outage_logs_one_traceback_then_a_line_a_minute_then_the_recovery(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    log = FailureLog(logging.getLogger("loop"), "broker check", repeat_every=60, clock=clock)
    with caplog.at_level(logging.WARNING):
        for _ in range(90):  # a round a second for 90 s, the database away
            log.failed(ConnectionError("connection refused\ndetail"))
            clock.now += 1
        log.succeeded()
        log.succeeded()  # working on: nothing more to say
    assert records(caplog) == [
        ("broker check failed", True),
        (
            "broker check still failing after 60 s (61 times): ConnectionError: connection refused",
            False,
        ),
        ("broker check works again after 90.0 s (90 failures)", False),
    ]


def test_a_different_failure_is_logged_in_full_and_a_new_outage_starts_over(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    log = FailureLog(logging.getLogger("loop"), "resend sweep", clock=clock)
    with caplog.at_level(logging.WARNING):
        log.failed(ConnectionError("refused"))
        log.failed(TimeoutError("timed out"))
        log.failed(TimeoutError("timed out"))
        log.succeeded()
        log.failed(TimeoutError("timed out"))
    assert records(caplog) == [
        ("resend sweep failed", True),
        ("resend sweep failed", True),
        ("resend sweep works again after 0.0 s (3 failures)", False),
        ("resend sweep failed", True),
    ]
