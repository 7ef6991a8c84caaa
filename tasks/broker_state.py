"""Noticing that the broker lost data: an epoch and a sequence in Redis, checkpointed in PostgreSQL.

Redis holds an epoch (a random id given to a broker without state) and a
sequence number that every acceptance increments, in the same script. Each
stored batch records its epoch and sequence in the ledger, and a check every
few seconds copies the broker's epoch and sequence into PostgreSQL. The broker
lost data when:
- it has no epoch (flushed, or replaced by an empty instance): the acceptance
  script refuses to accept until a check has recorded the loss and set a new one;
- it has another epoch than the one checkpointed (replaced by a different one);
- its sequence is below what was checkpointed or stored (restored from an older
  AOF or snapshot).
Each case is recorded once per lost epoch (app.broker_log), logged as an error,
counted in /stats and /metrics, and keeps /ready at 503 until acknowledged.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import dataclass
from urllib.parse import urlsplit

import redis
from sqlalchemy import Engine

from app import broker_log
from app.broker_log import Checkpoint
from tasks.pending import BrokerState
from tasks.pending import Scripts
from tasks.pending import read_state

logger = logging.getLogger(__name__)


def broker_name(redis_url: str) -> str:
    """Name a broker by its URL without credentials (the same name after a replacement)."""
    parts = urlsplit(redis_url)
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{parts.hostname or ''}{port}{parts.path or '/0'}"


@dataclass(frozen=True)
class Loss:
    """One detected loss of broker data."""

    lost_epoch: str
    reason: str
    seq_known: int
    seq_found: int | None
    events_unaccounted: int


def _unaccounted(checkpoint: Checkpoint, received_in_ledger: int) -> int:
    # Accepted in the lost epoch up to its last checkpoint, minus what the
    # ledger holds from it. Acceptances after the last checkpoint are unknown.
    return max(0, checkpoint.accepted_events - received_in_ledger)


def check(engine: Engine, client: redis.Redis, broker: str) -> Loss | None:
    """Compare the broker with its checkpoint; record and return a loss, else checkpoint it."""
    scripts = Scripts(client)
    with engine.begin() as conn:
        broker_log.lock_checks(conn)
        # Read the broker only under the lock: a check that read it before
        # another check gave it an epoch would take the new epoch for a loss.
        state = read_state(client)
        checkpoint = broker_log.read_checkpoint(conn, broker)
        if checkpoint is None:
            epoch = state.epoch or _new_epoch(scripts, client)
            broker_log.save_checkpoint(
                conn, broker, Checkpoint(epoch, state.seq, state.accepted_events)
            )
            return None
        stored_seq, received = broker_log.ledger_progress(conn, checkpoint.epoch)
        seq_known = max(checkpoint.seq, stored_seq)
        loss = _judge(state, checkpoint, seq_known, received)
        if loss is None:
            broker_log.save_checkpoint(
                conn, broker, Checkpoint(checkpoint.epoch, state.seq, state.accepted_events)
            )
            return None
        # Give the broker a new epoch first: if this transaction then fails, the
        # next check finds a foreign epoch and records the same loss again.
        if state.epoch is None:
            epoch = _new_epoch(scripts, client)
        elif state.epoch == checkpoint.epoch:
            epoch = uuid.uuid4().hex
            if not scripts.rotate_epoch(state.epoch, epoch):
                return None  # Someone else is handling it; look again next time.
        else:
            epoch = state.epoch
        new = broker_log.record_loss(
            conn,
            broker=broker,
            lost_epoch=loss.lost_epoch,
            reason=loss.reason,
            seq_known=loss.seq_known,
            seq_found=loss.seq_found,
            events_unaccounted=loss.events_unaccounted,
        )
        broker_log.save_checkpoint(
            conn, broker, Checkpoint(epoch, state.seq, state.accepted_events)
        )
    if new:
        logger.error(
            "broker data loss detected on %s: %s; up to %d accepted event(s) are unaccounted for"
            " (acceptances after the last check cannot be known); acknowledge with"
            " POST /broker/data-loss/acknowledge",
            broker,
            loss.reason,
            loss.events_unaccounted,
        )
    return loss if new else None


def _new_epoch(scripts: Scripts, client: redis.Redis) -> str:
    epoch = uuid.uuid4().hex
    if scripts.init_epoch(epoch):
        return epoch
    found = read_state(client).epoch
    return found or epoch


def _judge(
    state: BrokerState, checkpoint: Checkpoint, seq_known: int, received: int
) -> Loss | None:
    if state.epoch is None:
        reason = "the broker holds no state (flushed, or replaced by an empty instance)"
    elif state.epoch != checkpoint.epoch:
        reason = f"the broker holds another epoch ({state.epoch}) than {checkpoint.epoch}"
    elif state.seq < seq_known:
        reason = (
            f"the broker went back in time: it holds acceptance {state.seq}, but {seq_known}"
            " had been accepted (restored from an older AOF or snapshot)"
        )
    else:
        return None
    return Loss(
        lost_epoch=checkpoint.epoch,
        reason=reason,
        seq_known=seq_known,
        seq_found=state.seq if state.epoch is not None else None,
        events_unaccounted=_unaccounted(checkpoint, received),
    )


class Watchdog:
    """Runs check() every `every` seconds in a daemon thread, and on demand (throttled)."""

    def __init__(self, engine: Engine, client: redis.Redis, broker: str, every: float) -> None:
        self._engine = engine
        self._client = client
        self._broker = broker
        self._every = every
        self._lock = threading.Lock()
        self._last = 0.0

    def check_now(self, min_gap: float = 0.5) -> None:
        """Check unless another check ran in this process less than min_gap seconds ago."""
        with self._lock:
            if time.monotonic() - self._last < min_gap:
                return
            self._last = time.monotonic()
            check(self._engine, self._client, self._broker)

    def start(self) -> threading.Thread:
        def loop() -> None:
            stop = threading.Event()
            while not stop.wait(self._every):
                try:
                    self.check_now(min_gap=0)
                except Exception:  # The broker or database may be away; next round.
                    logger.warning("broker check failed", exc_info=True)

        thread = threading.Thread(target=loop, name="broker-watchdog", daemon=True)
        thread.start()
        return thread
