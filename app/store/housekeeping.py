"""Pruning the batch ledger and dead letters past their horizons, counts folded in, never lost.

Why a ledger row must outlive every copy of its batch: the row, claimed in the
batch's own transaction, is what turns a second copy of the batch into a no-op
(app.store.ledger). A copy that finds no row would be counted again: its
events would be duplicates (or stored again past the dedup horizon) and
`received` would grow twice. A copy of a processed batch can reach a worker by:

- broker redelivery of a message whose worker died before acknowledging it,
  after BROKER_VISIBILITY_TIMEOUT (seconds; held messages renew their lease);
- the resend sweep, which sends again a batch whose pending mark is still on
  the broker and whose message it cannot find; a committed batch's mark is
  cleared after its commit, or by the next sweep once the broker is back
  (BROKER_RESEND_AFTER, seconds). The beat's task also keeps every batch that
  still has a mark (`keep`), whatever its age;
- a client sending again with its Idempotency-Key: answered from the record
  for IDEMPOTENCY_TTL (a day by default) without a new message, and a client
  asking GET /batches/<id> meanwhile should find the row;
- replaying a dead letter, which moves the count in the batch's row: a row is
  kept while any of its dead letters waits for a replay.

So a ledger row is pruned only after LEDGER_RETENTION_DAYS, which
app.config holds to at least a week, and a day past the longest of
IDEMPOTENCY_TTL, BROKER_VISIBILITY_TIMEOUT and BROKER_RESEND_AFTER: orders of
magnitude past the seconds-to-minutes the broker's own paths take, with room
for a broker that was away over a weekend. The cron path
(`python -m app.retention`) has no `keep`; it relies on that minimum alone.

Why no figure changes: the rows deleted are summed, in the same statement,
into their epoch's row of pruned_batches. /stats reads counter_totals, which
pruning never touches; ledger sums (tests, the broker's loss check) add the
folded rows. Dead letters pruned are counted by replay result, so /metrics'
replay counters never go down.
"""

from __future__ import annotations

from collections.abc import Collection
from datetime import datetime

from sqlalchemy import Connection
from sqlalchemy import Engine
from sqlalchemy import TextClause
from sqlalchemy import func
from sqlalchemy import select
from sqlalchemy import text

from app.db import BATCH_COUNTS
from app.db import pruned_batches
from app.db import pruned_dead_letters

# Rows deleted per transaction.
PRUNE_BATCH = 10_000

_FOLDED = ("received", *BATCH_COUNTS)

_PRUNE_LEDGER = text(
    "WITH gone AS ("
    " DELETE FROM batches WHERE batch_id IN ("
    "  SELECT batch_id FROM batches AS b WHERE processed_at < :before"
    "  AND b.batch_id <> ALL (CAST(:keep AS text[]))"
    "  AND NOT EXISTS (SELECT FROM dead_letters AS d"
    "   WHERE d.batch_id = b.batch_id AND d.replayed_at IS NULL)"
    "  ORDER BY processed_at LIMIT :batch FOR UPDATE SKIP LOCKED)"
    " RETURNING *),"
    " folded AS (SELECT coalesce(broker_epoch, '') AS broker_epoch, count(*) AS batches,"
    + ", ".join(f" sum({name}) AS {name}" for name in _FOLDED)
    + ", max(broker_seq) AS max_broker_seq FROM gone GROUP BY 1),"
    " added AS (INSERT INTO pruned_batches (broker_epoch, batches, "
    + ", ".join(_FOLDED)
    + ", max_broker_seq, pruned_before)"
    " SELECT broker_epoch, batches, "
    + ", ".join(_FOLDED)
    + ", max_broker_seq, :before FROM folded ORDER BY broker_epoch"
    " ON CONFLICT (broker_epoch) DO UPDATE SET"
    " batches = pruned_batches.batches + excluded.batches, "
    + ", ".join(f"{name} = pruned_batches.{name} + excluded.{name}" for name in _FOLDED)
    + ", max_broker_seq = greatest(pruned_batches.max_broker_seq, excluded.max_broker_seq),"
    " pruned_before = greatest(pruned_batches.pruned_before, excluded.pruned_before))"
    " SELECT count(*) FROM gone"
)

_PRUNE_DEAD_LETTERS = text(
    "WITH gone AS ("
    " DELETE FROM dead_letters WHERE id IN ("
    "  SELECT id FROM dead_letters WHERE failed_at < :before"
    "  ORDER BY id LIMIT :batch FOR UPDATE SKIP LOCKED)"
    " RETURNING replayed_as),"
    " added AS (INSERT INTO pruned_dead_letters (replayed_as, letters, pruned_before)"
    " SELECT coalesce(replayed_as, ''), count(*), :before FROM gone GROUP BY 1 ORDER BY 1"
    " ON CONFLICT (replayed_as) DO UPDATE SET"
    " letters = pruned_dead_letters.letters + excluded.letters,"
    " pruned_before = greatest(pruned_dead_letters.pruned_before, excluded.pruned_before))"
    " SELECT count(*) FROM gone"
)


def _in_batches(
    engine: Engine, statement: TextClause, params: dict[str, object], batch: int
) -> int:
    pruned = 0
    while True:
        with engine.begin() as conn:
            deleted = int(conn.execute(statement, {**params, "batch": batch}).scalar_one())
        pruned += deleted
        if deleted < batch:
            return pruned


def prune_ledger(
    engine: Engine, before: datetime, keep: Collection[str] = (), batch: int = PRUNE_BATCH
) -> int:
    """Delete ledger rows processed before `before`, folding their counts into pruned_batches.

    Rows named in `keep` (batches whose pending mark is still on the broker)
    and rows with a dead letter waiting for a replay are kept.
    """
    params = {"before": before, "keep": list(keep)}
    return _in_batches(engine, _PRUNE_LEDGER, params, batch)


def prune_dead_letters(engine: Engine, before: datetime, batch: int = PRUNE_BATCH) -> int:
    """Delete dead letters that failed before `before`, counting them by replay result."""
    return _in_batches(engine, _PRUNE_DEAD_LETTERS, {"before": before}, batch)


def pruned_ledger_totals(conn: Connection) -> dict[str, int]:
    """Return the folded counts of pruned ledger rows (batches, received, stored, ...)."""
    row = conn.execute(
        select(
            func.coalesce(func.sum(pruned_batches.c.batches), 0),
            *(func.coalesce(func.sum(pruned_batches.c[name]), 0) for name in _FOLDED),
        )
    ).one()
    return dict(zip(("batches", *_FOLDED), (int(value) for value in row), strict=True))


def pruned_replays(conn: Connection) -> dict[str, int]:
    """Return pruned dead letters by replay result ('stored', 'duplicate', '' never replayed)."""
    rows = conn.execute(select(pruned_dead_letters.c.replayed_as, pruned_dead_letters.c.letters))
    return {result: int(letters) for result, letters in rows}


def pruned_marks(conn: Connection) -> dict[str, datetime | None]:
    """Return before when ledger rows and dead letters may have been pruned."""
    ledger, letters = conn.execute(
        select(
            select(func.max(pruned_batches.c.pruned_before)).scalar_subquery(),
            select(func.max(pruned_dead_letters.c.pruned_before)).scalar_subquery(),
        )
    ).one()
    return {"ledger_pruned_before": ledger, "dead_letters_pruned_before": letters}
