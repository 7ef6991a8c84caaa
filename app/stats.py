"""The /stats figures: exact counters from the ledger plus what is still queued."""

from __future__ import annotations

import time
from typing import Any

import redis
from sqlalchemy import Engine

from app import pending
from app.store import processed_batches
from app.store import read_totals


def collect_stats(engine: Engine, client: redis.Redis, started_at: float) -> dict[str, Any]:
    """Return counters that add up: received = stored + duplicates + failed + queued."""
    # Read the pending marks before the database snapshot: a batch that commits
    # in between is then found in the ledger and not counted as queued too.
    accepted = pending.read(client)
    with engine.connect().execution_options(isolation_level="REPEATABLE READ") as conn:
        with conn.begin():
            totals = read_totals(conn)
            done = processed_batches(conn, list(accepted))
    queued = sum(size for batch_id, size in accepted.items() if batch_id not in done)
    try:
        pending.forget(client, done)
    except redis.RedisError:
        pass  # Cleaning up is opportunistic; the next call tries again.
    return {
        "total_received_queued": totals.received + queued,
        "unique_processed_db": totals.stored,
        "estimated_duplicate_dropped": totals.duplicates,
        "failed_events": totals.failed,
        "queued_events": queued,
        "uptime_seconds": round(time.monotonic() - started_at, 3),
        "topics": totals.topics,
    }
