"""Sending again the accepted batches that the broker lost, and forgetting committed ones.

Runs in each worker's main process. kombu's Redis transport moves a message
from the queue to its unacked hash in two steps, and a worker killed between
them takes the message with it. A batch is sent again only on evidence of
that: pending for a while and its message in neither place on two sweeps
(tasks.pending). A slow batch stays where it is, so an outage does not breed
copies. The ledger makes a copy sent anyway harmless.
"""

from __future__ import annotations

import logging
import threading

import redis
from sqlalchemy import Engine

from app.store.ledger import processed_batches
from tasks.pending import Scripts
from tasks.pending import overdue

logger = logging.getLogger(__name__)


def sweep(engine: Engine, client: redis.Redis, older_than: float, confirm_after: float) -> int:
    """Forget committed batches and resend lost ones among those pending too long."""
    scripts = Scripts(client)
    candidates = overdue(client, older_than)
    if not candidates:
        return 0
    with engine.connect() as conn:
        done = processed_batches(conn, candidates)
    # Committed, but the worker could not clear the mark (the broker was away).
    scripts.forget(done)
    resent = scripts.resend_lost([b for b in candidates if b not in done], confirm_after)
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
        while not stop.wait(every):
            try:
                sweep(engine, client, older_than, confirm_after=every * 0.9)
            except Exception:  # The broker or database may be away; try again next round.
                logger.warning("resend sweep failed", exc_info=True)

    thread = threading.Thread(target=loop, name="resend-sweeper", daemon=True)
    thread.start()
    return thread
