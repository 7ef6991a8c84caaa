"""The logging handler against a real API and worker: every record stored once, through an outage.

A separate Python program logs through `AggregatorHandler` as an application
would; the API process is stopped while it logs and started again on the same
port; the program ends without closing the handler, so what is still queued is
delivered by logging's own shutdown at exit.
"""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import orjson
import pytest
import requests

from aggregator_client.logging import AggregatorHandler
from scripts.stack import BIN
from scripts.stack import Api
from scripts.stack import Worker
from scripts.stack import wait_until
from tests.helpers import settled_stats

RECORDS = 1000
PAUSES = (
    300,
    700,
)  # the program waits here: the API is stopped at the first, started at the second

PROGRAM = """
import json, logging, sys
from aggregator_client.logging import AggregatorHandler

url, pauses = sys.argv[1], {int(n) for n in sys.argv[3:]}
handler = AggregatorHandler(url, topic="app.logs", source="shop-1", batch_size=50, linger=0.05,
                            timeout=60)
log = logging.getLogger("shop.orders")
log.setLevel(logging.INFO)
log.addHandler(handler)
for n in range(int(sys.argv[2])):
    if n in pauses:  # "status" prints the counts again; "go" goes on
        print(json.dumps({"at": n, **vars(handler.counts())}), flush=True)
        while sys.stdin.readline().strip() == "status":
            print(json.dumps({"at": n, **vars(handler.counts())}), flush=True)
    if n % 100 == 99:
        try:
            raise ValueError(f"order {n} has no items")
        except ValueError:
            log.exception("order %d failed", n, extra={"order": n})
    else:
        log.info("order %d placed", n, extra={"order": n, "items": [n, n + 1]})
print(json.dumps({"at": "end", **vars(handler.counts())}), flush=True)
# No handler.close(): logging.shutdown at exit flushes and closes it.
"""


class Restartable:
    """An API on a fixed port that can be stopped and started again there."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.env, self.log = env, log
        self.api = Api(env, log, workers=1).start()
        self.url, self.port = self.api.url, self.api.port

    def stop(self) -> None:
        self.api.stop()

    def start(self) -> None:
        self.api = Api(self.env, self.log, workers=1, port=self.port).start()


@pytest.fixture(scope="module")
def restartable(stack_env: dict[str, str], logs: Path) -> Iterator[Restartable]:
    server = Restartable(stack_env, logs / "log-handler-api.log")
    yield server
    server.stop()


def read_line(stream: IO[bytes] | None) -> dict[str, object]:
    assert stream is not None
    line = stream.readline()
    assert line, "the program ended early"
    return orjson.loads(line)


def test_every_record_is_stored_once_through_an_api_outage(
    restartable: Restartable, worker: Worker, clean: None
) -> None:
    program = subprocess.Popen(
        [str(BIN / "python"), "-c", PROGRAM, restartable.url, str(RECORDS)]
        + [str(n) for n in PAUSES],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert program.stdin is not None
    try:
        first = read_line(program.stdout)
        assert first["at"] == PAUSES[0]
        restartable.stop()
        program.stdin.write(b"go\n")
        program.stdin.flush()
        second = read_line(program.stdout)
        # The API was away while these were logged: they wait in the queue.
        assert second["at"] == PAUSES[1] and second["pending"] > 0

        # Away long enough for the handler to have given up a request and kept the batch.
        def resent() -> bool:
            assert program.stdin is not None
            program.stdin.write(b"status\n")
            program.stdin.flush()
            return read_line(program.stdout)["resends"] > 0

        wait_until(resent, timeout=60)
        restartable.start()
        program.stdin.write(b"go\n")
        program.stdin.flush()
        end = read_line(program.stdout)
        out, err = program.communicate(timeout=120)
    finally:
        if program.poll() is None:
            program.kill()
            program.communicate()
    assert program.returncode == 0, err.decode()
    assert end["queued"] == RECORDS and end["dropped"] == end["refused"] == 0
    assert end["pending"] > 0  # the last records: delivered at exit, by logging.shutdown
    # Told once that it could not deliver, and once that it could again; nothing else.
    reports = err.decode().splitlines()
    assert len(reports) == 2, reports
    assert "cannot deliver log records" in reports[0] and "again after" in reports[1]
    figures = settled_stats(restartable.url, received=RECORDS)
    assert figures["topics"]["app.logs"] == {"stored": RECORDS, "duplicates": 0, "failed": 0}

    page = requests.get(
        f"{restartable.url}/events",
        params={"topic": "app.logs", "payload": '{"level": "ERROR"}', "limit": 100},
        timeout=10,
    ).json()
    failures = page["events"]
    assert len(failures) == RECORDS // 100
    event = failures[0]
    assert event["source"] == "shop-1"
    payload = event["payload"]
    assert payload["message"] == "order 99 failed"
    assert (payload["logger"], payload["function"]) == ("shop.orders", "<module>")
    assert payload["exc_info"].endswith("ValueError: order 99 has no items")
    assert payload["extra"] == {"order": 99}


def test_a_record_the_api_refuses_is_counted_and_the_rest_of_its_batch_stored(
    api: Api, worker: Worker, clean: None
) -> None:
    reports: list[str] = []
    handler = AggregatorHandler(
        api.url, topic="refusals", batch_size=20, linger=5, report=reports.append
    )
    log = logging.Logger("refusals", logging.INFO)  # outside the registry: pytest stays out
    log.addHandler(handler)
    deep: dict[str, object] = {}
    for _ in range(40):
        deep = {"d": deep}
    for n in range(20):
        # JSON, but nested deeper than the API stores (32 levels): refused (422).
        log.info("record %d", n, extra={"deep": deep} if n == 13 else {"n": n})
    handler.close()
    counts = handler.counts()
    assert (counts.sent, counts.refused, counts.lost, counts.pending) == (19, 1, 0, 0)
    assert len(reports) == 1 and reports[0].startswith("the API refused 1 log records, e.g.")
    assert "must not be nested deeper than 32 levels" in reports[0]
    figures = settled_stats(api.url, received=19)
    assert figures["topics"]["refusals"] == {"stored": 19, "duplicates": 0, "failed": 0}
