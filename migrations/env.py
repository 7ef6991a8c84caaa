"""Alembic environment: URL from app.config, metadata from app.db."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection

from app.config import load_log_level
from app.config import load_settings
from app.db import EVENT_PARTITION
from app.db import make_engine
from app.db import metadata
from app.logs import configure_logging

config = context.config
target_metadata = metadata


# Expression indexes autogenerate cannot compare (it reads them back as plain
# column indexes); migration 0004 creates them, test_migrations checks they exist.
EXPRESSION_INDEXES = frozenset({"ix_topic_stats_topic_c"})


def _include(
    obj: object, name: str | None, type_: str, reflected: bool, compare_to: object
) -> bool:
    if type_ == "table" and name is not None and EVENT_PARTITION.fullmatch(name):
        return False  # partitions of events come and go with retention (app.store.retention)
    return not (type_ == "index" and name in EXPRESSION_INDEXES)


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection, target_metadata=target_metadata, include_object=_include
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_offline() -> None:
    """Emit SQL to stdout instead of running it."""
    context.configure(
        url=load_settings().database_url,
        target_metadata=target_metadata,
        literal_binds=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    """Run against a connection passed in by the caller, or one made from DATABASE_URL."""
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    # Run as a command (`alembic upgrade head`, compose's migrate job): log what it
    # does (each revision applied) as JSON lines, like every other process. A caller
    # that passes its own connection keeps its own logging.
    configure_logging(load_log_level())
    # make_engine: the same connect/keepalive limits as every other process, so
    # a migration against a partitioned server fails instead of hanging.
    settings = load_settings()
    engine = make_engine(settings.database_url, pool_size=1, network=settings.db_network)
    try:
        with engine.connect() as conn:
            _run(conn)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
