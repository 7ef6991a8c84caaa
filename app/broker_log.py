"""Queries about the broker: its checkpointed epoch and progress, and losses of its data."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection
from sqlalchemy import case
from sqlalchemy import delete
from sqlalchemy import func
from sqlalchemy import select
from sqlalchemy import update
from sqlalchemy.dialects.postgresql import insert

from app.db import batches
from app.db import broker_checkpoints
from app.db import broker_losses
from app.db import pruned_batches

# Any constant: checks of one database take this transaction-level advisory
# lock, so two processes never judge the same broker at once.
CHECK_LOCK = 0x6167_6772


@dataclass(frozen=True)
class Checkpoint:
    """How far a broker had got when it was last checked, and how far it was allowed to go.

    `age` is the seconds since the check and `idle` the seconds since a check
    last saw acceptances progress, on the database's clock (0 for a new one).
    """

    epoch: str
    seq: int
    accepted_events: int
    allowed_events: int
    age: float = 0.0
    idle: float = 0.0


def lock_checks(conn: Connection) -> None:
    """Serialize broker checks until the caller's transaction ends."""
    conn.execute(select(func.pg_advisory_xact_lock(CHECK_LOCK)))


def try_lock_checks(conn: Connection) -> bool:
    """Take the checks' lock if no one holds it; False if another check is running."""
    return bool(conn.execute(select(func.pg_try_advisory_xact_lock(CHECK_LOCK))).scalar())


def read_checkpoint(conn: Connection, broker: str) -> Checkpoint | None:
    """Return the broker's last checkpoint, or None if it was never checked."""
    row = conn.execute(
        select(
            broker_checkpoints.c.epoch,
            broker_checkpoints.c.seq,
            broker_checkpoints.c.accepted_events,
            # Rows written before the allowance existed allowed what they had seen.
            func.greatest(
                broker_checkpoints.c.allowed_events, broker_checkpoints.c.accepted_events
            ).label("allowed_events"),
            func.extract("epoch", func.now() - broker_checkpoints.c.checked_at).label("age"),
            func.extract("epoch", func.now() - broker_checkpoints.c.accepted_at).label("idle"),
        ).where(broker_checkpoints.c.broker == broker)
    ).one_or_none()
    if row is None:
        return None
    return Checkpoint(
        row.epoch,
        row.seq,
        row.accepted_events,
        row.allowed_events,
        float(row.age),
        float(row.idle),
    )


def save_checkpoint(conn: Connection, broker: str, checkpoint: Checkpoint) -> None:
    """Record the broker's epoch and progress."""
    stmt = insert(broker_checkpoints).values(
        broker=broker,
        epoch=checkpoint.epoch,
        seq=checkpoint.seq,
        accepted_events=checkpoint.accepted_events,
        allowed_events=checkpoint.allowed_events,
    )
    stmt = stmt.on_conflict_do_update(
        index_elements=[broker_checkpoints.c.broker],
        set_={
            "epoch": stmt.excluded.epoch,
            "seq": stmt.excluded.seq,
            "accepted_events": stmt.excluded.accepted_events,
            "allowed_events": stmt.excluded.allowed_events,
            "accepted_at": case(
                (
                    (broker_checkpoints.c.epoch == stmt.excluded.epoch)
                    & (broker_checkpoints.c.accepted_events == stmt.excluded.accepted_events),
                    broker_checkpoints.c.accepted_at,
                ),
                else_=func.now(),
            ),
            "checked_at": func.now(),
        },
    )
    conn.execute(stmt)


def stored_seq(conn: Connection, epoch: str) -> int:
    """Return the highest sequence number stored from an epoch (index lookups).

    Ledger rows retention pruned count through their epoch's folded row.
    """
    kept = select(func.max(batches.c.broker_seq)).where(batches.c.broker_epoch == epoch)
    pruned = select(pruned_batches.c.max_broker_seq).where(pruned_batches.c.broker_epoch == epoch)
    value = conn.execute(
        select(func.coalesce(func.greatest(kept.scalar_subquery(), pruned.scalar_subquery()), 0))
    ).scalar()
    return int(value or 0)


def received_from(conn: Connection, epoch: str) -> int:
    """Return the events the ledger holds from an epoch (reads all its batches: losses only).

    Ledger rows retention pruned count through their epoch's folded row.
    """
    kept = select(func.coalesce(func.sum(batches.c.received), 0)).where(
        batches.c.broker_epoch == epoch
    )
    pruned = select(func.coalesce(func.sum(pruned_batches.c.received), 0)).where(
        pruned_batches.c.broker_epoch == epoch
    )
    value = conn.execute(select(kept.scalar_subquery() + pruned.scalar_subquery())).scalar()
    return int(value or 0)


def prune_checkpoints(conn: Connection, before: datetime) -> int:
    """Delete checkpoints of brokers last checked before `before`; return how many.

    A broker in use is checked every few seconds, so only brokers no process
    uses any more are old. Holds the checks' lock, so no check reads a row
    this deletes. Losses are kept: few, and /stats counts them.
    """
    lock_checks(conn)
    result = conn.execute(
        delete(broker_checkpoints).where(broker_checkpoints.c.checked_at < before)
    )
    return result.rowcount


def record_loss(
    conn: Connection,
    *,
    broker: str,
    lost_epoch: str,
    reason: str,
    seq_known: int,
    seq_found: int | None,
    events_unaccounted: int,
    events_known_unstored: int,
) -> bool:
    """Record a detected loss of broker data once; False if it was recorded already."""
    stmt = (
        insert(broker_losses)
        .values(
            broker=broker,
            lost_epoch=lost_epoch,
            reason=reason,
            seq_known=seq_known,
            seq_found=seq_found,
            events_unaccounted=events_unaccounted,
            events_known_unstored=events_known_unstored,
        )
        .on_conflict_do_nothing(constraint="uq_broker_losses_broker_lost_epoch")
        .returning(broker_losses.c.id)
    )
    return conn.execute(stmt).first() is not None


def loss_summary(conn: Connection) -> dict[str, Any]:
    """Return how many losses were detected, the last one's time, and what is unacknowledged."""
    detected, last, unacknowledged, unaccounted, known = conn.execute(
        select(
            func.count(),
            func.max(broker_losses.c.detected_at),
            func.count().filter(broker_losses.c.acknowledged_at.is_(None)),
            func.coalesce(func.sum(broker_losses.c.events_unaccounted), 0),
            func.coalesce(func.sum(broker_losses.c.events_known_unstored), 0),
        )
    ).one()
    return {
        "detected": int(detected),
        "last_detected_at": last.isoformat() if isinstance(last, datetime) else None,
        "unacknowledged": int(unacknowledged),
        "events_unaccounted": int(unaccounted),
        "events_known_unstored": int(known),
    }


def list_losses(conn: Connection) -> list[dict[str, Any]]:
    """Return every detected loss, newest first."""
    rows = conn.execute(select(broker_losses).order_by(broker_losses.c.id.desc())).mappings()
    return [dict(row) for row in rows]


def acknowledge_losses(conn: Connection) -> int:
    """Mark every unacknowledged loss as seen by an operator; return how many."""
    result = conn.execute(
        update(broker_losses)
        .where(broker_losses.c.acknowledged_at.is_(None))
        .values(acknowledged_at=func.now())
    )
    return result.rowcount
