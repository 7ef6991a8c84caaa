"""The broker loses its data: flushed, replaced by an empty instance, restored from an older AOF.

Each loss is noticed within seconds and reported in /stats, /metrics, the worker's log and
/ready (503 until an operator acknowledges it); publishing then goes on under a new epoch.
"""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

import redis
import requests
from sqlalchemy import Engine
from sqlalchemy import select

from app.db import broker_checkpoints
from app.db import broker_losses
from scripts.services import RedisServer
from scripts.stack import Api
from scripts.stack import wait_until
from tests.faults.harness import Workers
from tests.faults.harness import report
from tests.helpers import TableLock
from tests.helpers import assert_adds_up
from tests.helpers import make_event
from tests.helpers import publish
from tests.helpers import settled_stats
from tests.helpers import stats


def checkpointed_events(engine: Engine) -> int:
    """Return the accepted events the last broker check recorded (0 before the first)."""
    with engine.connect() as conn:
        value = conn.execute(select(broker_checkpoints.c.accepted_events)).scalar()
    return int(value or 0)


def wait_for_detection(api: Api, timeout: float = 15) -> tuple[dict, float]:
    """Wait until /stats reports a loss; return the report and how long it took."""
    started = time.monotonic()
    wait_until(lambda: stats(api.url)["broker_data_loss"]["detected"] >= 1, timeout=timeout)
    return stats(api.url)["broker_data_loss"], time.monotonic() - started


def assert_reported_until_acknowledged(api: Api, worker: Workers) -> None:
    """The loss is in /ready, /metrics and the log; acknowledging it makes /ready 200 again."""
    ready = requests.get(f"{api.url}/ready", timeout=10)
    assert ready.status_code == 503, ready.text
    assert "unacknowledged" in ready.json()["checks"]["broker_data_loss"]
    metrics = requests.get(f"{api.url}/metrics", timeout=10).text
    assert re.search(r"^aggregator_broker_data_loss_total 1\.0$", metrics, re.M), metrics[-2000:]
    assert "broker data loss detected" in worker.output()
    [listed] = requests.get(f"{api.url}/broker/data-loss", timeout=10).json()
    assert listed["reason"] and listed["acknowledged_at"] is None
    acknowledged = requests.post(f"{api.url}/broker/data-loss/acknowledge", timeout=10)
    assert acknowledged.json() == {"acknowledged": 1}
    assert requests.get(f"{api.url}/ready", timeout=10).status_code == 200
    assert stats(api.url)["broker_data_loss"]["unacknowledged"] == 0


def assert_publishing_goes_on(api: Api, topic: str) -> None:
    publish(api.url, [make_event(f"{topic}-{i}", topic=topic) for i in range(10)])
    wait_until(lambda: stats(api.url)["topics"].get(topic, {}).get("stored") == 10, timeout=30)


def test_flushall_with_batches_queued_is_detected_and_reported(
    api: Api, worker: Workers, broker: RedisServer, engine: Engine, clean: None
) -> None:
    started = time.monotonic()
    worker.start()
    publish(api.url, [make_event(f"w-{i}", topic="warm") for i in range(20)])
    settled_stats(api.url, received=20, timeout=30)
    lock = TableLock(engine)
    try:
        for n in range(5):
            publish(api.url, [make_event(f"q-{n}-{i}", topic="queued") for i in range(20)])
        # Two batches held by the pool processes, three on the queue; a check has seen all.
        lock.wait_for_blocked_tasks(2)
        wait_until(lambda: checkpointed_events(engine) == 120, timeout=15)
        assert stats(api.url)["queued_events"] == 100
        with redis.Redis.from_url(broker.url) as client:
            client.flushall()
        loss, took = wait_for_detection(api)
    finally:
        lock.release()
    assert took < 5, f"detected after {took:.1f} s"
    # Accepted before the last check and not stored when it was noticed: an upper bound,
    # since the two batches held by the workers commit afterwards.
    assert loss["events_unaccounted"] == 100
    assert loss["unacknowledged"] == 1 and loss["last_detected_at"]
    with engine.connect() as conn:
        [row] = conn.execute(select(broker_losses)).all()
    assert "holds no state" in row.reason
    figures = settled_stats(api.url, received=60, timeout=30)
    assert figures["total_received_queued"] == 60  # 20 warm-up + the two held batches
    assert_adds_up(figures, engine, sent=60)
    report(
        "broker-flushall",
        events_sent=120,
        acknowledged=120,
        lost=60,
        double_counted=0,
        duration_s=time.monotonic() - started,
        faults=1,
        detected_after_s=round(took, 2),
        events_unaccounted=loss["events_unaccounted"],
    )
    assert_reported_until_acknowledged(api, worker)
    assert_publishing_goes_on(api, "after-flush")


def test_broker_replaced_by_an_empty_instance_is_detected(
    api: Api, worker: Workers, broker: RedisServer, engine: Engine, clean: None
) -> None:
    worker.start()
    publish(api.url, [make_event(f"r-{i}", topic="replaced") for i in range(20)])
    settled_stats(api.url, received=20, timeout=30)
    wait_until(lambda: checkpointed_events(engine) == 20, timeout=15)
    broker.stop()
    shutil.rmtree(broker.datadir)
    broker.start()  # The same address, no data: a container recreated without its volume.
    loss, took = wait_for_detection(api)
    report(
        "broker-replaced-by-empty-instance",
        events_sent=20,
        acknowledged=20,
        lost=0,
        double_counted=0,
        duration_s=took,
        faults=1,
        detected_after_s=round(took, 2),
    )
    assert took < 5, f"detected after {took:.1f} s"
    assert loss["events_unaccounted"] == 0  # Everything accepted had been stored.
    assert_reported_until_acknowledged(api, worker)
    assert_publishing_goes_on(api, "after-replace")


def aof_path(broker: RedisServer) -> Path:
    """Return the AOF of a broker: the Redis 7 directory, or the Redis 6 file."""
    directory = broker.datadir / "appendonlydir"
    return directory if directory.exists() else broker.datadir / "appendonly.aof"


def test_broker_restored_from_an_older_aof_is_detected(
    api: Api, worker: Workers, broker: RedisServer, engine: Engine, clean: None
) -> None:
    worker.start()
    publish(api.url, [make_event(f"o-{i}", topic="older") for i in range(20)])
    settled_stats(api.url, received=20, timeout=30)
    backup = broker.datadir.parent / f"{broker.datadir.name}-aof-backup"
    source = aof_path(broker)
    if source.is_dir():
        shutil.copytree(source, backup)
    else:
        shutil.copy2(source, backup)
    # Accepted and stored after the copy: the copy misses them.
    for n in range(3):
        publish(api.url, [make_event(f"n-{n}-{i}", topic="older") for i in range(20)])
    settled_stats(api.url, received=80, timeout=30)
    broker.stop()
    if source.is_dir():
        shutil.rmtree(source)
        shutil.copytree(backup, source)
    else:
        shutil.copy2(backup, source)
    broker.start()
    loss, took = wait_for_detection(api)
    report(
        "broker-restored-from-older-aof",
        events_sent=80,
        acknowledged=80,
        lost=0,
        double_counted=0,
        duration_s=took,
        faults=1,
        detected_after_s=round(took, 2),
    )
    assert took < 5, f"detected after {took:.1f} s"
    with engine.connect() as conn:
        [row] = conn.execute(select(broker_losses)).all()
    assert "went back in time" in row.reason
    assert row.seq_found is not None and row.seq_found < row.seq_known
    assert_reported_until_acknowledged(api, worker)
    assert_publishing_goes_on(api, "after-restore")
