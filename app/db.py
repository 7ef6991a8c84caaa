"""Table definitions and engine construction; no queries live here."""

from __future__ import annotations

import re

import orjson
from sqlalchemy import BigInteger
from sqlalchemy import Boolean
from sqlalchemy import CheckConstraint
from sqlalchemy import Column
from sqlalchemy import DateTime
from sqlalchemy import Engine
from sqlalchemy import Index
from sqlalchemy import Integer
from sqlalchemy import MetaData
from sqlalchemy import PrimaryKeyConstraint
from sqlalchemy import SmallInteger
from sqlalchemy import Table
from sqlalchemy import Text
from sqlalchemy import UniqueConstraint
from sqlalchemy import create_engine
from sqlalchemy import make_url
from sqlalchemy import text
from sqlalchemy.dialects.postgresql import JSONB

from app.config import DbNetwork
from app.config import DbTimeouts

# Every constraint gets a predictable name, so ON CONFLICT and migrations can refer to it.
metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

# The fields of an event as a publisher sends it, in column order.
EVENT_FIELDS = ("topic", "event_id", "timestamp", "source", "payload")
# What became of each event received, disjoint: received = stored + duplicates + failed.
OUTCOMES = ("stored", "duplicates", "failed")
# Of the stored events, those whose timestamp was older than the point the dedup
# keys had been pruned to (app.store.retention): their key may have been pruned,
# so they may be re-sends of events stored before. Counted in stored as well.
AFTER_HORIZON = "stored_after_horizon"
# What a batch's ledger row records.
BATCH_COUNTS = (*OUTCOMES, AFTER_HORIZON)
# The counters every batch, topic and stripe keeps.
COUNTERS = ("received", *BATCH_COUNTS)


def _counter_columns(
    type_: type[Integer] | type[BigInteger], names: tuple[str, ...] = COUNTERS
) -> list[Column[int]]:
    return [Column(name, type_, nullable=False, server_default="0") for name in names]


# The log, one partition per UTC day of stored_at (app.store.retention creates
# them ahead and drops them past retention; events_default catches any row no
# partition covers yet). A unique constraint of a partitioned table must hold
# the partition key, so the dedup key lives in event_keys instead.
events = Table(
    "events",
    metadata,
    Column("id", BigInteger, nullable=False, autoincrement=True),
    Column("topic", Text, nullable=False),
    Column("event_id", Text, nullable=False),
    Column("timestamp", DateTime(timezone=True), nullable=False),
    Column("source", Text, nullable=False),
    Column("payload", JSONB, nullable=False),
    Column("stored_at", DateTime(timezone=True), nullable=False, server_default=text("now()")),
    # The writing transaction's id: the log's order before migration 0005,
    # kept so cursors issued then still translate to positions.
    Column("txid", BigInteger, nullable=False, server_default=text("txid_current()")),
    # The log's order. Writers take positions only while holding LOG_LOCK until
    # they commit, so positions become visible in order and a reader's cursor
    # can never pass a row that commits later (app.store.ledger). Unique by the
    # sequence; the index cannot say so without holding stored_at.
    Column(
        "position",
        BigInteger,
        nullable=False,
        server_default=text("nextval('events_position_seq')"),
    ),
    PrimaryKeyConstraint("id", "stored_at"),
    Index(None, "txid", "id"),
    Index(None, "topic", "txid", "id"),
    Index("ix_events_position", "position"),
    Index("ix_events_topic_position", "topic", "position"),
    postgresql_partition_by="RANGE (stored_at)",
)

# The partitions of events: one per UTC day (events_20261206), the one
# migration 0008 put earlier rows in (events_upto_20261207: before that day), and
# the default. Migrations and the model check leave them to app.store.retention.
EVENT_PARTITION = re.compile(r"events_(?:(?P<day>\d{8})|upto_(?P<upto>\d{8})|default)")

# The dedup key of every event stored, kept for the dedup horizon (at least as
# long as the event itself): the writer inserts keys first and only the events
# whose key was new (app.store.ledger). horizon_from is the later of when the
# key was stored and the event's own timestamp; keys are pruned by it, so a
# pruned key's event always has a timestamp before the point keys were pruned to.
event_keys = Table(
    "event_keys",
    metadata,
    Column("topic", Text, nullable=False),
    Column("event_id", Text, nullable=False),
    Column("horizon_from", DateTime(timezone=True), nullable=False),
    UniqueConstraint("topic", "event_id"),
    Index(None, "horizon_from"),
)

# One row: how far retention has gone. Events at or below dropped_through (a
# position) may have been dropped, and every event stored before dropped_before;
# keys with horizon_from before keys_pruned_before may have been pruned. Each
# mark is raised before the data goes, so readers and writers never miss a drop.
retention_marks = Table(
    "retention_marks",
    metadata,
    Column("singleton", Boolean, primary_key=True, server_default=text("true")),
    Column("dropped_through", BigInteger, nullable=False, server_default="0"),
    Column("dropped_before", DateTime(timezone=True), nullable=True),
    Column("keys_pruned_before", DateTime(timezone=True), nullable=True),
    CheckConstraint("singleton", name="one_row"),
)

# One row per processed task, claimed before the events are touched and in the
# same transaction, so a second copy of a batch waits for the first, then finds
# the claim and stores and counts nothing.
batches = Table(
    "batches",
    metadata,
    Column("batch_id", Text, primary_key=True),
    # Known when the batch is claimed, so it has no default.
    Column("received", Integer, nullable=False),
    *_counter_columns(Integer, BATCH_COUNTS),
    Column("processed_at", DateTime(timezone=True), nullable=False, server_default=text("now()")),
    # Which acceptance this batch was: the broker's epoch and its sequence number
    # there (tasks.broker_state compares them with the broker to detect lost data).
    Column("broker_epoch", Text, nullable=True),
    Column("broker_seq", BigInteger, nullable=True),
    Index(None, "broker_epoch", "broker_seq"),
    # Retention finds rows past LEDGER_RETENTION_DAYS by it (app.store.housekeeping).
    Index(None, "processed_at"),
)

# The ledger rows retention pruned (app.store.housekeeping), folded into one
# row per broker epoch ('' for batches stored without one) in the same
# transaction that deletes them: sums over batches plus these rows never change,
# and the broker's loss check still finds each epoch's stored events and
# highest sequence (app.broker_log).
pruned_batches = Table(
    "pruned_batches",
    metadata,
    Column("broker_epoch", Text, primary_key=True),
    Column("batches", BigInteger, nullable=False, server_default="0"),
    *_counter_columns(BigInteger),
    Column("max_broker_seq", BigInteger, nullable=True),
    # Every row folded in here was processed before this.
    Column("pruned_before", DateTime(timezone=True), nullable=False),
)

# Dead letters retention pruned, counted by what their replay did ('stored',
# 'duplicate', or '' for never replayed), so replay counts never go down.
pruned_dead_letters = Table(
    "pruned_dead_letters",
    metadata,
    Column("replayed_as", Text, primary_key=True),
    Column("letters", BigInteger, nullable=False, server_default="0"),
    Column("pruned_before", DateTime(timezone=True), nullable=False),
)

# Running totals per topic, updated with each batch, so /stats/topics reads a
# page of rows instead of scanning events or the ledger.
topic_stats = Table(
    "topic_stats",
    metadata,
    Column("topic", Text, primary_key=True),
    *_counter_columns(BigInteger),
)

# The totals of topic_stats, kept in COUNTER_STRIPES rows so concurrent workers rarely
# update the same one: /stats sums these few rows, however many topics there are.
COUNTER_STRIPES = 16
counter_totals = Table(
    "counter_totals",
    metadata,
    Column("stripe", SmallInteger, primary_key=True),
    *_counter_columns(BigInteger),
)
# Topics in code-point order whatever the database's collation, so a prefix
# is one contiguous index range (GET /stats/topics?prefix=).
Index("ix_topic_stats_topic_c", topic_stats.c.topic.collate("C"))

# Events the database refused (anything validation missed), kept with the
# reason so they can be inspected and replayed.
dead_letters = Table(
    "dead_letters",
    metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=True),
    Column("batch_id", Text, nullable=False),
    Column("topic", Text, nullable=False),
    Column("event_id", Text, nullable=False),
    Column("event", Text, nullable=False),
    Column("error", Text, nullable=False),
    Column("failed_at", DateTime(timezone=True), nullable=False, server_default=text("now()")),
    Column("replayed_at", DateTime(timezone=True), nullable=True),
    # What the replay did: "stored" or "duplicate" (/metrics counts replays by result).
    Column("replayed_as", Text, nullable=True),
    CheckConstraint(
        "(replayed_at IS NULL AND replayed_as IS NULL)"
        " OR (replayed_at IS NOT NULL AND replayed_as IN ('stored', 'duplicate'))",
        name="replay_result",
    ),
    Index(None, "topic", "event_id"),
    # A redelivered batch refuses the same rows again; one letter per row.
    UniqueConstraint("batch_id", "topic", "event_id"),
)


# Per broker (its URL without credentials): the epoch it holds, how far it had
# got when last checked, and how far it may go before the next check (its
# allowance), so a broker that lost its data is noticed and the loss bounded.
broker_checkpoints = Table(
    "broker_checkpoints",
    metadata,
    Column("broker", Text, primary_key=True),
    Column("epoch", Text, nullable=False),
    Column("seq", BigInteger, nullable=False, server_default="0"),
    Column("accepted_events", BigInteger, nullable=False, server_default="0"),
    Column("allowed_events", BigInteger, nullable=False, server_default="0"),
    # When a check last saw accepted_events move: how long the broker has been idle.
    Column("accepted_at", DateTime(timezone=True), nullable=False, server_default=text("now()")),
    Column("checked_at", DateTime(timezone=True), nullable=False, server_default=text("now()")),
)

# Every detected loss of broker data, until an operator acknowledges it.
broker_losses = Table(
    "broker_losses",
    metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=True),
    Column("broker", Text, nullable=False),
    Column("lost_epoch", Text, nullable=False),
    Column("reason", Text, nullable=False),
    Column("seq_known", BigInteger, nullable=False),
    Column("seq_found", BigInteger, nullable=True),
    # At most this many accepted events were lost: the allowance, less what was stored.
    Column("events_unaccounted", BigInteger, nullable=False),
    # Accepted before the last check and not stored when the loss was found.
    Column("events_known_unstored", BigInteger, nullable=False, server_default="0"),
    Column("detected_at", DateTime(timezone=True), nullable=False, server_default=text("now()")),
    Column("acknowledged_at", DateTime(timezone=True), nullable=True),
    # One record per lost epoch, however many processes notice it.
    UniqueConstraint("broker", "lost_epoch"),
)


# The limits of processes that have no Settings at hand (tests, benches, scripts).
DEFAULT_NETWORK = DbNetwork()


def _json_serializer(value: object) -> str:
    return orjson.dumps(value).decode()


def session_options(timeouts: DbTimeouts) -> str:
    """Return libpq `options` that set PostgreSQL's timeouts for every session."""
    settings = {
        "statement_timeout": timeouts.statement,
        "lock_timeout": timeouts.lock,
        "idle_in_transaction_session_timeout": timeouts.idle_in_transaction,
    }
    return " ".join(f"-c {name}={round(seconds * 1000)}" for name, seconds in settings.items())


def make_engine(
    url: str,
    pool_size: int = 5,
    *,
    max_overflow: int | None = None,
    timeouts: DbTimeouts | None = None,
    network: DbNetwork = DEFAULT_NETWORK,
) -> Engine:
    """Create an engine; call it in each process after fork, never before.

    `timeouts` are set by the server when each connection starts (no extra round
    trip), after any `options` the URL gives; without them the server's own apply.
    `network` (connect, keepalive and TCP_USER_TIMEOUT limits) applies to every
    connection, except for a parameter the URL's query names itself.
    """
    query = make_url(url).query
    connect_args: dict[str, object] = {"application_name": "log-aggregator"}
    connect_args.update(
        (name, value) for name, value in network.connect_args().items() if name not in query
    )
    if timeouts is not None:
        given = query.get("options")
        ours = session_options(timeouts)
        connect_args["options"] = f"{given} {ours}" if isinstance(given, str) else ours
    return create_engine(
        url,
        pool_size=pool_size,
        max_overflow=pool_size if max_overflow is None else max_overflow,
        pool_pre_ping=True,
        pool_timeout=5,
        json_serializer=_json_serializer,
        json_deserializer=orjson.loads,
        connect_args=connect_args,
    )
