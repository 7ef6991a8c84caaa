"""The noisy-neighbour suite's clients: a well-behaved one that measures, abusive ones that don't.

`GoodClient` runs in the test's process: one thread publishes one event per
request, another reads pages of the same topic, both paced, every answer timed
(a timeout or a connection error counts as a failure). The abusive clients run
in processes of their own, so they never take the test's GIL from the good
client: `python -m tests.abuse.noisy <kind> --url URL --token TOKEN --seconds S`
prints `running` once it is at work and, when done, one JSON line summing up
what it was answered. `Abuser` starts one and reads both.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import secrets
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from collections.abc import Iterator
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path
from typing import IO
from typing import Any

import orjson
import requests

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 10.0
# The API's MAX_BODY_BYTES default (app.config); a number here, so old code can run it too.
BODY_LIMIT = 2 * 1024 * 1024
# A 503 that says the broker's backlog is over its budget (BROKER_MAX_BACKLOG_BYTES).
BACKLOG_FULL = "503 backlog full"
# The suite's API takes these two (tests/abuse/conftest.py).
GOOD_TOKEN = "good-" + secrets.token_hex(24)
ABUSER_TOKEN = "abuser-" + secrets.token_hex(24)


def make_event(event_id: str, topic: str, **payload: Any) -> dict[str, Any]:
    return {
        "topic": topic,
        "event_id": event_id,
        "timestamp": "2026-03-01T08:00:00+00:00",
        "source": "noisy",
        "payload": payload or {"n": event_id},
    }


# --- the well-behaved client ----------------------------------------------------------------


def topic_stored(url: str, topic: str) -> int:
    """Return how many events of one topic the database holds, from /stats/topics."""
    response = requests.get(
        f"{url}/stats/topics",
        params={"prefix": topic},
        headers={"Authorization": f"Bearer {GOOD_TOKEN}"},
        timeout=10,
    )
    assert response.status_code == 200, response.text
    return sum(row["stored"] for row in response.json()["topics"] if row["topic"] == topic)


@dataclass
class Measured:
    """What the good client saw in one phase."""

    latencies: list[float] = field(default_factory=list)
    statuses: Counter[Any] = field(default_factory=Counter)
    accepted: int = 0
    missing_headers: int = 0

    @property
    def p99(self) -> float:
        return statistics.quantiles(self.latencies, n=100)[98]

    @property
    def failures(self) -> dict[Any, int]:
        """Answers other than 200/202: 4xx and 5xx, timeouts, connection errors."""
        return {status: n for status, n in self.statuses.items() if status not in (200, 202)}

    def describe(self) -> str:
        return (
            f"{len(self.latencies)} requests, p50 {statistics.median(self.latencies) * 1000:.0f}"
            f" ms, p99 {self.p99 * 1000:.0f} ms, max {max(self.latencies) * 1000:.0f} ms,"
            f" statuses {dict(self.statuses)}"
        )


class GoodClient:
    """Publishes one event per request and reads pages, paced, timing every answer."""

    def __init__(self, url: str, token: str, topic: str, pause: float = 0.01) -> None:
        self.url = url
        self.headers = {"Authorization": f"Bearer {token}"}
        self.topic = topic
        self.pause = pause
        self._sent = 0

    def run(self, seconds: float) -> Measured:
        """Publish and read for `seconds`; return what was seen."""
        measured = Measured()
        lock = threading.Lock()
        deadline = time.monotonic() + seconds

        def timed(session: requests.Session, method: str, path: str, **kwargs: Any) -> None:
            started = time.perf_counter()
            try:
                response = session.request(
                    method, f"{self.url}{path}", headers=self.headers, timeout=TIMEOUT, **kwargs
                )
                status: Any = response.status_code
            except requests.RequestException as exc:
                response, status = None, type(exc).__name__
            elapsed = time.perf_counter() - started
            with lock:
                measured.latencies.append(elapsed)
                measured.statuses[status] += 1
                if response is not None:
                    if "X-Content-Type-Options" not in response.headers:
                        measured.missing_headers += 1
                    if status == 202:
                        measured.accepted += response.json()["accepted"]

        def publish() -> None:
            with requests.Session() as session:
                while time.monotonic() < deadline:
                    with lock:
                        self._sent += 1
                        event_id = f"{self.topic}-{self._sent}"
                    timed(session, "POST", "/publish", json=make_event(event_id, self.topic))
                    time.sleep(self.pause)

        def read() -> None:
            with requests.Session() as session:
                while time.monotonic() < deadline:
                    timed(session, "GET", "/events", params={"topic": self.topic, "limit": 100})
                    time.sleep(self.pause * 2)

        threads = [threading.Thread(target=publish), threading.Thread(target=read)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return measured


class Abuser:
    """An abusive client in a process of its own (this module run as a command)."""

    def __init__(
        self,
        kind: str,
        url: str,
        token: str,
        seconds: float,
        *extra: str,
        env: dict[str, str] | None = None,
    ) -> None:
        self.seconds = seconds
        command = [sys.executable, "-m", "tests.abuse.noisy", kind, "--url", url]
        command += ["--token", token, "--seconds", str(seconds), *extra]
        self.process = subprocess.Popen(
            command, cwd=ROOT, stdout=subprocess.PIPE, text=True, env={**os.environ, **(env or {})}
        )
        assert self.process.stdout is not None
        self._stdout: IO[str] = self.process.stdout

    def wait_running(self, timeout: float = 30) -> None:
        """Wait until it says it is at work."""
        line = self._stdout.readline()
        if line.strip() != "running":
            self.process.kill()
            raise RuntimeError(f"abuser did not start: {line!r}")

    def summary(self) -> dict[str, Any]:
        """Wait for it to finish; return its JSON summary."""
        out, _ = self.process.communicate(timeout=self.seconds + 120)
        assert self.process.returncode == 0, out
        return json.loads(out.strip().splitlines()[-1])

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


# --- abusive clients (each in its own process) -------------------------------------------


class Tally:
    """Answers an abuser got, from its threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.statuses: Counter[str] = Counter()
        self.largest_answer = 0
        self.content_types: Counter[str] = Counter()
        self.accepted: list[tuple[float, float, int]] = []  # (sent, answered, events)

    def add(self, status: Any, answer: bytes = b"", content_type: str = "") -> None:
        with self.lock:
            self.statuses[str(status)] += 1
            self.largest_answer = max(self.largest_answer, len(answer))
            if content_type:
                self.content_types[content_type.split(";")[0]] += 1

    def summary(self) -> dict[str, Any]:
        return {
            "statuses": dict(self.statuses),
            "largest_answer": self.largest_answer,
            "content_types": dict(self.content_types),
            "accepted": self.accepted,
        }


def hammer(threads: int, seconds: float, attempt: Callable[[requests.Session, int], None]) -> None:
    """Run `attempt` in a loop on `threads` threads, each with its own session, for `seconds`."""
    deadline = time.monotonic() + seconds

    def loop(number: int) -> None:
        with requests.Session() as session:
            while time.monotonic() < deadline:
                attempt(session, number)

    workers = [threading.Thread(target=loop, args=(n,), daemon=True) for n in range(threads)]
    for worker in workers:
        worker.start()
    print("running", flush=True)
    for worker in workers:
        worker.join(timeout=seconds + 60)


def post(
    tally: Tally, session: requests.Session, url: str, body: bytes | Iterator[bytes], **headers: str
) -> requests.Response | None:
    try:
        response = session.post(
            f"{url}/publish",
            data=body,
            headers={"Content-Type": "application/json", **headers},
            timeout=60,
        )
    except requests.RequestException as exc:
        tally.add(type(exc).__name__)
        return None
    tally.add(response.status_code, response.content, response.headers.get("Content-Type", ""))
    return response


def unknown_keys(args: argparse.Namespace, tally: Tally) -> None:
    """Row 1: bodies of unknown keys as large as --body-bytes allows, and of just under the cap
    on values (before: 700,000 keys, ~7 MB, under the 8 MiB limit then)."""
    keys = args.body_bytes // 12  # `"k123456":1,` is 12 bytes at most: the body fits
    huge = orjson.dumps({f"k{n}": 1 for n in range(keys)})
    # MAX_BODY_VALUES (app.schemas) less a few; a number here, so old code can run it too.
    under_cap = orjson.dumps({f"k{n}": 1 for n in range(99_990)})
    auth = {"Authorization": f"Bearer {args.token}"}

    def attempt(session: requests.Session, number: int) -> None:
        post(tally, session, args.url, huge if number % 2 else under_cap, **auth)

    hammer(args.threads, args.seconds, attempt)


def filler_for(body_bytes: int) -> str:
    """Text that makes a batch of 1,000 `make_event`s (32-character ids) just fit `body_bytes`."""
    bare = len(orjson.dumps(make_event(uuid.uuid4().hex, "noisy-topic-" + "x" * 20, text="")))
    return "x" * ((body_bytes - 4096) // 1000 - bare - 1)


def huge_bodies(args: argparse.Namespace, tally: Tally) -> None:
    """Row 2: many concurrent publishes of 1,000 events at the body limit, the last invalid."""
    filler = filler_for(args.body_bytes)
    events = [make_event(f"huge-{n}", "noisy-huge", text=filler) for n in range(1000)]
    events[-1]["topic"] = ""  # refused after the whole body was parsed and validated
    body = orjson.dumps(events)
    auth = {"Authorization": f"Bearer {args.token}"}

    def attempt(session: requests.Session, number: int) -> None:
        post(tally, session, args.url, body, **auth)

    hammer(args.threads, args.seconds, attempt)


def fat_batches(args: argparse.Namespace, tally: Tally) -> None:
    """Row 3: valid batches of 1,000 new events at the body limit, to --topic, back to back."""
    filler = filler_for(args.body_bytes)
    auth = {"Authorization": f"Bearer {args.token}"}

    def attempt(session: requests.Session, number: int) -> None:
        events = [make_event(uuid.uuid4().hex, args.topic, text=filler) for _ in range(1000)]
        sent = time.time()
        response = post(tally, session, args.url, orjson.dumps(events), **auth)
        if response is not None and response.status_code == 202:
            with tally.lock:
                tally.accepted.append((sent, time.time(), response.json()["accepted"]))
        if response is not None and response.status_code == 503 and b"backlog" in response.content:
            with tally.lock:  # back-pressure, told apart from a broker that did not answer
                tally.statuses[BACKLOG_FULL] += 1
                tally.statuses["503"] -= 1
                if not tally.statuses["503"]:
                    del tally.statuses["503"]

    hammer(args.threads, args.seconds, attempt)


def wrong_tokens(args: argparse.Namespace, tally: Tally) -> None:
    """Row 9: guess tokens from the good client's address, with forged X-Forwarded-For or not."""

    def attempt(session: requests.Session, number: int) -> None:
        headers = {"Authorization": f"Bearer guess-{uuid.uuid4().hex}"}
        if args.forge:
            headers["X-Forwarded-For"] = f"198.51.100.{random.randrange(1, 255)}"
        try:
            response = session.get(f"{args.url}/stats", headers=headers, timeout=TIMEOUT)
            tally.add(response.status_code)
        except requests.RequestException as exc:
            tally.add(type(exc).__name__)
        time.sleep(0.005)

    hammer(args.threads, args.seconds, attempt)


def budget_bursts(args: argparse.Namespace, tally: Tally) -> None:
    """Row 11: spend one token's budget as fast as many connections can, across processes."""
    auth = {"Authorization": f"Bearer {args.token}"}

    def attempt(session: requests.Session, number: int) -> None:
        events = [make_event(uuid.uuid4().hex, "noisy-budget") for _ in range(args.events)]
        sent = time.time()
        response = post(tally, session, args.url, orjson.dumps(events), **auth)
        if response is not None and response.status_code == 202:
            with tally.lock:
                tally.accepted.append((sent, time.time(), response.json()["accepted"]))

    hammer(args.threads, args.seconds, attempt)


def edge_cases(args: argparse.Namespace, tally: Tally) -> None:
    """Row 13: request lines over gunicorn's limit, and chunked bodies over MAX_BODY_BYTES."""
    host, port = args.url.removeprefix("http://").split(":")
    piece = b'"' + b"x" * 65_000 + b'",'

    def chunks() -> Iterator[bytes]:
        yield b"["
        for _ in range(140):  # ~9.1 MB
            yield piece
        yield b"1]"

    def attempt(session: requests.Session, number: int) -> None:
        if number % 2:
            connection = http.client.HTTPConnection(host, int(port), timeout=TIMEOUT)
            try:
                connection.request(
                    "GET",
                    "/events?topic=" + "x" * 5000,
                    headers={"Authorization": f"Bearer {args.token}"},
                )
                response = connection.getresponse()
                answer = response.read()
                tally.add(response.status, answer, response.getheader("Content-Type") or "")
                if response.getheader("X-Content-Type-Options") != "nosniff":
                    tally.add("no-nosniff")
            except OSError as exc:
                tally.add(type(exc).__name__)
            finally:
                connection.close()
        else:
            post(tally, session, args.url, chunks(), Authorization=f"Bearer {args.token}")

    hammer(args.threads, args.seconds, attempt)


def forged_tasks(args: argparse.Namespace, tally: Tally) -> None:
    """Row 10: queue store_batch directly, as a Flower login could, with a 1,000-character topic."""
    from tasks import celery_app

    print("running", flush=True)
    deadline = time.monotonic() + args.seconds
    while time.monotonic() < deadline:
        bad = make_event(uuid.uuid4().hex, "noisy-forged-" + "x" * 1000)
        celery_app.send_task("tasks.ingest.store_batch", args=[uuid.uuid4().hex, [bad]])
        tally.add("sent")
        time.sleep(0.02)


KINDS: dict[str, Callable[[argparse.Namespace, Tally], None]] = {
    "unknown-keys": unknown_keys,
    "huge-bodies": huge_bodies,
    "fat-batches": fat_batches,
    "wrong-tokens": wrong_tokens,
    "budget-bursts": budget_bursts,
    "edge-cases": edge_cases,
    "forged-tasks": forged_tasks,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.abuse.noisy")
    parser.add_argument("kind", choices=sorted(KINDS))
    parser.add_argument("--url", required=True)
    parser.add_argument("--token", required=True)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--events", type=int, default=20)
    parser.add_argument("--forge", action="store_true")
    parser.add_argument("--body-bytes", type=int, default=BODY_LIMIT)
    parser.add_argument("--topic", default="noisy-fat")
    args = parser.parse_args(argv)
    tally = Tally()
    KINDS[args.kind](args, tally)
    print(json.dumps(tally.summary()), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
