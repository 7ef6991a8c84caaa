"""Acceptance test C: stop every process and both services, start again, nothing is lost."""

from __future__ import annotations

from pathlib import Path

from scripts.services import PostgresServer
from scripts.services import RedisServer
from scripts.services import find_pg_bindir
from scripts.services import find_redis_server
from scripts.services import free_port
from scripts.services import migrate
from scripts.stack import Api
from scripts.stack import Worker
from tests.helpers import assert_adds_up
from tests.helpers import make_event
from tests.helpers import publish
from tests.helpers import settled_stats
from tests.helpers import stats


def test_data_and_counters_survive_a_full_restart(scratch_dir: Path, logs: Path) -> None:
    postgres = PostgresServer(scratch_dir / "pg-restart", free_port(), find_pg_bindir())
    broker = RedisServer(scratch_dir / "redis-restart", free_port(), find_redis_server())
    postgres.start()
    broker.start()
    postgres.create_database("aggregator")
    env = {
        "DATABASE_URL": postgres.url("aggregator"),
        "REDIS_URL": broker.url,
        "BROKER_VISIBILITY_TIMEOUT": "5",
        "BROKER_RESTORE_INTERVAL": "1",
        "AUTH_DISABLED": "1",
    }
    migrate(env["DATABASE_URL"])
    first = [make_event(f"r-{i}", topic=f"r{i % 3}") for i in range(300)]
    api = Api(env, logs / "restart-api.log").start()
    worker = Worker(env, logs / "restart-worker.log").start()
    try:
        publish(api.url, first)
        publish(api.url, first[:30])
        before = settled_stats(api.url, received=330)
        assert (before["unique_processed_db"], before["estimated_duplicate_dropped"]) == (300, 30)
        # With the worker gone, these wait on the broker through the restart (AOF).
        worker.stop()
        publish(api.url, [make_event(f"q-{i}") for i in range(100)])
        publish(api.url, first[:10])
        queued = stats(api.url)
        assert queued["queued_events"] == 110
        assert_adds_up(queued)
    finally:
        api.stop()
        worker.stop()
        broker.stop()
        postgres.stop()

    postgres.start()
    broker.start()
    api = Api(env, logs / "restart-api.log").start()
    worker = Worker(env, logs / "restart-worker.log").start()
    try:
        after = settled_stats(api.url, received=440)
        assert after["total_received_queued"] == 440
        assert after["unique_processed_db"] == 400
        assert after["estimated_duplicate_dropped"] == 40
        assert after["queued_events"] == 0
        assert_adds_up(after)
        assert {t: c["stored"] for t, c in after["topics"].items()} == {
            "r0": 100,
            "r1": 100,
            "r2": 100,
            "orders": 100,
        }
    finally:
        api.stop()
        worker.stop()
        broker.stop()
        postgres.stop()
