"""Redis stopped or killed mid-run: fast 503s, then recovery without restarts."""

from __future__ import annotations

import time
import uuid

import pytest
import requests
from sqlalchemy import Engine

from aggregator_client.outcomes import percentile
from scripts.services import RedisServer
from scripts.stack import Api
from scripts.stack import wait_until
from tests.faults.harness import PacedPublisher
from tests.faults.harness import Probe
from tests.faults.harness import Workers
from tests.faults.harness import assert_broker_drained
from tests.faults.harness import assert_still_processing
from tests.faults.harness import check_invariants
from tests.faults.harness import fatal_lines
from tests.faults.harness import ledger
from tests.faults.harness import probe_publish
from tests.faults.harness import report
from tests.faults.harness import stored_keys
from tests.helpers import TableLock
from tests.helpers import make_event
from tests.helpers import stats

# --- 2. broker outage -------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["stop", "kill"])
def test_broker_outage_gives_fast_503s_and_recovers_without_restarts(
    how: str,
    api: Api,
    worker: Workers,
    broker: RedisServer,
    engine: Engine,
    clean: None,
) -> None:
    """Redis goes away mid-run: fast 503s meanwhile, then API and workers recover by themselves."""
    started = time.monotonic()
    current = worker.start()
    api_pids = sorted(api.worker_pids())
    probe_topic = f"probe-{uuid.uuid4().hex[:8]}"
    probes: list[Probe] = []
    with PacedPublisher(api.url, 3000, spread=6.0, max_retries=40) as run:
        wait_until(lambda: run.answered() >= 5 and ledger(engine)[0] >= 1, timeout=30)
        if how == "stop":
            broker.stop()
        else:
            broker.kill()
            # A killed Redis leaves its pidfile, and RedisServer.start() then fails reading
            # /proc/<dead pid>/cmdline (FileNotFoundError): remove it as a crash would need.
            (broker.datadir / "redis.pid").unlink(missing_ok=True)
        down_at = time.monotonic()

        ready = requests.get(f"{api.url}/ready", timeout=10)
        assert ready.status_code == 503, ready.text
        assert ready.json()["checks"]["broker"].startswith("down"), ready.text
        assert ready.json()["checks"]["database"] == "ok", ready.text
        assert ready.headers.get("Retry-After")
        figures = requests.get(f"{api.url}/stats", timeout=10)
        assert figures.status_code == 503 and "broker" in figures.json()["message"]

        # The outage lasts past one Retry-After, so every publisher thread meets a 503 and
        # backs off; probes measure how fast the API says so meanwhile.
        retry_after = int(ready.headers["Retry-After"])
        while time.monotonic() - down_at < retry_after + 1.5 or len(probes) < 50:
            probes.append(probe_publish(api.url, make_event(f"p-{len(probes)}", probe_topic)))
        broker.start()
        up_at = time.monotonic()
        summary = run.wait(timeout=90)
    assert not fatal_lines(worker), fatal_lines(worker)

    p99 = round(percentile([p.latency for p in probes], 99) * 1000, 1)
    # Fast: within the broker timeout (0.5 s) and then some for a loaded machine.
    assert p99 < 2500, f"503s took {p99} ms at p99"
    assert {p.status for p in probes} == {503}
    assert all(p.retry_after == str(retry_after) for p in probes)
    assert all(p.body["code"] == 503 and "broker" in p.body["message"] for p in probes)
    assert summary.errors == 0, summary.first_error
    # Requests sent while the broker was down were answered 503, backed off, and accepted
    # once it was back.
    assert any(down_at <= s.started and s.finished > up_at for s in run.sent)
    check_invariants(
        f"broker-outage-{how}",
        run=run,
        summary=summary,
        api=api,
        engine=engine,
        broker=broker,
        started=started,
        faults=1,
        p99_503_ms=p99,
    )
    assert not stored_keys(engine, [probe_topic]), "an event answered 503 was stored"
    # Nothing was restarted: the same gunicorn workers and the same Celery worker recovered.
    assert sorted(api.worker_pids()) == api_pids
    assert worker.started == [current] and current.executor.running()
    assert_still_processing(api.url)
    wait_until(lambda: requests.get(f"{api.url}/ready", timeout=10).status_code == 200)


@pytest.mark.parametrize("how", ["stop", "kill"])
def test_worker_survives_losing_the_broker_with_a_task_in_flight(
    how: str,
    api: Api,
    worker: Workers,
    broker: RedisServer,
    engine: Engine,
    clean: None,
) -> None:
    """The broker goes away while a task runs: the worker reconnects, the batch is stored once."""
    started = time.monotonic()
    current = worker.start()
    lock = TableLock(engine)
    try:
        response = requests.post(
            f"{api.url}/publish", json=[make_event(f"f-{i}") for i in range(50)], timeout=10
        )
        assert response.status_code == 202, response.text
        lock.wait_for_blocked_tasks(1)
        if how == "stop":
            broker.stop()
        else:
            broker.kill()
            (broker.datadir / "redis.pid").unlink(missing_ok=True)
        # A worker that handles the loss retries the connection; one that does not gives up.
        wait_until(
            lambda: (
                "Cannot connect to" in worker.output() or "Unrecoverable error" in worker.output()
            ),
            timeout=30,
        )
        # It waits 0.2, 0.6, 1.0 s... between tries (tasks.consumer), where Celery's own
        # waits are 2, 4, 6 s. Celery words the waits under a second as "now".
        wait_until(lambda: "Trying again in 1.00 second..." in worker.output(), timeout=10)
    finally:
        lock.release()
    broker.start()
    crashed = "Unrecoverable error" in worker.output()
    try:
        if not crashed:
            wait_until(lambda: stats(api.url)["queued_events"] == 0, timeout=30)
    finally:
        figures = stats(api.url)
        report(
            f"broker-{how}-task-in-flight",
            events_sent=50,
            acknowledged=50,
            lost=50 - figures["unique_processed_db"],
            double_counted=max(0, figures["total_received_queued"] - 50),
            duration_s=time.monotonic() - started,
            faults=1,
        )
    assert not crashed and not fatal_lines(worker), fatal_lines(worker)
    assert worker.started == [current] and current.executor.running()
    assert (figures["unique_processed_db"], figures["total_received_queued"]) == (50, 50)
    assert_broker_drained(broker)
    assert_still_processing(api.url)
