"""One retention run with the configured policy, and `python -m app.retention` to run it from cron.

    python -m app.retention          # create partitions ahead, drop past RETENTION_DAYS,
                                     # prune keys past DEDUP_HORIZON_DAYS, the ledger,
                                     # dead letters and checkpoints past theirs;
                                     # one JSON log line

It reads DATABASE_URL and the retention settings (RETENTION_DAYS, DEDUP_HORIZON_DAYS,
PARTITIONS_AHEAD; docs/configuration.md) from the environment. Exit 0 when it ran or
another runner held the lock, 69 when the database cannot be reached (one log line).

Two runners never both act (app.store.retention holds an advisory lock); the
Celery beat task tasks.retention.run calls the same function.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Collection
from collections.abc import Sequence
from dataclasses import asdict

from sqlalchemy import Engine
from sqlalchemy import make_url
from sqlalchemy.exc import OperationalError

from app.config import Settings
from app.config import load_log_level
from app.config import load_settings
from app.db import make_engine
from app.logs import configure_logging
from app.store.retention import RetentionPolicy
from app.store.retention import RetentionReport
from app.store.retention import run_retention

logger = logging.getLogger(__name__)

# sysexits' EX_UNAVAILABLE: cron and systemd tell "try later" from a bad invocation.
EXIT_DATABASE_UNAVAILABLE = 69


def policy(settings: Settings) -> RetentionPolicy:
    """Return the retention policy the settings ask for."""
    return RetentionPolicy(
        retention_days=settings.retention_days,
        dedup_horizon_days=settings.dedup_horizon_days,
        partitions_ahead=settings.partitions_ahead,
        topic_days=settings.retention_topic_days,
        max_bytes=settings.retention_max_bytes,
        ledger_days=settings.ledger_retention_days,
        dead_letter_days=settings.dead_letter_retention_days,
        checkpoint_days=settings.broker_checkpoint_retention_days,
    )


def run(engine: Engine, settings: Settings, keep: Collection[str] = ()) -> RetentionReport:
    """Run retention once and log what it did; `keep` names batches still pending."""
    report = run_retention(engine, policy(settings), keep=keep)
    if report.ran:
        logger.info("retention run", extra=asdict(report))
    else:
        logger.info("retention run skipped: another runner holds the lock")
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """Run retention once with the settings of the environment."""
    parser = argparse.ArgumentParser(
        prog="python -m app.retention",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.parse_args(argv)
    configure_logging(load_log_level())
    settings = load_settings()
    engine = make_engine(settings.database_url, pool_size=2, network=settings.db_network)
    try:
        run(engine, settings)
    except OperationalError as error:
        # The usual cause is an unset or wrong DATABASE_URL: name the URL, not a traceback.
        where = make_url(settings.database_url).render_as_string(hide_password=True)
        logger.error(
            "retention run failed: cannot reach the database at %s (DATABASE_URL): %s",
            where,
            str(error.orig).strip().splitlines()[0] if error.orig else error,
        )
        return EXIT_DATABASE_UNAVAILABLE
    finally:
        engine.dispose()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
