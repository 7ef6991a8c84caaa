"""The retention task the Celery beat schedules (every RETENTION_INTERVAL seconds)."""

from __future__ import annotations

from app.config import load_settings
from app.retention import run
from tasks import celery_app
from tasks import get_engine


@celery_app.task(name="tasks.retention.run", ignore_result=True)
def run_retention() -> dict[str, object]:
    """Run retention once; a run that finds another one going does nothing."""
    report = run(get_engine(), load_settings())
    return {"ran": report.ran, "dropped": report.dropped, "keys_pruned": report.keys_pruned}
