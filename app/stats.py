"""The /stats figures: exact counters from the ledger plus what is still queued."""

from __future__ import annotations

import time
from typing import Any

import redis
from sqlalchemy import Engine

from app.broker_log import loss_summary
from app.store.counters import read_totals
from app.store.ledger import processed_batches
from tasks.acceptance import queued_batches


def collect_stats(engine: Engine, client: redis.Redis, started_at: float) -> dict[str, Any]:
    """Return counters that add up: received = stored + duplicates + failed + queued.

    Constant in size and cost: per-topic counters are paged by GET /stats/topics.

    Reads only: committed batches whose pending mark is still there are told
    apart through the ledger, and the workers' sweep clears such marks.
    """
    # Read the pending marks before the database snapshot: a batch that commits
    # in between is then found in the ledger and not counted as queued too.
    accepted = queued_batches(client)
    with engine.connect().execution_options(isolation_level="REPEATABLE READ") as conn:
        with conn.begin():
            totals = read_totals(conn)
            done = processed_batches(conn, list(accepted))
            losses = loss_summary(conn)
    queued = sum(size for batch_id, size in accepted.items() if batch_id not in done)
    return {
        "total_received_queued": totals.received + queued,
        "unique_processed_db": totals.stored,
        "estimated_duplicate_dropped": totals.duplicates,
        "failed_events": totals.failed,
        "queued_events": queued,
        "uptime_seconds": round(time.monotonic() - started_at, 3),
        "broker_data_loss": losses,
    }
