"""PostgreSQL stopped mid-run: publishing goes on, workers wait, all drains exactly."""

from __future__ import annotations

import re
import time
from collections import Counter

import pytest
import redis
import requests
from sqlalchemy import Engine
from sqlalchemy import func
from sqlalchemy import select

from app.db import broker_checkpoints
from scripts.services import PostgresServer
from scripts.services import RedisServer
from scripts.stack import Api
from scripts.stack import wait_until
from tests.faults.harness import PacedPublisher
from tests.faults.harness import Workers
from tests.faults.harness import assert_broker_drained
from tests.faults.harness import assert_still_processing
from tests.faults.harness import check_invariants
from tests.faults.harness import fatal_lines
from tests.faults.harness import ledger
from tests.faults.harness import report
from tests.helpers import assert_adds_up
from tests.helpers import make_event
from tests.helpers import settled_stats

# --- 3. database outage -----------------------------------------------------------------------


class PrivateDatabase:
    """PostgreSQL of its own, so it can be stopped; the API and workers use it."""

    @pytest.fixture
    def fault_env(
        self, stack_env: dict[str, str], broker: RedisServer, postgres: PostgresServer
    ) -> dict[str, str]:
        return {**stack_env, "REDIS_URL": broker.url, "DATABASE_URL": postgres.url("aggregator")}


class TestDatabaseOutage(PrivateDatabase):
    def test_database_outage_keeps_accepting_and_drains_exactly(
        self,
        postgres: PostgresServer,
        api: Api,
        worker: Workers,
        broker: RedisServer,
        outage_engine: Engine,
    ) -> None:
        """PostgreSQL stops mid-run: 202s go on, /stats says 503, workers retry, all drains."""
        started = time.monotonic()
        current = worker.start()
        api_pids = sorted(api.worker_pids())
        with PacedPublisher(api.url, 3000, spread=6.0, max_retries=20) as run:
            wait_until(lambda: run.answered() >= 5 and ledger(outage_engine)[0] >= 1, timeout=30)
            postgres.stop()
            answered_before = run.answered()
            retries_before = len(retried_tasks(worker.output()))

            # Publishing goes on: the API only needs the broker to answer 202.
            wait_until(lambda: run.answered() >= answered_before + 10, timeout=30)
            response = requests.get(f"{api.url}/stats", timeout=5)
            assert response.status_code == 503, response.text
            assert response.headers["Content-Type"].startswith("application/json")
            assert response.headers.get("Retry-After")
            body = response.json()
            assert body["code"] == 503 and "database" in body["message"], body
            assert "Traceback" not in response.text
            ready = requests.get(f"{api.url}/ready", timeout=5)
            assert ready.status_code == 503
            assert ready.json()["checks"]["database"].startswith("down"), ready.text

            # Workers retry with backoff, a task again and again, and keep the messages.
            def retried_three_times() -> bool:
                counts = Counter(retried_tasks(worker.output())[retries_before:])
                return bool(counts) and max(counts.values()) >= 3

            wait_until(retried_three_times, timeout=30)
            with redis.Redis.from_url(broker.url) as client:
                assert client.llen("celery") + client.hlen("unacked") > 0
            postgres.start()
            summary = run.wait(timeout=90)

        assert summary.errors == 0, summary.first_error
        check_invariants(
            "database-outage",
            run=run,
            summary=summary,
            api=api,
            engine=outage_engine,
            broker=broker,
            started=started,
            faults=1,
        )
        assert sorted(api.worker_pids()) == api_pids
        assert worker.started == [current] and current.executor.running()
        assert not fatal_lines(worker), fatal_lines(worker)
        assert_still_processing(api.url)


class TestMetricsDuringOutage(PrivateDatabase):
    def test_metrics_answer_while_the_database_is_down(
        self,
        postgres: PostgresServer,
        api: Api,
        worker: Workers,
        broker: RedisServer,
        outage_engine: Engine,
    ) -> None:
        """/metrics says the database is down and still shows the backlog on the broker."""
        worker.start()
        # The broker needs its epoch (set by a check, which needs the database) to accept.
        wait_until(lambda: checkpoints(outage_engine) == 1, timeout=15)
        postgres.stop()
        for n in range(3):
            body = [make_event(f"mo-{n}-{i}", topic="metrics") for i in range(10)]
            response = requests.post(f"{api.url}/publish", json=body, timeout=10)
            assert response.status_code == 202, response.text

        def scrape() -> dict[str, float]:
            response = requests.get(f"{api.url}/metrics", timeout=10)
            assert response.status_code == 200, response.text
            return {
                line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
                for line in response.text.splitlines()
                if line and not line.startswith("#")
            }

        wait_until(lambda: scrape()["aggregator_backlog_age_seconds"] >= 1, timeout=15)
        down = scrape()
        assert down['aggregator_dependency_up{dependency="database"}'] == 0
        assert down['aggregator_dependency_up{dependency="broker"}'] == 1
        # The broker's figures are all there: depth, pending batches, lag.
        on_broker = (
            down['aggregator_broker_messages{state="ready"}']
            + down['aggregator_broker_messages{state="unacked"}']
        )
        assert on_broker >= 1, down
        assert down["aggregator_pending_batches"] == 3, down
        # Figures from the ledger are left out rather than made up.
        assert not any(name.startswith("aggregator_events_total") for name in down), down
        assert any(name.startswith("aggregator_build_info{") for name in down), down

        postgres.start()
        settled_stats(api.url, received=30, timeout=60)
        up = scrape()
        assert up['aggregator_dependency_up{dependency="database"}'] == 1
        assert up['aggregator_events_total{outcome="stored"}'] == 30
        assert up["aggregator_backlog_age_seconds"] == 0


def checkpoints(engine: Engine) -> int:
    with engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(broker_checkpoints)).scalar_one()


def retried_tasks(log: str) -> list[str]:
    """Return the task id of every retry the worker logged, in order."""
    return re.findall(r"batch (\w+) not stored \(.*\); back on the queue in", log)


class TestNoCopyStorm(PrivateDatabase):
    """Three worker processes, each sweeping, through a long database outage."""

    def test_outage_with_three_workers_keeps_one_message_per_batch(
        self,
        postgres: PostgresServer,
        api: Api,
        worker: Workers,
        broker: RedisServer,
        outage_engine: Engine,
    ) -> None:
        worker.concurrency = 1
        for _ in range(3):
            worker.start()
        # The broker needs its epoch (set by a check, which needs the database) to accept.
        wait_until(lambda: checkpoints(outage_engine) == 1, timeout=15)
        postgres.stop()
        batches = 20
        for n in range(batches):
            body = [make_event(f"cs-{n}-{i}", topic="storm") for i in range(10)]
            response = requests.post(f"{api.url}/publish", json=body, timeout=10)
            assert response.status_code == 202, response.text
        most = 0
        with redis.Redis.from_url(broker.url) as client:
            # Many resend sweeps (every second, resend after 3 s) and visibility timeouts
            # (5 s) pass while nothing can be stored.
            outage_ends = time.monotonic() + 20
            while time.monotonic() < outage_ends:
                on_broker = client.llen("celery") + client.hlen("unacked")
                most = max(most, on_broker)
                time.sleep(0.1)
        postgres.start()
        figures = settled_stats(api.url, received=batches * 10, timeout=60)
        report(
            "database-outage-three-workers",
            events_sent=batches * 10,
            acknowledged=batches * 10,
            lost=batches * 10 - figures["unique_processed_db"],
            double_counted=max(0, figures["total_received_queued"] - batches * 10),
            duration_s=20,
            faults=1,
            most_messages_on_broker=most,
            batches=batches,
        )
        assert most <= batches + 3, f"{most} messages on the broker for {batches} batches"
        assert_adds_up(figures, outage_engine, sent=batches * 10)
        assert figures["topics"]["storm"] == {"stored": 200, "duplicates": 0, "failed": 0}
        assert_broker_drained(broker)
        assert not fatal_lines(worker), fatal_lines(worker)
