"""Helpers shared by test modules (which never import each other)."""

from __future__ import annotations

import hashlib
from typing import Any

import requests
from sqlalchemy import Engine
from sqlalchemy import func
from sqlalchemy import select
from sqlalchemy import text

from app.db import batches
from app.db import events
from app.db import pruned_batches
from scripts.stack import wait_until


def fixed_hex(seed: str, length: int) -> str:
    """Hex digits that look random but are the same in every process (a token in a test id).

    pytest-xdist checks that its workers collected the same test ids; a token made with
    `secrets` at import time would differ between them.
    """
    return hashlib.sha256(seed.encode()).hexdigest()[:length]


def make_event(event_id: str, topic: str = "orders", **payload: Any) -> dict[str, Any]:
    return {
        "topic": topic,
        "event_id": event_id,
        "timestamp": "2026-03-01T08:00:00+00:00",
        "source": "pipeline-test",
        "payload": payload or {"n": event_id},
    }


def publish(url: str, body: Any, **headers: str) -> requests.Response:
    """POST body to /publish and insist on 202."""
    response = requests.post(f"{url}/publish", json=body, headers=headers, timeout=30)
    assert response.status_code == 202, response.text
    return response


def stats(url: str) -> dict[str, Any]:
    """GET /stats, with every page of /stats/topics added as "topics" (topic -> counters)."""
    response = requests.get(f"{url}/stats", timeout=10)
    assert response.status_code == 200, response.text
    figures = response.json()
    assert "topics" not in figures  # /stats is constant in size
    figures["topics"] = topic_counters(url)
    return figures


def topic_counters(url: str, prefix: str | None = None) -> dict[str, dict[str, int]]:
    """Walk GET /stats/topics; return topic -> {stored, duplicates, failed}."""
    found: dict[str, dict[str, int]] = {}
    params: dict[str, Any] = {"limit": 1000}
    if prefix:
        params["prefix"] = prefix
    while True:
        response = requests.get(f"{url}/stats/topics", params=params, timeout=10)
        assert response.status_code == 200, response.text
        page = response.json()
        for row in page["topics"]:
            found[row.pop("topic")] = row
        if page["next_cursor"] is None:
            return found
        params["cursor"] = page["next_cursor"]


def settled_stats(url: str, received: int, timeout: float = 60) -> dict[str, Any]:
    """Wait until everything received is processed, then return /stats."""
    snapshot: dict[str, Any] = {}

    def idle() -> bool:
        snapshot.update(stats(url))
        return snapshot["queued_events"] == 0 and snapshot["total_received_queued"] >= received

    wait_until(idle, timeout=timeout, interval=0.1)
    return snapshot


def ledger_totals(engine: Engine) -> dict[str, int]:
    """Sum the ledger's columns and count the stored rows, straight from the tables.

    The ledger is its rows plus the folded totals of the rows retention pruned.
    """
    with engine.connect() as conn:
        pruned = conn.execute(
            select(
                *(
                    func.coalesce(func.sum(pruned_batches.c[name]), 0)
                    for name in ("received", "stored", "duplicates", "failed")
                )
            )
        ).one()
        received, stored, duplicates, failed = conn.execute(
            select(
                func.coalesce(func.sum(batches.c.received), 0),
                func.coalesce(func.sum(batches.c.stored), 0),
                func.coalesce(func.sum(batches.c.duplicates), 0),
                func.coalesce(func.sum(batches.c.failed), 0),
            )
        ).one()
        rows = conn.execute(select(func.count()).select_from(events)).scalar_one()
    return {
        "received": int(received) + int(pruned[0]),
        "stored": int(stored) + int(pruned[1]),
        "duplicates": int(duplicates) + int(pruned[2]),
        "failed": int(failed) + int(pruned[3]),
        "rows": int(rows),
    }


def assert_adds_up(
    figures: dict[str, Any], engine: Engine | None = None, sent: int | None = None
) -> None:
    """/stats adds up, and matches figures it did not compute: the rows, the ledger, what was sent.

    `sent` is what the test knows clients were answered 202 for (when only
    this test's events are in the database).
    """
    assert figures["total_received_queued"] == (
        figures["unique_processed_db"]
        + figures["estimated_duplicate_dropped"]
        + figures["failed_events"]
        + figures["queued_events"]
    )
    assert figures["queued_events"] >= 0
    if sent is not None:
        assert figures["total_received_queued"] == sent, figures
    if engine is not None:
        ledger = ledger_totals(engine)
        processed = figures["total_received_queued"] - figures["queued_events"]
        assert ledger["received"] == processed, (ledger, figures)
        assert ledger["stored"] == figures["unique_processed_db"] == ledger["rows"], (
            ledger,
            figures,
        )
        assert ledger["duplicates"] == figures["estimated_duplicate_dropped"], (ledger, figures)
        assert ledger["failed"] == figures["failed_events"], (ledger, figures)


def deadlocks(engine: Engine) -> int:
    """Return how many deadlocks PostgreSQL has detected in this database."""
    with engine.connect() as conn:
        return conn.execute(
            text("SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()")
        ).scalar_one()


class TableLock:
    """Hold a lock the worker's counter update needs, so a task stops mid-transaction."""

    def __init__(self, engine: Engine) -> None:
        self.connection = engine.connect()
        self.transaction = self.connection.begin()
        self.connection.execute(text("LOCK TABLE topic_stats IN SHARE ROW EXCLUSIVE MODE"))

    def blocked_tasks(self) -> int:
        """Return how many of our sessions wait for a lock in this database."""
        query = text(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'log-aggregator'"
            " AND wait_event_type = 'Lock' AND datname = current_database()"
        )
        # A new transaction each time: pg_stat_activity is frozen within one.
        with self.connection.engine.connect() as probe:
            return int(probe.execute(query).scalar_one())

    def wait_for_blocked_tasks(self, count: int) -> None:
        wait_until(lambda: self.blocked_tasks() == count, timeout=30)

    def release(self) -> None:
        """Let the waiting tasks go on (again is harmless, e.g. in a `finally`)."""
        if not self.connection.closed:
            self.transaction.rollback()
            self.connection.close()
