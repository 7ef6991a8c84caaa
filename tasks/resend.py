"""Sending again the accepted batches that the broker lost, and forgetting committed ones.

Runs in each worker's main process. kombu's Redis transport moves a message
from the queue to its unacked hash in two steps, and a worker killed between
them takes the message with it. A batch is sent again only on evidence of
that: pending for a while and its message in neither place on two sweeps
(tasks.pending). A slow batch stays where it is, so an outage does not breed
copies. The ledger makes a copy sent anyway harmless.

Each step is bounded: at most SWEEP_BATCHES overdue batches per sweep, one scan
of the queue's tail (as long as the overdue batches, read in chunks) instead of
a search per batch, and Redis runs one short script per step. The sweep also
clears expired idempotency records when no acceptance does.
"""

from __future__ import annotations

import logging
import threading

import redis
from sqlalchemy import Engine

from app.failure_log import FailureLog
from app.store.ledger import processed_batches
from tasks.pending import Scripts
from tasks.pending import overdue
from tasks.pending import queued_batches

logger = logging.getLogger(__name__)

# Overdue batches looked at per sweep, and per script call.
SWEEP_BATCHES = 2000
STEP_BATCHES = 200


def sweep(engine: Engine, client: redis.Redis, older_than: float, confirm_after: float) -> int:
    """Forget committed batches and resend lost ones among those pending too long."""
    scripts = Scripts(client)
    while scripts.expire_idempotency() == 1000:
        pass
    candidates = overdue(client, older_than, limit=SWEEP_BATCHES)
    if not candidates:
        return 0
    with engine.connect() as conn:
        done = processed_batches(conn, candidates)
    # Committed, but the worker could not clear the mark (the broker was away).
    committed = sorted(done)
    for start in range(0, len(committed), STEP_BATCHES):
        scripts.forget(committed[start : start + STEP_BATCHES])
    waiting = [batch_id for batch_id in candidates if batch_id not in done]
    # An overdue batch still queued has only older or restored ones ahead of it.
    queued = queued_batches(client, tail=len(candidates) + STEP_BATCHES) if waiting else set()
    resent: list[str] = []
    for start in range(0, len(waiting), STEP_BATCHES):
        step = waiting[start : start + STEP_BATCHES]
        resent += scripts.resend_lost(step, queued, confirm_after)
    if resent:
        logger.warning(
            "sent %d accepted batch(es) again that the broker had lost: %s",
            len(resent),
            ", ".join(resent[:5]),
        )
    return len(resent)


def start_sweeper(
    engine: Engine, client: redis.Redis, older_than: float, every: float
) -> threading.Thread:
    """Run sweep() every `every` seconds in a daemon thread."""

    def loop() -> None:
        stop = threading.Event()
        failures = FailureLog(logger, "resend sweep")
        while not stop.wait(every):
            try:
                sweep(engine, client, older_than, confirm_after=every * 0.9)
            except Exception as exc:  # The broker or database may be away; try again next round.
                failures.failed(exc)
            else:
                failures.succeeded()

    thread = threading.Thread(target=loop, name="resend-sweeper", daemon=True)
    thread.start()
    return thread
