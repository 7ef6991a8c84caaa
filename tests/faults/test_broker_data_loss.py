"""The broker loses its data: flushed, replaced by an empty instance, restored from an older AOF.

Each loss is noticed within seconds and reported in /stats, /metrics, the worker's log and
/ready (503 until an operator acknowledges it); publishing then goes on under a new epoch.
"""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

import pytest
import redis
import requests
from sqlalchemy import Engine
from sqlalchemy import func
from sqlalchemy import select
from sqlalchemy import text

from app.db import batches
from app.db import broker_checkpoints
from app.db import broker_losses
from app.db import events
from scripts.services import RedisServer
from scripts.stack import Api
from scripts.stack import wait_until
from tasks.broker_state import MIN_ALLOWANCE
from tasks.broker_state import broker_name
from tests.faults.harness import PacedPublisher
from tests.faults.harness import Workers
from tests.faults.harness import report
from tests.faults.harness import stored_keys
from tests.helpers import TableLock
from tests.helpers import assert_adds_up
from tests.helpers import make_event
from tests.helpers import publish
from tests.helpers import settled_stats
from tests.helpers import stats


def checkpoint_allowance(engine: Engine, broker: RedisServer) -> tuple[int, int]:
    """Return the accepted and allowed events of the broker's last check ((0, 0) before it)."""
    # This broker's row only: a session worker, if one runs, checkpoints its own broker.
    with engine.connect() as conn:
        row = conn.execute(
            select(broker_checkpoints.c.accepted_events, broker_checkpoints.c.allowed_events).where(
                broker_checkpoints.c.broker == broker_name(broker.url)
            )
        ).one_or_none()
    return (0, 0) if row is None else (int(row[0]), int(row[1]))


def checkpointed_events(engine: Engine, broker: RedisServer) -> int:
    """Return the accepted events the broker's last check recorded (0 before the first)."""
    with engine.connect() as conn:
        value = conn.execute(
            select(broker_checkpoints.c.accepted_events).where(
                broker_checkpoints.c.broker == broker_name(broker.url)
            )
        ).scalar()
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
    # Found by whichever checked first: a worker, or the API (which checks too).
    assert "broker data loss detected" in worker.output() + api.log.read_text(errors="replace")
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
        wait_until(lambda: checkpointed_events(engine, broker) == 120, timeout=15)
        assert stats(api.url)["queued_events"] == 100
        with redis.Redis.from_url(broker.url) as client:
            client.flushall()
        loss, took = wait_for_detection(api)
    finally:
        lock.release()
    assert took < 5, f"detected after {took:.1f} s"
    # Accepted before the last check and not stored when it was noticed (the two
    # batches held by the workers commit afterwards), and at most the allowance.
    assert loss["events_known_unstored"] == 100
    assert 100 <= loss["events_unaccounted"] <= 100 + max(MIN_ALLOWANCE, 120 * 60 / 0.5)
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


def test_a_drained_idle_broker_replaced_by_an_empty_instance_is_no_loss(
    api: Api, worker: Workers, broker: RedisServer, engine: Engine, clean: None
) -> None:
    worker.start()
    publish(api.url, [make_event(f"r-{i}", topic="replaced") for i in range(20)])
    settled_stats(api.url, received=20, timeout=30)
    # Idle for ten check intervals: the allowance closes to what it accepted, all stored.
    wait_until(lambda: checkpoint_allowance(engine, broker) == (20, 20), timeout=30)
    broker.stop()
    shutil.rmtree(broker.datadir)
    broker.start()  # The same address, no data: a container recreated without its volume.
    started = time.monotonic()
    assert_publishing_goes_on(api, "after-replace")
    assert stats(api.url)["broker_data_loss"]["detected"] == 0
    assert requests.get(f"{api.url}/ready", timeout=10).status_code == 200
    assert "nothing was lost" in worker.output() + api.log.read_text(errors="replace")
    report(
        "broker-drained-then-replaced-by-empty-instance",
        events_sent=30,
        acknowledged=30,
        lost=0,
        double_counted=0,
        duration_s=time.monotonic() - started,
        faults=1,
        false_alarms=0,
    )


@pytest.mark.parametrize("how", ["replaced", "flushall"])
def test_a_broker_replaced_while_busy_is_a_loss_bounded_by_its_allowance(
    api: Api, worker: Workers, broker: RedisServer, engine: Engine, clean: None, how: str
) -> None:
    """No worker: 1,050 events queued, then the broker is replaced by an empty one, or flushed.

    Before issue 18, with no worker running, the flushed case reported events_unaccounted 0.
    """
    for n in range(21):
        publish(api.url, [make_event(f"b-{n}-{i}", topic="busy") for i in range(50)])
    # The API's own checks record the broker's progress; no worker is running.
    wait_until(lambda: checkpointed_events(engine, broker) == 1050, timeout=15)
    if how == "replaced":
        broker.stop()
        shutil.rmtree(broker.datadir)
        broker.start()
    else:
        with redis.Redis.from_url(broker.url) as client:
            client.flushall()
    loss, took = wait_for_detection(api)
    report(
        f"broker-{how}-while-busy-no-worker",
        events_sent=1050,
        acknowledged=1050,
        lost=1050,
        double_counted=0,
        duration_s=took,
        faults=1,
        detected_after_s=round(took, 2),
        events_unaccounted=loss["events_unaccounted"],
    )
    assert loss["events_known_unstored"] == 1050
    assert loss["events_unaccounted"] >= 1050
    worker.start()
    assert_reported_until_acknowledged(api, worker)
    assert_publishing_goes_on(api, "after-busy-replace")


def aof_path(broker: RedisServer) -> Path:
    """Return the AOF of a broker: the Redis 7 directory, or the Redis 6 file."""
    directory = broker.datadir / "appendonlydir"
    return directory if directory.exists() else broker.datadir / "appendonly.aof"


def snapshot(broker: RedisServer, kind: str, backup: Path) -> None:
    """Copy the broker's AOF, or make an RDB snapshot with BGSAVE and copy it."""
    if kind == "aof":
        source = aof_path(broker)
        if source.is_dir():
            shutil.copytree(source, backup)
        else:
            shutil.copy2(source, backup)
        return
    with redis.Redis.from_url(broker.url) as client:
        before = client.lastsave()
        client.bgsave()
        wait_until(lambda: client.lastsave() != before, timeout=15)
    shutil.copy2(broker.datadir / "dump.rdb", backup)


def restore(broker: RedisServer, kind: str, backup: Path) -> None:
    """Stop the broker and start it again from the older copy, as an operator restores one."""
    broker.stop()
    source = aof_path(broker)
    if source.is_dir():
        shutil.rmtree(source)
    else:
        source.unlink()
    if kind == "aof":
        if backup.is_dir():
            shutil.copytree(backup, source)
        else:
            shutil.copy2(backup, source)
        broker.start()
        return
    # Redis loads an RDB file only with AOF off; then AOF is turned on again live.
    shutil.copy2(backup, broker.datadir / "dump.rdb")
    broker.appendonly = False
    broker.start()
    broker.appendonly = True
    with redis.Redis.from_url(broker.url) as client:
        client.config_set("appendonly", "yes")


@pytest.mark.parametrize(
    ("kind", "with_workers"),
    [("aof", True), ("aof", False), ("rdb", True), ("rdb", False)],
    ids=["aof-workers", "aof-no-worker", "rdb-workers", "rdb-no-worker"],
)
def test_a_restore_from_an_older_copy_is_detected_before_anything_more_is_accepted(
    api: Api,
    worker: Workers,
    broker: RedisServer,
    engine: Engine,
    clean: None,
    kind: str,
    with_workers: bool,
) -> None:
    """Publishers keep publishing across the restore; with or without workers."""
    started = time.monotonic()
    if with_workers:
        worker.start()
    publish(api.url, [make_event(f"o-{i}", topic="older") for i in range(20)])
    wait_until(lambda: checkpointed_events(engine, broker) >= 20, timeout=15)
    backup = broker.datadir.parent / f"{broker.datadir.name}-{kind}-backup"
    snapshot(broker, kind, backup)
    # Accepted after the copy: the copy misses them.
    for n in range(3):
        publish(api.url, [make_event(f"n-{n}-{i}", topic="older") for i in range(20)])
    wait_until(lambda: checkpointed_events(engine, broker) >= 80, timeout=15)
    with PacedPublisher(api.url, 600, spread=8, batch_size=20) as run:
        wait_until(lambda: run.answered() >= 3, timeout=15)
        restore(broker, kind, backup)
        restarted = time.monotonic()
        loss, took = wait_for_detection(api)
        summary = run.wait(90)
    if not with_workers:
        worker.start()
    with engine.connect() as conn:
        [row] = conn.execute(select(broker_losses)).all()
    assert "went back in time" in row.reason
    assert row.seq_found < row.seq_known
    figures = settled_stats(api.url, received=1, timeout=60)
    # Nothing was accepted in the restored sequence of the lost epoch: the broker
    # refused to accept until a check had compared it with PostgreSQL.
    after = [s.outcome.batch_id for s in run.sent if s.outcome.accepted and s.started > restarted]
    with engine.connect() as conn:
        epochs = conn.execute(
            select(batches.c.broker_epoch).where(batches.c.batch_id == func.any(after))
        ).scalars()
        reused = conn.execute(
            select(batches.c.broker_seq)
            .where(batches.c.broker_epoch == row.lost_epoch)
            .group_by(batches.c.broker_seq)
            .having(func.count() > 1)
        ).all()
        assert after and row.lost_epoch not in set(epochs)
    assert reused == []
    assert_adds_up(figures, engine)
    stored = stored_keys(engine, summary.topics)
    lost_paced = run.accepted_keys() - set(stored)
    with engine.connect() as conn:
        stored_older = conn.execute(
            select(func.count()).select_from(events).where(events.c.topic == "older")
        ).scalar_one()
    lost = (80 - stored_older) + len(lost_paced)
    assert max(stored.values(), default=1) == 1
    # Every event lost is within the bound the loss reported.
    assert lost <= loss["events_unaccounted"], (lost, loss)
    report(
        f"broker-restored-from-older-{kind}" + ("" if with_workers else "-no-worker"),
        events_sent=80 + summary.planned,
        acknowledged=80 + summary.sent,
        lost=lost,
        double_counted=0,
        duration_s=time.monotonic() - started,
        faults=1,
        detected=1,
        detected_after_s=round(took, 2),
        events_unaccounted=loss["events_unaccounted"],
    )
    assert_reported_until_acknowledged(api, worker)


def test_a_check_delayed_between_its_reads_raises_no_false_alarm(
    api: Api, worker: Workers, broker: RedisServer, engine: Engine, clean: None
) -> None:
    """Checks stall on a lock (as on a slow statement) while workers keep storing.

    Checks used to read Redis first and the ledger after: whatever was stored in
    between looked like the broker going back in time (4 false losses in 5 windows).
    """
    started = time.monotonic()
    worker.start()
    publish(api.url, [make_event(f"w-{i}", topic="warm") for i in range(20)])
    settled_stats(api.url, received=20, timeout=30)
    with PacedPublisher(api.url, 3000, spread=12, batch_size=20) as run:
        for _ in range(5):
            # Checks wait for this lock; acceptances and workers do not need it.
            with engine.connect() as conn, conn.begin():
                conn.execute(text("LOCK TABLE broker_checkpoints IN ACCESS EXCLUSIVE MODE"))
                time.sleep(1.5)  # the delay under test: a check blocked mid-way
            time.sleep(0.5)
        summary = run.wait(90)
    figures = settled_stats(api.url, received=20 + summary.sent, timeout=60)
    losses = stats(api.url)["broker_data_loss"]["detected"]
    report(
        "broker-check-delayed-between-reads",
        events_sent=summary.planned,
        acknowledged=summary.sent,
        lost=0,
        double_counted=0,
        duration_s=time.monotonic() - started,
        faults=5,
        false_alarms=losses,
    )
    assert losses == 0
    assert requests.get(f"{api.url}/ready", timeout=10).status_code == 200
    assert_adds_up(figures, engine)
