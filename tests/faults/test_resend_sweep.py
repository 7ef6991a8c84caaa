"""The resend sweep with thousands of overdue batches: Redis is never held long, nothing is resent
that is still queued, and what the broker really lost is resent once.

The sweep used to search the whole queue (LPOS) for every overdue batch inside one script:
4,000 overdue batches held Redis 4.5 s per sweep, 8,000 held it 15.9 s and ended the worker
("BUSY"). Real Redis; the sweep runs in-process as a worker's main process runs it.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from sqlalchemy import Engine

from scripts.services import RedisServer
from scripts.services import private_redis
from tasks.broker_state import check
from tasks.messages import build_message
from tasks.pending import QUEUE_KEY
from tasks.pending import SENT_KEY
from tasks.pending import SUSPECT_KEY
from tasks.pending import Scripts
from tasks.resend import sweep
from tests.faults.harness import report

OVERDUE = 8000


@pytest.fixture
def crowded(scratch_dir: Path, engine: Engine) -> Iterator[RedisServer]:
    """A broker holding OVERDUE accepted batches that no worker has taken, all overdue."""
    with private_redis(scratch_dir / f"redis-sweep-{uuid.uuid4().hex[:6]}") as server:
        client = redis.Redis.from_url(server.url)
        check(engine, client, f"redis://sweep-{uuid.uuid4().hex}/0", wanted=OVERDUE)
        scripts = Scripts(client)
        for n in range(OVERDUE):
            batch_id = uuid.uuid4().hex
            event = {
                "topic": "sweep",
                "event_id": batch_id,
                "timestamp": "2026-03-01T08:00:00+00:00",
                "source": "s",
                "payload": {"n": n},
            }
            reply = scripts.accept(
                batch_id,
                build_message(batch_id, [event]),
                1,
                [],
                max_backlog_bytes=10**10,
                idempotency_ttl=60,
                max_idempotency_records=10,
            )
            assert reply.status == "OK", reply
        # Sent an hour ago, as far as the sweep can tell.
        client.zadd(
            SENT_KEY, {k: s - 3600 for k, s in client.zrange(SENT_KEY, 0, -1, withscores=True)}
        )
        client.close()
        yield server


def test_a_sweep_over_thousands_of_overdue_batches_never_holds_redis(
    crowded: RedisServer, engine: Engine
) -> None:
    client = redis.Redis.from_url(crowded.url)
    client.config_set("slowlog-log-slower-than", 100_000)  # 100 ms
    client.slowlog_reset()
    # A publisher's view meanwhile: a command with the API's 0.5 s timeout.
    probe = redis.Redis.from_url(crowded.url, socket_timeout=0.5)
    stalls: list[float] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            started = time.monotonic()
            try:
                probe.ping()
            except redis.TimeoutError:
                stalls.append(time.monotonic() - started)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    started = time.monotonic()
    try:
        resent = [sweep(engine, client, older_than=30, confirm_after=0) for _ in range(2)]
    finally:
        done.set()
        watcher.join()
    took = time.monotonic() - started
    slow = client.slowlog_get(10)
    report(
        "resend-sweep-8000-overdue",
        events_sent=OVERDUE,
        acknowledged=OVERDUE,
        lost=0,
        double_counted=0,
        duration_s=took,
        sweeps=2,
        slowest_redis_command_ms=max((e["duration"] / 1000 for e in slow), default=0),
        probe_timeouts=len(stalls),
    )
    # Everything is still queued: nothing resent, nothing even suspected.
    assert resent == [0, 0]
    assert client.zcard(SUSPECT_KEY) == 0 and client.llen(QUEUE_KEY) == OVERDUE
    assert slow == [], [(e["command"][:60], e["duration"]) for e in slow]
    assert stalls == []

    # Now the broker loses ten messages (a worker killed between BRPOP and HSET):
    # two sweeps later, exactly those ten are back on the queue, once each.
    lost = [client.rpop(QUEUE_KEY) for _ in range(10)]
    assert sweep(engine, client, older_than=30, confirm_after=0) == 0  # first seen missing
    assert sweep(engine, client, older_than=30, confirm_after=0) == 10
    queue = client.lrange(QUEUE_KEY, 0, -1)
    assert len(queue) == OVERDUE and all(queue.count(message) == 1 for message in lost)
    client.close()
    probe.close()
