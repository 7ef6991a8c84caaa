"""Noticing that the broker lost data: epoch, sequence and allowance, checked against PostgreSQL.

Redis holds an epoch (a random id given to a broker without state), a sequence
number and a count of accepted events that every acceptance increments, in the
same script. Each stored batch records its epoch and sequence in the ledger,
and checks copy the broker's progress into PostgreSQL. The broker lost data when:
- it has no epoch (flushed, or replaced by an empty instance);
- it has another epoch than the one checkpointed (replaced by a different one);
- its sequence is below what was checkpointed or stored (restored from an older
  AOF or snapshot, or a lagging replica promoted).

Two rules make that judgement sound whether or not a worker runs:
- A Redis process accepts nothing until a check has compared it with
  PostgreSQL: the acceptance script compares the id of the running Redis
  process with the one the last check sealed, so after any restart, restore,
  replacement or failover the first publish waits for a check (the API runs it).
- A broker accepts only up to an allowance that PostgreSQL recorded first. So
  the events a loss can have taken are bounded (`events_unaccounted`: the
  allowance less what the ledger holds and what is still pending), never 0 for
  a real loss, and a broker replaced after it was drained and idle (allowance =
  accepted = stored) is no loss at all.

A replicated broker (BROKER_MIN_REPLICAS) records its progress only once the
replicas confirm it (WAIT), so a replica promoted after a failover holds at
least the checkpointed sequence and continues the epoch: no loss. A replica
promoted that lagged (no WAIT) holds a lower sequence and is a loss, bounded
like any other.

A check reads PostgreSQL before Redis: whatever the ledger held was accepted
before Redis is read, so no delay between the two reads looks like the broker
going back in time. Each loss is recorded once per lost epoch (app.broker_log),
logged as an error, counted in /stats and /metrics, and keeps /ready at 503
until acknowledged.
"""

from __future__ import annotations

import logging
import threading
import uuid
from dataclasses import dataclass
from urllib.parse import urlsplit

import redis
from sqlalchemy import Connection
from sqlalchemy import Engine

from app import broker_log
from app.broker_log import Checkpoint
from app.failure_log import FailureLog
from app.store.ledger import processed_batches
from tasks.pending import BrokerState
from tasks.pending import Scripts
from tasks.pending import pending_from

logger = logging.getLogger(__name__)

# While publishers are active, a check lets the broker accept, beyond what it
# has accepted, what the current rate brings in ALLOWANCE_SECONDS (at least
# MIN_ALLOWANCE, and at least what a waiting acceptance needs): checks keep
# ahead of the load, and publishing goes on through a database outage of that
# long. A broker idle for IDLE_CHECKS check intervals has its allowance closed
# to what it accepted: then everything it may have accepted is known, and its
# loss or replacement can be judged exactly (the next publish waits for a check).
ALLOWANCE_SECONDS = 60
MIN_ALLOWANCE = 10_000
IDLE_CHECKS = 10


def broker_name(redis_url: str, sentinel_master: str = "") -> str:
    """Name a broker by its URL without credentials (the same name after a replacement).

    A broker found through Sentinel is named by its service, so it keeps its
    name (and its checkpoint) across failovers.
    """
    parts = urlsplit(redis_url)
    if sentinel_master:
        return f"sentinel://{sentinel_master}{parts.path or '/0'}"
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{parts.hostname or ''}{port}{parts.path or '/0'}"


@dataclass(frozen=True)
class Loss:
    """One detected loss of broker data."""

    lost_epoch: str
    reason: str
    seq_known: int
    seq_found: int | None
    events_unaccounted: int = 0
    events_known_unstored: int = 0


def allowance(
    state: BrokerState, checkpoint: Checkpoint | None, wanted: int, interval: float
) -> int:
    """Return how many events in all the broker may have accepted until the next check."""
    if checkpoint is None or checkpoint.epoch != state.epoch:
        return state.accepted_events + max(MIN_ALLOWANCE, wanted)
    recent = state.accepted_events - checkpoint.accepted_events
    if wanted <= 0 and recent <= 0 and checkpoint.idle >= IDLE_CHECKS * interval:
        return state.accepted_events
    rate = recent / max(checkpoint.age, 0.5)
    window = max(MIN_ALLOWANCE, wanted, int(rate * ALLOWANCE_SECONDS))
    return state.accepted_events + window


def check(
    engine: Engine,
    client: redis.Redis,
    broker: str,
    *,
    wanted: int = 0,
    every: float | None = None,
    interval: float = 2.0,
    min_replicas: int = 0,
    wait_timeout_ms: int = 0,
) -> Loss | None:
    """Compare the broker with its checkpoint; record and return a loss, else checkpoint it.

    `wanted` is the number of events an acceptance waits to accept. With
    `every` (the periodic check) it gives way to a check already running and
    skips a broker checked less than every/2 seconds ago. `interval` is
    BROKER_CHECK_INTERVAL, by which idleness is measured. With `min_replicas`
    the broker's progress counts only once that many replicas hold it (WAIT),
    so a checkpoint never runs ahead of what a promoted replica will have; the
    check raises NotReplicated otherwise.
    """
    scripts = Scripts(client, min_replicas=min_replicas, wait_timeout_ms=wait_timeout_ms)
    with engine.begin() as conn:
        if every is None:
            broker_log.lock_checks(conn)
        elif not broker_log.try_lock_checks(conn):
            return None
        checkpoint = broker_log.read_checkpoint(conn, broker)
        if every is not None and checkpoint is not None and checkpoint.age < every / 2:
            return None
        # PostgreSQL first, then Redis (see the module's docstring).
        seq_known = 0
        if checkpoint is not None:
            seq_known = max(checkpoint.seq, broker_log.stored_seq(conn, checkpoint.epoch))
        state = scripts.read_state()
        if checkpoint is None:
            _settle(
                conn,
                scripts,
                broker,
                state,
                state.epoch or uuid.uuid4().hex,
                None,
                wanted,
                interval,
            )
            return None
        loss = _judge(state, checkpoint, seq_known)
        if loss is None:
            _settle(conn, scripts, broker, state, checkpoint.epoch, checkpoint, wanted, interval)
            return None
        loss = _bound(conn, client, checkpoint, loss)
        if state.epoch is None or state.epoch == checkpoint.epoch:
            epoch = uuid.uuid4().hex
        else:
            epoch = state.epoch
        # Seal the broker first: if it moved meanwhile, record nothing and look again.
        if not _settle(conn, scripts, broker, state, epoch, checkpoint, wanted, interval):
            return None
        if loss.events_unaccounted == 0:
            logger.warning(
                "broker %s: %s; every event it was allowed to accept is stored or still"
                " pending, so nothing was lost; it continues under epoch %s",
                broker,
                loss.reason,
                epoch,
            )
            return None
        new = broker_log.record_loss(
            conn,
            broker=broker,
            lost_epoch=loss.lost_epoch,
            reason=loss.reason,
            seq_known=loss.seq_known,
            seq_found=loss.seq_found,
            events_unaccounted=loss.events_unaccounted,
            events_known_unstored=loss.events_known_unstored,
        )
    if new:
        logger.error(
            "broker data loss detected on %s: %s; at most %d accepted event(s) are"
            " unaccounted for (%d accepted before the last check were not stored);"
            " acknowledge with POST /broker/data-loss/acknowledge",
            broker,
            loss.reason,
            loss.events_unaccounted,
            loss.events_known_unstored,
        )
    return loss if new else None


def _settle(
    conn: Connection,
    scripts: Scripts,
    broker: str,
    state: BrokerState,
    epoch: str,
    checkpoint: Checkpoint | None,
    wanted: int,
    interval: float,
) -> bool:
    """Seal the broker with its epoch and allowance, then checkpoint it; False if it moved.

    The allowance reaches PostgreSQL in the same transaction, before the
    broker can use it for anything but the acceptances already under way.
    """
    sealed = scripts.seal(state, epoch, allowance(state, checkpoint, wanted, interval))
    if sealed is None:
        return False
    broker_log.save_checkpoint(
        conn, broker, Checkpoint(epoch, state.seq, state.accepted_events, sealed)
    )
    return True


def _judge(state: BrokerState, checkpoint: Checkpoint, seq_known: int) -> Loss | None:
    if state.epoch is None:
        reason = "the broker holds no state (flushed, or replaced by an empty instance)"
    elif state.epoch != checkpoint.epoch:
        reason = f"the broker holds another epoch ({state.epoch}) than {checkpoint.epoch}"
    elif state.seq < seq_known:
        reason = (
            f"the broker went back in time: it holds acceptance {state.seq}, but {seq_known}"
            " had been accepted (restored from an older AOF or snapshot, or a lagging"
            " replica promoted)"
        )
    else:
        return None
    return Loss(
        lost_epoch=checkpoint.epoch,
        reason=reason,
        seq_known=seq_known,
        seq_found=state.seq if state.epoch is not None else None,
    )


def _bound(conn: Connection, client: redis.Redis, checkpoint: Checkpoint, loss: Loss) -> Loss:
    """Count what the lost epoch may have taken: its allowance less what is stored or pending."""
    pending = pending_from(client, checkpoint.epoch)
    # A batch committed whose pending mark is not cleared yet counts once, as stored.
    committed = processed_batches(conn, list(pending))
    accounted = broker_log.received_from(conn, checkpoint.epoch) + sum(
        size for batch_id, size in pending.items() if batch_id not in committed
    )
    return Loss(
        lost_epoch=loss.lost_epoch,
        reason=loss.reason,
        seq_known=loss.seq_known,
        seq_found=loss.seq_found,
        events_unaccounted=max(0, checkpoint.allowed_events - accounted),
        events_known_unstored=max(0, checkpoint.accepted_events - accounted),
    )


class Watchdog:
    """Runs check() every `every` seconds in a daemon thread, and on demand."""

    def __init__(
        self,
        engine: Engine,
        client: redis.Redis,
        broker: str,
        every: float,
        *,
        min_replicas: int = 0,
        wait_timeout_ms: int = 0,
    ) -> None:
        self._engine = engine
        self._client = client
        self._broker = broker
        self._every = every
        self._replication = {"min_replicas": min_replicas, "wait_timeout_ms": wait_timeout_ms}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def check_now(self, wanted: int = 0) -> None:
        """Check at once (for an acceptance the broker refused until a check)."""
        with self._lock:
            check(
                self._engine,
                self._client,
                self._broker,
                wanted=wanted,
                interval=self._every,
                **self._replication,
            )

    def start(self) -> threading.Thread:
        """Start the periodic checks once; return their thread."""
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._loop, name="broker-watchdog", daemon=True
                )
                self._thread.start()
            return self._thread

    def _loop(self) -> None:
        stop = threading.Event()
        failures = FailureLog(logger, "broker check")
        while not stop.wait(self._every):
            try:
                with self._lock:
                    check(
                        self._engine,
                        self._client,
                        self._broker,
                        every=self._every,
                        interval=self._every,
                        **self._replication,
                    )
            except Exception as exc:  # The broker or database may be away; next round.
                failures.failed(exc)
            else:
                failures.succeeded()
