"""The retention task the Celery beat schedules (every RETENTION_INTERVAL seconds)."""

from __future__ import annotations

from app.config import load_settings
from app.retention import run
from tasks import celery_app
from tasks import get_engine
from tasks import get_redis
from tasks.pending import read_pending


@celery_app.task(name="tasks.retention.run", ignore_result=True)
def run_retention() -> dict[str, object]:
    """Run retention once; a run that finds another one going does nothing.

    Batches still pending on the broker keep their ledger rows whatever their
    age: a second copy of one may still be delivered (app.store.housekeeping).
    """
    keep = read_pending(get_redis())
    report = run(get_engine(), load_settings(), keep=list(keep))
    return {
        "ran": report.ran,
        "dropped": report.dropped,
        "keys_pruned": report.keys_pruned,
        "ledger_pruned": report.ledger_pruned,
    }
