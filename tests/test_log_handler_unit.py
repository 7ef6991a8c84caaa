"""The logging handler without an API: its queue, records as events; it never hurts the app.

Where a handler needs somewhere to send, it is a closed port (connections refused)
or a port that accepts and never answers: the handler's side of an outage.
"""

from __future__ import annotations

import io
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator

import orjson
import pytest

from aggregator_client.buffer import RecordBuffer
from aggregator_client.log_records import PAYLOAD_LIMIT
from aggregator_client.log_records import event_of
from aggregator_client.logging import AggregatorHandler
from scripts.stack import wait_until


@pytest.fixture
def closed_port() -> int:
    with socket.socket() as probe:  # Bound, closed: nothing listens there.
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def logger() -> Iterator[logging.Logger]:
    # Outside logging's registry, so pytest's capture (which also formats records and
    # raises on a bad one) is not attached to it: only the handler under test is.
    log = logging.Logger(f"unit-{time.monotonic_ns()}", logging.DEBUG)
    yield log
    for handler in list(log.handlers):
        log.removeHandler(handler)
        handler.close()


def record(message: str = "hello %s", *args: object, **extra: object) -> logging.LogRecord:
    made = logging.LogRecord("shop.web", logging.WARNING, "/app/web.py", 42, message, args, None)
    made.__dict__.update(extra)
    return made


# -- the queue --------------------------------------------------------------------------------


def test_a_full_buffer_drops_the_oldest_and_counts_it() -> None:
    buffer: RecordBuffer[int] = RecordBuffer(10)
    for item in range(15):
        assert buffer.put(item)
    assert buffer.dropped == 5 and buffer.pending() == 10
    assert buffer.take(100, linger=0) == list(range(5, 15))


def test_a_blocking_buffer_waits_for_room_instead_of_dropping() -> None:
    buffer: RecordBuffer[int] = RecordBuffer(2, block=True)
    buffer.put(1)
    buffer.put(2)
    putter = threading.Thread(target=buffer.put, args=(3,))
    putter.start()
    putter.join(0.2)
    assert putter.is_alive()  # waiting for room
    assert buffer.take(1, linger=0) == [1]
    putter.join(5)
    assert not putter.is_alive() and buffer.dropped == 0
    assert buffer.take(10, linger=0) == [2, 3]


def test_a_batch_waits_for_its_size_or_its_linger_or_a_flush() -> None:
    buffer: RecordBuffer[int] = RecordBuffer(100)
    for item in range(5):
        buffer.put(item)
    assert buffer.take(5, linger=60) == [0, 1, 2, 3, 4]  # full: at once
    buffer.done(5)
    buffer.put(5)
    started = time.monotonic()
    assert buffer.take(5, linger=0.2) == [5]  # not full: after the linger
    assert 0.15 <= time.monotonic() - started < 2
    buffer.done(1)
    assert buffer.take(5, linger=60, idle=0.05) == []  # nothing: the caller looks around
    buffer.put(6)
    flusher = threading.Thread(target=buffer.wait_done, args=(10,))
    flusher.start()
    assert buffer.take(5, linger=60) == [6]  # a flush sends what is there
    assert buffer.pending() == 1  # taken, not done: a flush still waits for it
    buffer.done(1)
    flusher.join(5)
    assert not flusher.is_alive()
    buffer.close()
    assert buffer.take(5, linger=60) is None and not buffer.put(7)


# -- records as events ------------------------------------------------------------------------


def test_a_record_becomes_an_event_with_its_place_exception_and_extras() -> None:
    try:
        raise KeyError("sku-1")
    except KeyError:
        made = record("order %s failed", "o-7", order="o-7", amount=12.5, user={"id": 3})
        made.exc_info = sys.exc_info()
    event = event_of(made, "shop", "web-1")
    assert (event["topic"], event["source"]) == ("shop", "web-1")
    assert event["timestamp"].endswith("+00:00")
    payload = event["payload"]
    assert payload["message"] == "order o-7 failed"
    assert (payload["level"], payload["logger"], payload["line"]) == ("WARNING", "shop.web", 42)
    assert (payload["module"], payload["path"]) == ("web", "/app/web.py")
    assert (
        payload["exc_info"].startswith("Traceback") and "KeyError: 'sku-1'" in payload["exc_info"]
    )
    assert payload["extra"] == {"order": "o-7", "amount": 12.5, "user": {"id": 3}}


def test_the_event_id_is_the_records_own_and_identical_lines_are_two_events() -> None:
    first, second = record("same line"), record("same line")
    assert event_of(first, "t", "s")["event_id"] == event_of(first, "t", "s")["event_id"]
    assert event_of(first, "t", "s")["event_id"] != event_of(second, "t", "s")["event_id"]


def test_what_json_cannot_hold_is_sent_as_its_repr_and_nul_is_replaced() -> None:
    event = event_of(record("a\x00b", thing=object(), big=2**70, text="c\x00d"), "t", "s")
    payload = event["payload"]
    assert payload["message"] == "a\ufffdb"
    assert payload["extra"]["thing"].startswith("<object object at")
    assert payload["extra"]["big"] == str(2**70)
    assert payload["extra"]["text"] == "c\ufffdd"
    assert b"\\u0000" not in orjson.dumps(event)


def test_a_huge_record_is_cut_to_what_the_api_stores() -> None:
    made = record("x" * 500_000, blob="y" * 200_000)
    made.exc_text = "Traceback\n" + "frame\n" * 50_000 + "ValueError: the end"
    payload = event_of(made, "t", "s")["payload"]
    assert len(orjson.dumps(payload)) <= PAYLOAD_LIMIT
    assert payload["exc_info"].endswith("ValueError: the end")  # a traceback keeps its end
    assert payload["extra"] == {"_dropped": "1 fields, too large to send"}
    assert "characters cut]" in payload["message"]


def test_a_record_whose_arguments_do_not_fit_is_still_an_event() -> None:
    payload = event_of(record("%d items", "many"), "t", "s")["payload"]
    assert payload["message"].startswith("'%d items' % ('many',) (not formatted: TypeError")


# -- the handler never hurts the application --------------------------------------------------


def test_a_full_queue_drops_the_oldest_instead_of_blocking_the_app(
    logger: logging.Logger, closed_port: int
) -> None:
    reports: list[str] = []
    handler = AggregatorHandler(
        f"http://127.0.0.1:{closed_port}",
        topic="t",
        queue_size=10,
        batch_size=1000,
        linger=60,  # nothing leaves the queue: it fills
        timeout=0.2,
        max_retries=0,
        report=reports.append,
    )
    logger.addHandler(handler)
    started = time.monotonic()
    for n in range(1000):
        logger.info("record %d", n)
    elapsed = time.monotonic() - started
    counts = handler.counts()
    assert (counts.queued, counts.dropped, counts.pending) == (1000, 990, 10)
    assert elapsed < 2, elapsed  # ~20 µs a record here; never a wait on the network
    handler.close()
    counts = handler.counts()
    assert (counts.sent, counts.lost, counts.pending) == (0, 10, 0)
    assert counts.queued == counts.sent + counts.refused + counts.dropped + counts.lost
    assert "cannot deliver log records" in reports[0]
    assert reports[-1].startswith("10 log records were not delivered")


def test_the_handlers_own_errors_never_reach_the_app(
    logger: logging.Logger, closed_port: int, capsys: pytest.CaptureFixture[str]
) -> None:
    class Broken(logging.Formatter):
        def formatException(self, ei: object) -> str:
            raise RuntimeError("formatter bug")

    reports: list[str] = []
    handler = AggregatorHandler(
        f"http://127.0.0.1:{closed_port}",
        topic="t",
        timeout=0.2,
        max_retries=0,
        report=reports.append,
    )
    handler.setFormatter(Broken())
    logger.addHandler(handler)
    assert logging.raiseExceptions  # logging would print "--- Logging error ---" for these
    logger.info("%d", "not a number")
    logger.info("unserialisable", extra={"sock": socket.socket})
    try:
        1 / 0  # noqa: B018
    except ZeroDivisionError:
        logger.exception("boom")  # the formatter raises: counted, not raised
    handler.flush()  # the API is away: returns after `timeout`
    handler.close()
    logger.info("after close")  # dropped, quietly
    counts = handler.counts()
    assert (counts.failed, counts.queued, counts.lost, counts.dropped) == (1, 3, 2, 1)
    assert "Logging error" not in capsys.readouterr().err


def test_the_sender_thread_logs_nothing_anywhere(closed_port: int) -> None:
    # urllib3 warns on each retry, from the sender thread, through the root logger:
    # with the handler there, that would feed itself for as long as the API is away,
    # and without one logging's last resort would print each to stderr.
    reports: list[str] = []
    handler = AggregatorHandler(
        f"http://127.0.0.1:{closed_port}",
        topic="t",
        linger=0,
        max_retries=2,
        timeout=0.2,
        report=reports.append,
    )
    root = logging.getLogger()
    level = root.level
    seen: list[logging.LogRecord] = []
    spy = logging.Handler()
    spy.emit = seen.append  # type: ignore[method-assign]
    root.addHandler(handler)
    root.addHandler(spy)
    root.setLevel(logging.DEBUG)
    try:
        logging.getLogger("app").warning("one record")
        wait_until(lambda: handler.counts().resends >= 2, timeout=30)
        # The same urllib3 logger from the application's thread is untouched.
        logging.getLogger("urllib3.connectionpool").debug("the app's own")
    finally:
        root.removeHandler(handler)
        root.removeHandler(spy)
        root.setLevel(level)
        handler.close()
    assert [r.getMessage() for r in seen if r.name.startswith("urllib3")] == ["the app's own"]
    assert handler.counts().queued == 2  # the app's two records, none of the sender's
    assert len(reports) == 2 and "cannot deliver" in reports[0]


def test_records_logged_while_emitting_are_not_shipped(
    logger: logging.Logger, closed_port: int
) -> None:
    class Chatty:
        def __str__(self) -> str:
            logger.warning("logged while the handler formats a message")
            return "chatty"

    handler = AggregatorHandler(
        f"http://127.0.0.1:{closed_port}", topic="t", timeout=0.2, max_retries=0, linger=60
    )
    logger.addHandler(handler)
    logger.info("%s", Chatty())
    assert handler.counts().queued == 1


def test_bad_settings_are_refused_when_the_handler_is_made() -> None:
    with pytest.raises(ValueError, match="url must start with http"):
        AggregatorHandler("ftp://x", topic="t")
    with pytest.raises(ValueError, match="topic must be 1 to 255"):
        AggregatorHandler("http://127.0.0.1:1", topic="")
    with pytest.raises(ValueError, match="batch_size"):
        AggregatorHandler("http://127.0.0.1:1", topic="t", batch_size=1001)
    with pytest.raises(ValueError, match="when_full"):
        AggregatorHandler("http://127.0.0.1:1", topic="t", when_full="wait")  # type: ignore[arg-type]


def test_reports_go_to_stderr_by_default(closed_port: int) -> None:
    stream = io.StringIO()
    original, sys.stderr = sys.stderr, stream
    try:
        handler = AggregatorHandler(
            f"http://127.0.0.1:{closed_port}", topic="t", timeout=0.2, max_retries=0
        )
        handler.handle(record())
        handler.close()
    finally:
        sys.stderr = original
    assert "aggregator_client.logging: 1 log records were not delivered" in stream.getvalue()


def test_a_forked_child_sends_its_own_records_with_its_own_thread(closed_port: int) -> None:
    handler = AggregatorHandler(
        f"http://127.0.0.1:{closed_port}",
        topic="t",
        linger=60,
        timeout=0.1,
        max_retries=0,
        report=lambda _: None,
    )
    handler.handle(record())  # the parent's sender thread runs, its record queued
    pid = os.fork()
    if pid == 0:  # the child: none of the parent's queue, thread or locks
        try:
            handler.handle(record())
            thread = handler._thread
            fresh = thread is not None and thread.is_alive() and handler.counts().pending == 1
            os._exit(0 if fresh else 1)
        except BaseException:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    assert handler.counts().pending == 1
    handler.close()
    assert os.waitstatus_to_exitcode(status) == 0
