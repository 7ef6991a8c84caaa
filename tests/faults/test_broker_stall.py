"""Redis stalls (DEBUG SLEEP): requests time out and are answered 503, Redis runs them later.

A client retries a 503 with the same Idempotency-Key, and the acceptance script finds the
record the stalled attempt left: the retry gets the first answer and nothing counts twice.
"""

from __future__ import annotations

import re
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import redis
import requests
from sqlalchemy import Engine

from aggregator_client.client import Client
from aggregator_client.outcomes import summarize
from scripts.services import RedisServer
from scripts.stack import Api
from scripts.stack import wait_until
from tests.faults.harness import PacedPublisher
from tests.faults.harness import Workers
from tests.faults.harness import assert_still_processing
from tests.faults.harness import check_invariants
from tests.faults.harness import fatal_lines
from tests.helpers import TableLock
from tests.helpers import assert_adds_up
from tests.helpers import make_event
from tests.helpers import publish
from tests.helpers import settled_stats


def stall(broker: RedisServer, seconds: float) -> None:
    """Freeze Redis for `seconds` (it answers nobody, then runs what was sent meanwhile)."""
    with redis.Redis.from_url(broker.url, socket_timeout=seconds + 5) as client:
        client.execute_command("DEBUG", "SLEEP", seconds)


def stalling(broker: RedisServer, seconds: float) -> threading.Thread:
    """Start a stall in the background and return once Redis is frozen."""
    frozen = threading.Thread(target=stall, args=(broker, seconds), daemon=True)
    frozen.start()
    with redis.Redis.from_url(broker.url, socket_timeout=0.2) as probe:

        def unresponsive() -> bool:
            try:
                probe.ping()
            except redis.TimeoutError:
                return True
            return False

        wait_until(unresponsive, timeout=5, interval=0.01)
    return frozen


def replays(api: Api) -> float:
    """Return how many publish requests the API answered from an earlier acceptance."""
    text = requests.get(f"{api.url}/metrics", timeout=10).text
    found = re.search(r"^aggregator_idempotent_replays_total (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


def test_five_stalls_during_a_verified_run_count_exactly(
    api: Api, worker: Workers, broker: RedisServer, engine: Engine, clean: None
) -> None:
    """Batches of 10, 8 concurrent, five 2 s stalls: every event counted once."""
    started = time.monotonic()
    worker.start()
    with PacedPublisher(
        api.url, 3000, spread=15.0, batch_size=10, concurrency=8, max_retries=20
    ) as run:
        for _ in range(5):
            wait_until(lambda: run.answered() > 0, timeout=30)
            stall(broker, 2)
            before = run.answered()
            wait_until(lambda before=before: run.done() or run.answered() > before + 5, timeout=30)
        summary = run.wait(timeout=120)
    assert summary.errors == 0, summary.first_error
    # The scenario happened: attempts that timed out were run by Redis after the stall,
    # and their retries were answered from the idempotency records.
    assert summary.statuses == {"202": len(run.sent)}
    assert replays(api) >= 1
    check_invariants(
        "broker-stalls",
        run=run,
        summary=summary,
        api=api,
        engine=engine,
        broker=broker,
        started=started,
        faults=5,
    )
    # Nothing was uncertain: every request ended in a 202, so the counts are exact.
    assert summary.ambiguous == 0


def post(api: Api, body: object, key: str, timeout: float = 10) -> requests.Response:
    return requests.post(
        f"{api.url}/publish", json=body, headers={"Idempotency-Key": key}, timeout=timeout
    )


@pytest.fixture
def one_process_api(fault_env: dict[str, str], logs: Path) -> Iterator[Api]:
    """gunicorn with one worker process, so a warm-up request warms the one that answers."""
    server = Api(fault_env, logs / "faults-api.log", workers=1).start()
    yield server
    server.stop()


def test_same_key_after_a_503_concurrently_and_in_sequence_counts_once(
    one_process_api: Api, worker: Workers, broker: RedisServer, engine: Engine, clean: None
) -> None:
    api = one_process_api
    worker.start()
    # Warm up first: the acceptance script must be loaded into Redis and the process must
    # hold an open connection, or the stalled attempt fails before Redis could run it
    # (an unknown EVALSHA, or the handshake of a new connection timing out).
    assert post(api, make_event("warm-up", topic="warm"), uuid.uuid4().hex).status_code == 202
    key = f"order-{uuid.uuid4().hex}"
    body = [make_event(f"k-{i}", topic="keyed") for i in range(5)]
    frozen = stalling(broker, 2)
    first = post(api, body, key)
    frozen.join()
    # Redis ran the stalled acceptance after the API had given up on it.
    assert first.status_code == 503, first.text
    assert first.headers["Retry-After"]

    second = post(api, body, key)
    assert second.status_code == 202, second.text
    assert second.headers.get("Idempotent-Replayed") == "true"
    batch_id = second.json()["batch_id"]
    with ThreadPoolExecutor(3) as pool:
        again = list(pool.map(lambda _: post(api, body, key), range(3)))
    assert [r.status_code for r in again] == [202] * 3
    assert {r.json()["batch_id"] for r in again} == {batch_id}
    assert all(r.json() == second.json() for r in again)

    other = post(api, [make_event("k-x", topic="keyed")], key)
    assert other.status_code == 422
    assert "Idempotency-Key" in other.json()["errors"]

    fresh = f"fresh-{uuid.uuid4().hex}"
    with ThreadPoolExecutor(3) as pool:
        racing = list(
            pool.map(lambda _: post(api, [make_event("k-r", topic="keyed")], fresh), range(3))
        )
    assert [r.status_code for r in racing] == [202] * 3
    assert len({r.json()["batch_id"] for r in racing}) == 1

    figures = settled_stats(api.url, received=7, timeout=30)
    assert figures["topics"]["keyed"] == {"stored": 6, "duplicates": 0, "failed": 0}
    assert_adds_up(figures, engine, sent=7)


def test_bad_idempotency_keys_are_422_naming_the_header(api: Api, clean: None) -> None:
    for key in ["", "x" * 201, "caf\u00e9", "tab\there"]:
        response = requests.post(
            f"{api.url}/publish",
            json=make_event("bad-key"),
            headers={"Idempotency-Key": key.encode().decode("latin-1")},
            timeout=10,
        )
        assert response.status_code == 422, (key, response.text)
        assert "Idempotency-Key" in response.json()["errors"]


def test_a_client_that_gives_up_on_a_503_counts_it_as_possibly_accepted(
    one_process_api: Api, worker: Workers, broker: RedisServer, engine: Engine, clean: None
) -> None:
    api = one_process_api
    worker.start()
    # Warm up, as above, so the stalled attempt reaches Redis.
    assert post(api, make_event("warm-up", topic="warm"), uuid.uuid4().hex).status_code == 202
    batch = [make_event(f"g-{i}", topic="given-up") for i in range(5)]
    frozen = stalling(broker, 2)
    with Client(api.url, max_retries=0) as client:
        outcome = client.publish_batch(batch)
    frozen.join()
    # The API answered 503, and Redis ran the acceptance after the stall.
    assert (outcome.final, outcome.accepted) == ("503", False)
    summary = summarize(len(batch), [outcome], 1.0, ["given-up"])
    assert (summary.sent, summary.ambiguous, summary.uncertain_unique) == (0, 5, 5)
    figures = settled_stats(api.url, received=6)
    # Stored although never answered 202: within the client's ambiguous window.
    assert figures["total_received_queued"] - 1 <= summary.sent + summary.ambiguous
    assert_adds_up(figures, engine, sent=6)


# Spins inside Redis for ARGV[1] seconds: past busy-reply-threshold every other
# client is answered BUSY, as when a long script runs.
_SPIN = """
local start = redis.call('TIME')
while true do
  local now = redis.call('TIME')
  if (now[1] - start[1]) * 1000000 + (now[2] - start[2]) > tonumber(ARGV[1]) * 1000000 then
    return 1
  end
end
"""


def test_workers_survive_a_busy_redis_and_store_each_batch_once(
    api: Api, worker: Workers, broker: RedisServer, engine: Engine, clean: None
) -> None:
    """A batch commits while Redis answers BUSY: its ack fails, the worker stays, counts exact."""
    crew = worker.start()
    with redis.Redis.from_url(broker.url) as client:
        client.config_set("busy-reply-threshold", 100)
    lock = TableLock(engine)
    try:
        publish(api.url, [make_event(f"busy-{i}", topic="busy") for i in range(20)])
        lock.wait_for_blocked_tasks(1)
        spinner = threading.Thread(
            target=lambda: redis.Redis.from_url(broker.url, socket_timeout=30).eval(_SPIN, 0, 3),
            daemon=True,
        )
        spinner.start()
        with redis.Redis.from_url(broker.url, socket_timeout=2) as probe:
            wait_until(lambda: _answers_busy(probe), timeout=5, interval=0.05)
    finally:
        lock.release()  # the batch commits now; its ack meets BUSY
    spinner.join(timeout=30)
    figures = settled_stats(api.url, received=20, timeout=60)
    assert figures["topics"]["busy"] == {"stored": 20, "duplicates": 0, "failed": 0}
    assert_adds_up(figures, engine, sent=20)
    assert fatal_lines(worker) == []
    assert crew.executor.running()
    assert_still_processing(api.url)


def _answers_busy(client: redis.Redis) -> bool:
    try:
        client.ping()
    except redis.ResponseError as exc:
        return str(exc).startswith("BUSY")
    return False
