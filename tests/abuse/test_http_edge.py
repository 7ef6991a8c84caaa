"""Noisy neighbours at the HTTP edge (issue 19 rows 1, 2, 9, 10, 11, 13), against real processes.

Each test starts an API as production runs it (2 gevent processes, tokens,
default budgets) beside this module's Celery worker, measures a well-behaved
client alone (one event per publish, pages of its topic), then again while one
abusive client (a process of its own) does its worst, and checks that the good
client saw no error, timeout or refusal, that its p99 stayed within 3x of its
own figure alone (or under P99_FLOOR, for a noisy 2-core machine), and that its
events were all stored afterwards. Each also checks what the abuser was
answered.
"""

from __future__ import annotations

import re
import threading
import uuid
from collections.abc import Callable
from typing import Any

import orjson
import psutil
import redis
from sqlalchemy import Engine
from sqlalchemy import func
from sqlalchemy import select

from app.db import events as events_table
from scripts.services import RedisServer
from scripts.stack import Api
from scripts.stack import Worker
from scripts.stack import wait_until
from tasks.pending import QUEUE_KEY
from tests.abuse.noisy import ABUSER_TOKEN
from tests.abuse.noisy import BACKLOG_FULL
from tests.abuse.noisy import GOOD_TOKEN
from tests.abuse.noisy import Abuser
from tests.abuse.noisy import GoodClient
from tests.abuse.noisy import Measured
from tests.abuse.noisy import topic_stored

# A p99 under this passes whatever it was alone: on two shared cores an abuser
# busy in its own process slows everything (a busy machine: a few hundred ms, and
# 1.05 s once beside 60 senders at the body limit while another suite ran); the
# failures this suite exists for are stalls of many seconds and refusals.
P99_FLOOR = 1.5
# Half of the API's broker timeout (0.5 s): a command holding Redis longer than this
# starts to turn other clients' publishes into 503s.
SLOW_COMMAND_MICROSECONDS = 250_000
ALONE_SECONDS = 5.0
ABUSE_SECONDS = 10.0


def beside(
    api: Api, kind: str, *extra: str, env: dict[str, str] | None = None
) -> tuple[str, Measured, Measured, dict[str, Any]]:
    """Measure the good client alone, then beside the abuser; return topic, both and its summary."""
    topic = f"good-{uuid.uuid4().hex[:8]}"
    good = GoodClient(api.url, GOOD_TOKEN, topic)
    alone = good.run(ALONE_SECONDS)
    abuser = Abuser(kind, api.url, ABUSER_TOKEN, ABUSE_SECONDS, *extra, env=env)
    try:
        abuser.wait_running()
        during = good.run(ABUSE_SECONDS - 2)
        summary = abuser.summary()
    finally:
        abuser.stop()
    return topic, alone, during, summary


def assert_unharmed(alone: Measured, during: Measured) -> None:
    assert not alone.failures, f"alone: {alone.describe()}"
    assert not during.failures, f"beside the abuser: {during.describe()}"
    limit = max(3 * alone.p99, P99_FLOOR)
    assert during.p99 <= limit, f"alone: {alone.describe()}; beside: {during.describe()}"


def test_bodies_of_unknown_keys_cost_little_and_are_answered_briefly(
    abuse_api: Callable[..., Api], abuse_worker: Worker, drained: Callable[..., None]
) -> None:
    # Before: ~9 s of CPU on the event loop and a 21 MB 422 for each 7 MB body.
    api = abuse_api()
    topic, alone, during, abuse = beside(api, "unknown-keys", "--threads", "4")
    assert_unharmed(alone, during)
    # A body refused before it is read (429: the budget is charged first) has its
    # connection closed once 64 KiB of it were discarded (app.gunicorn_conf), so a
    # sender still writing may meet the reset before it reads the answer.
    statuses = abuse["statuses"]
    assert set(statuses) <= {"413", "422", "429", "ConnectionError"}, abuse
    assert abuse["largest_answer"] < 4096, abuse
    drained(api.url, topic, alone.accepted + during.accepted)


class PeakRss:
    """The API's largest resident memory (master and workers together) while it runs."""

    def __init__(self, api: Api) -> None:
        self.root = psutil.Process(api.executor.process.pid)  # type: ignore[union-attr]
        self.start = self.peak = self.sample()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> int:
        processes = [self.root, *self.root.children(recursive=True)]
        total = 0
        for process in processes:
            try:
                total += process.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        return total

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            self.peak = max(self.peak, self.sample())

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def test_sixty_concurrent_publishes_at_the_body_limit_bound_memory_and_leave_others_served(
    abuse_api: Callable[..., Api], abuse_worker: Worker, drained: Callable[..., None]
) -> None:
    # Before: API RSS 1.18 GB, the event loop blocked past gunicorn's timeout,
    # workers killed and in-flight requests dropped.
    api = abuse_api()
    with PeakRss(api) as rss:
        topic, alone, during, abuse = beside(api, "huge-bodies", "--threads", "60")
    assert_unharmed(alone, during)
    growth = rss.peak - rss.start
    assert growth < 600 * 2**20, f"API RSS grew by {growth / 2**20:.0f} MiB"
    # ConnectionError: refused before its body was read, the connection closes
    # once 64 KiB of it were discarded, while the client is still sending.
    assert set(abuse["statuses"]) <= {"422", "429", "503", "ConnectionError"}, abuse
    assert abuse["statuses"].get("422", 0) > 0, abuse  # some were parsed and validated
    drained(api.url, topic, alone.accepted + during.accepted)


def test_max_size_batches_hold_redis_briefly_and_leave_others_served(
    abuse_api: Callable[..., Api],
    abuse_worker: Worker,
    abuse_broker: RedisServer,
    drained: Callable[..., None],
) -> None:
    # Before: 1,000 x 8 KB batches held Redis 0.5-0.7 s per acceptance, past the 0.5 s
    # broker timeout: other tenants' small publishes got 503 seven times in nine, and
    # the big batches were answered 503 though accepted.
    api = abuse_api()
    fat_topic = f"noisy-fat-{uuid.uuid4().hex[:8]}"
    broker = redis.Redis.from_url(abuse_broker.url)
    # Every command that holds Redis longer than half the broker timeout is logged.
    broker.config_set("slowlog-log-slower-than", SLOW_COMMAND_MICROSECONDS)
    broker.slowlog_reset()
    try:
        topic, alone, during, abuse = beside(
            api, "fat-batches", "--threads", "2", "--topic", fat_topic
        )
        slow = [(entry["duration"], entry["command"][:40]) for entry in broker.slowlog_get(100)]
    finally:
        broker.config_set("slowlog-log-slower-than", 10_000)
    assert_unharmed(alone, during)
    # No 503 but back-pressure: none of them ambiguous (accepted though refused).
    assert set(abuse["statuses"]) <= {"202", "429", BACKLOG_FULL}, abuse
    accepted = sum(events for _, _, events in abuse["accepted"])
    assert accepted >= 1000, abuse
    assert not slow, f"commands that held Redis over {SLOW_COMMAND_MICROSECONDS} µs: {slow}"
    drained(api.url, topic, alone.accepted + during.accepted)
    # Every fat batch answered 202 is stored, once.
    wait_until(lambda: topic_stored(api.url, fat_topic) == accepted, timeout=180, interval=0.5)


def test_failed_logins_from_an_address_never_lock_out_its_valid_tokens(
    abuse_api: Callable[..., Api], abuse_worker: Worker, drained: Callable[..., None]
) -> None:
    # Before: 20 failed logins from an address locked every valid token there out for 60 s.
    api = abuse_api()
    topic, alone, during, abuse = beside(api, "wrong-tokens", "--threads", "2")
    assert_unharmed(alone, during)
    refused = abuse["statuses"].get("429", 0)
    assert refused > 0.8 * sum(abuse["statuses"].values()), abuse  # the guessing is limited
    drained(api.url, topic, alone.accepted + during.accepted)


def test_forged_x_forwarded_for_around_the_proxy_dodges_no_limit(
    abuse_api: Callable[..., Api], abuse_worker: Worker, drained: Callable[..., None]
) -> None:
    # Before: with PROXY_HOPS set, a client reaching gunicorn directly named any
    # address in X-Forwarded-For: each forged one had a failed-login budget of its own.
    api = abuse_api(PROXY_HOPS="1", TRUSTED_PROXIES="10.255.255.1")
    topic, alone, during, abuse = beside(api, "wrong-tokens", "--threads", "2", "--forge")
    assert_unharmed(alone, during)
    refused = abuse["statuses"].get("429", 0)
    assert refused > 0.8 * sum(abuse["statuses"].values()), abuse
    drained(api.url, topic, alone.accepted + during.accepted)


def test_tasks_queued_around_the_api_are_refused_by_the_workers(
    abuse_api: Callable[..., Api],
    abuse_worker: Worker,
    abuse_env: dict[str, str],
    engine: Engine,
    drained: Callable[..., None],
) -> None:
    # Before: a Flower login (or anyone with the broker) queued store_batch with
    # a 1,000-character topic and the worker stored it.
    api = abuse_api()
    topic, alone, during, abuse = beside(
        api, "forged-tasks", env={"REDIS_URL": abuse_env["REDIS_URL"]}
    )
    assert_unharmed(alone, during)
    drained(api.url, topic, alone.accepted + during.accepted)
    sent = abuse["statuses"]["sent"]
    with redis.Redis.from_url(abuse_env["REDIS_URL"]) as broker:
        try:
            wait_until(lambda: broker.llen(QUEUE_KEY) == 0, timeout=60)
        except TimeoutError:
            raise AssertionError(f"{broker.llen(QUEUE_KEY)} tasks still queued") from None

    def refused() -> int:
        return abuse_worker.output().count("refused, nothing stored")

    try:
        wait_until(lambda: refused() >= sent, timeout=60)
    except TimeoutError:
        tail = abuse_worker.output()[-3000:]
        raise AssertionError(f"{refused()} of {sent} forged tasks refused; {tail}") from None
    with engine.connect() as conn:
        forged = conn.execute(
            select(func.count())
            .select_from(events_table)
            .where(events_table.c.topic.like("noisy-forged-%"))
        ).scalar_one()
    assert forged == 0


def admitted_in_any_second(accepted: list[list[float]]) -> int:
    """The most events admitted by requests both sent and answered within one second."""
    worst = 0
    for sent, _, _ in accepted:
        inside = sum(n for s, answered, n in accepted if s >= sent and answered <= sent + 1.0)
        worst = max(worst, inside)
    return worst


def test_a_budget_holds_within_a_fifth_in_any_second_across_processes(
    abuse_api: Callable[..., Api], abuse_worker: Worker, drained: Callable[..., None]
) -> None:
    # Before: 2.0x per window, up to 4.0x in a sliding second.
    api = abuse_api(RATE_LIMIT="600 per second")
    topic, alone, during, abuse = beside(api, "budget-bursts", "--threads", "16", "--events", "20")
    assert_unharmed(alone, during)
    worst = admitted_in_any_second(abuse["accepted"])
    assert worst <= 1.2 * 600, f"{worst} events admitted within one second; {abuse['statuses']}"
    assert worst >= 0.5 * 600  # and the budget was there to be spent
    drained(api.url, topic, alone.accepted + during.accepted)


def test_over_long_lines_and_chunked_floods_are_refused_as_json(
    abuse_api: Callable[..., Api], abuse_worker: Worker, drained: Callable[..., None]
) -> None:
    # Before: gunicorn's 414 was an HTML page, chunked bodies over 8 MiB got 400,
    # no answer carried nosniff or a CSP, and access lines lacked the client's address.
    api = abuse_api()
    topic, alone, during, abuse = beside(api, "edge-cases", "--threads", "2")
    assert_unharmed(alone, during)
    assert during.missing_headers == 0
    refusals = {"413", "414", "429", "ConnectionError"}  # cut off past the limit, mid-send
    assert {"413", "414"} <= set(abuse["statuses"]) <= refusals, abuse
    assert set(abuse["content_types"]) == {"application/json"}, abuse
    text = api.log.read_text().splitlines()
    lines = [orjson.loads(line) for line in text if line.startswith("{")]
    access = [line for line in lines if line["logger"] == "gunicorn.access"]
    assert access and all(line["client"] == "127.0.0.1" for line in access)
    # A request line gunicorn refuses never reaches the app: its line names the address.
    assert any("Invalid request from ip=127.0.0.1" in line["message"] for line in lines)
    assert not any(re.search(r"<html", str(line)) for line in lines)
    drained(api.url, topic, alone.accepted + during.accepted)
