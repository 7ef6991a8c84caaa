"""Sending again the accepted batches that the broker lost track of.

Runs in each worker's main process. Sending a batch that is merely slow is
harmless (the ledger recognises its id), so the sweep needs no database.
"""

from __future__ import annotations

import logging
import threading

import redis

from app import pending
from app.publish import send

logger = logging.getLogger(__name__)


def resend_overdue(client: redis.Redis, older_than: float) -> int:
    """Send again every recorded batch older than older_than seconds; return how many."""
    count = 0
    for batch_id in pending.overdue(client, older_than):
        events = pending.payload(client, batch_id)
        if events is None:
            continue  # Committed and forgotten since we looked.
        send(batch_id, events)
        pending.mark_sent(client, batch_id)
        count += 1
    if count:
        logger.warning("sent %d accepted batch(es) again that were overdue", count)
    return count


def start_sweeper(client: redis.Redis, older_than: float, every: float) -> threading.Thread:
    """Run resend_overdue every `every` seconds in a daemon thread."""

    def loop() -> None:
        stop = threading.Event()
        while not stop.wait(every):
            try:
                resend_overdue(client, older_than)
            except Exception:  # The broker may be away; try again next round.
                logger.warning("resend sweep failed", exc_info=True)

    thread = threading.Thread(target=loop, name="resend-sweeper", daemon=True)
    thread.start()
    return thread
