"""Accepting publish requests onto the broker: the one entry point the API uses into tasks/.

A request is accepted when one Lua script (tasks.pending) has put the task
message on the queue, marked its batch pending with a copy for resending, and
stored the request's idempotency record, all at once; only then does the API
answer 202. A request repeated with the same key finds the record and gets the
first answer again, whether the first attempt was answered or not.

The API holds one Intake (hand over a request, read what the broker holds) and
calls collect_stats for /stats and batch_status for /batches/<id>; app/api.py is
the only module of app/ that imports this one, and nothing here imports Flask.
"""

from __future__ import annotations

import hashlib
import queue
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

import redis
from sqlalchemy import Engine

from app.broker_log import loss_summary
from app.config import Settings
from app.instruments import TASK_EVENTS
from app.store.counters import read_totals
from app.store.ledger import processed_batches
from app.store.ledger import read_batch
from app.store.reading import retention_state
from tasks.broker_state import Watchdog
from tasks.broker_state import broker_name
from tasks.messages import build_message
from tasks.pending import BrokerMemory
from tasks.pending import IdempotencyRecord
from tasks.pending import QueueDepth
from tasks.pending import Scripts
from tasks.pending import broker_memory
from tasks.pending import idempotency_field
from tasks.pending import oldest_pending_age
from tasks.pending import pending_events
from tasks.pending import queue_depth
from tasks.pending import read_pending

Events = list[dict[str, Any]]


class BrokerUnavailable(Exception):
    """The broker did not take a batch, so the request must not be acknowledged."""


class BacklogFull(BrokerUnavailable):
    """The broker holds as much unstored work as its budget allows."""


class IdempotencyRecordsFull(BacklogFull):
    """The broker holds as many idempotency records as their budget allows."""


class KeyReused(Exception):
    """An idempotency key came back with a different body."""


def fingerprint(body: bytes) -> str:
    """Digest of a request body, to tell a true retry from a reused key."""
    return hashlib.blake2b(body, digest_size=16).hexdigest()


@dataclass(frozen=True)
class Request:
    """One publish request: its events and its idempotency key.

    `remember` is False when the server made the key up: no client can send it
    again, so no record is kept. `size` is the body's length in bytes, by which
    group commit bounds how much one acceptance writes.
    """

    events: Events
    client_id: str
    key: str
    fingerprint: str
    remember: bool = True
    size: int = 0


@dataclass(frozen=True)
class Receipt:
    """The answer to an accepted request; `replayed` when an earlier attempt was accepted."""

    key: str
    batch_id: str
    accepted: int
    replayed: bool = False


Outcome = Receipt | Exception


class Acceptor:
    """Puts requests on the broker, several per task when they arrive together."""

    def __init__(
        self,
        client: redis.Redis,
        watchdog: Watchdog,
        *,
        max_backlog_bytes: int,
        idempotency_ttl: int,
        max_idempotency_records: int,
        min_replicas: int = 0,
        wait_timeout_ms: int = 0,
    ) -> None:
        # With min_replicas, an acceptance (or the replay of one) is answered
        # only once that many replicas hold it: one WAIT per group (Scripts).
        self._scripts = Scripts(client, min_replicas=min_replicas, wait_timeout_ms=wait_timeout_ms)
        self._watchdog = watchdog
        self._max_backlog_bytes = max_backlog_bytes
        self._idempotency_ttl = idempotency_ttl
        self._max_idempotency_records = max_idempotency_records

    def accept(self, requests: list[Request]) -> list[Outcome]:
        """Accept requests as one batch; return each one's receipt or error, in order.

        Raises BrokerUnavailable (or a Redis error) when nothing was accepted.
        """
        outcomes: list[Outcome | None] = [None] * len(requests)
        # The same key twice in one group: the first speaks for both.
        first_of: dict[tuple[str, str], int] = {}
        leaders: list[int] = []
        for index, request in enumerate(requests):
            slot = (request.client_id, request.key)
            if request.remember and slot in first_of:
                continue
            first_of[slot] = index
            leaders.append(index)

        remaining = leaders
        known: dict[tuple[str, str], IdempotencyRecord] = {}
        for attempt in range(4):
            if not remaining:
                break
            batch_id = uuid.uuid4().hex
            events = [event for index in remaining for event in requests[index].events]
            records = [
                (
                    idempotency_field(requests[index].client_id, requests[index].key),
                    IdempotencyRecord(
                        requests[index].fingerprint, batch_id, len(requests[index].events)
                    ),
                )
                for index in remaining
                if requests[index].remember
            ]
            remembered = [index for index in remaining if requests[index].remember]
            reply = self._scripts.accept(
                batch_id,
                build_message(batch_id, events),
                len(events),
                records,
                max_backlog_bytes=self._max_backlog_bytes,
                idempotency_ttl=self._idempotency_ttl,
                max_idempotency_records=self._max_idempotency_records,
            )
            if reply.status == "OK":
                TASK_EVENTS.observe(len(events))
                for index in remaining:
                    outcomes[index] = Receipt(
                        requests[index].key, batch_id, len(requests[index].events)
                    )
                remaining = []
            elif reply.status == "KNOWN":
                assert reply.known is not None
                for position, record in reply.known.items():
                    index = remembered[position]
                    known[(requests[index].client_id, requests[index].key)] = record
                    outcomes[index] = _answer_from(requests[index], record)
                remaining = [index for index in remaining if outcomes[index] is None]
            elif reply.status == "FULL":
                raise BacklogFull(
                    f"the broker backlog ({reply.backlog_bytes} bytes) is over its budget"
                )
            elif reply.status == "NOROOM":
                raise IdempotencyRecordsFull(
                    f"{reply.held} idempotency records are kept, as many as"
                    " IDEMPOTENCY_MAX_RECORDS allows; they expire after IDEMPOTENCY_TTL"
                )
            elif attempt < 3:
                # NOEPOCH, UNVERIFIED or CHECK: the broker is new, lost its
                # state, restarted or was replaced, or reached its allowance.
                # A check compares it with PostgreSQL (recording any loss) and
                # lets it go on; then try again.
                self._watchdog.check_now(wanted=len(events))
            else:
                raise BrokerUnavailable(
                    f"the broker is not cleared to accept ({reply.status.lower()})"
                )
        if remaining:
            raise BrokerUnavailable("could not accept the batch")

        for index, request in enumerate(requests):
            if outcomes[index] is None and (request.client_id, request.key) in known:
                outcomes[index] = _answer_from(request, known[(request.client_id, request.key)])
            elif outcomes[index] is None:
                leader = outcomes[first_of[(request.client_id, request.key)]]
                leader_request = requests[first_of[(request.client_id, request.key)]]
                if (
                    isinstance(leader, Receipt)
                    and leader_request.fingerprint == request.fingerprint
                ):
                    outcomes[index] = Receipt(
                        leader.key, leader.batch_id, leader.accepted, replayed=True
                    )
                elif isinstance(leader, Receipt):
                    outcomes[index] = KeyReused(request.key)
                else:
                    outcomes[index] = leader
        return [outcome for outcome in outcomes if outcome is not None]


def _answer_from(request: Request, record: IdempotencyRecord) -> Outcome:
    if record.fingerprint != request.fingerprint:
        return KeyReused(request.key)
    return Receipt(request.key, record.batch_id, record.accepted, replayed=True)


class _Waiter:
    """One request, waiting for the task that carries it to be accepted."""

    def __init__(self, request: Request) -> None:
        self.request = request
        self.done = threading.Event()
        self.outcome: Outcome | None = None
        self._state = "waiting"
        self._lock = threading.Lock()

    def take(self) -> bool:
        """Claim the request for a task, unless it gave up waiting."""
        with self._lock:
            if self._state != "waiting":
                return False
            self._state = "taken"
            return True

    def give_up(self) -> bool:
        """Withdraw the request, unless a task already carries it."""
        with self._lock:
            if self._state != "waiting":
                return False
            self._state = "abandoned"
            return True

    def finish(self, outcome: Outcome) -> None:
        self.outcome = outcome
        self.done.set()


def _result(outcome: Outcome | None) -> Receipt:
    if isinstance(outcome, Receipt):
        return outcome
    if isinstance(outcome, Exception):
        raise outcome
    raise BrokerUnavailable("no outcome")


class GroupCommit:
    """Joins the small requests that arrive together in this process into one task.

    One acceptance costs the API a Redis round trip (and with `appendfsync
    always`, an fsync), and a task costs a worker about a millisecond however
    small it is. Requests wait at most `linger` seconds for company; each gets
    its answer only after the task carrying it was accepted, and keeps its own
    idempotency key and answer.
    """

    def __init__(
        self,
        acceptor: Acceptor,
        *,
        max_events: int,
        linger: float,
        max_bytes: int = 2 * 1024 * 1024,
        timeout: float = 5,
    ) -> None:
        self._acceptor = acceptor
        self._max_events = max_events
        self._max_bytes = max_bytes
        self._linger = linger
        self._timeout = timeout
        self._queue: queue.SimpleQueue[_Waiter] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()

    def submit(self, request: Request) -> Receipt:
        """Return the request's receipt once accepted; raise what refused it otherwise."""
        self._ensure_thread()
        waiter = _Waiter(request)
        self._queue.put(waiter)
        if not waiter.done.wait(self._timeout) and waiter.give_up():
            raise BrokerUnavailable("timed out waiting for the broker")
        # Taken just before the timeout: the acceptance is under way, its outcome decides.
        waiter.done.wait()
        return _result(waiter.outcome)

    def _ensure_thread(self) -> None:
        # Started on first use, so it lives in the process that serves requests
        # (gunicorn forks before the app is created; nothing runs before that).
        # _run never returns, so a started thread needs no is_alive() per request.
        if self._thread is not None:
            return
        with self._start_lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="group-commit", daemon=True)
                self._thread.start()

    def _collect(self) -> list[_Waiter]:
        group: list[_Waiter] = []
        size = 0
        size_bytes = 0
        waiter = self._queue.get()
        deadline = time.monotonic() + self._linger
        while True:
            if waiter.take():
                group.append(waiter)
                size += len(waiter.request.events)
                size_bytes += waiter.request.size
            # Bytes bound how long the acceptance holds Redis (its script and
            # the AOF fsync grow with the message), as MAX_BODY_BYTES does alone.
            if size >= self._max_events or size_bytes >= self._max_bytes:
                return group
            # After the linger time, still take whatever is already waiting.
            remaining = deadline - time.monotonic()
            try:
                waiter = (
                    self._queue.get(timeout=remaining)
                    if remaining > 0
                    else self._queue.get_nowait()
                )
            except queue.Empty:
                return group

    def _run(self) -> None:
        while True:
            group = self._collect()
            if not group:  # every waiter gave up before it was taken
                continue
            try:
                outcomes = self._acceptor.accept([waiter.request for waiter in group])
            except Exception as exc:  # Every waiter learns the outcome, whatever it was.
                outcomes = [exc] * len(group)
            for waiter, outcome in zip(group, outcomes, strict=True):
                waiter.finish(outcome)


class Intake:
    """The API's way into the queue: hand over publish requests, read what the broker holds."""

    def __init__(self, client: redis.Redis, engine: Engine, settings: Settings) -> None:
        # The watchdog checks the broker every few seconds and whenever it refuses
        # to accept until checked (see Acceptor.accept).
        replication = {
            "min_replicas": settings.broker_min_replicas,
            "wait_timeout_ms": settings.broker_wait_timeout_ms,
        }
        watchdog = Watchdog(
            engine,
            client,
            broker_name(settings.redis_url, settings.broker_sentinel_master),
            settings.broker_check_interval,
            **replication,
        )
        self._client = client
        self._watchdog = watchdog
        self._acceptor = Acceptor(
            client,
            watchdog,
            max_backlog_bytes=settings.max_backlog_bytes,
            idempotency_ttl=settings.idempotency_ttl,
            max_idempotency_records=settings.idempotency_max_records,
            **replication,
        )
        self._group_commit = GroupCommit(
            self._acceptor,
            max_events=settings.group_commit_max_events,
            linger=settings.group_commit_linger_ms / 1000,
            max_bytes=settings.max_body_bytes,
        )
        self._group_below = settings.group_commit_below
        self._max_backlog_bytes = settings.max_backlog_bytes
        self._max_idempotency_records = settings.idempotency_max_records

    def submit(self, request: Request) -> Receipt:
        """Return the request's receipt once the broker has it; raise what refused it otherwise."""
        # The API checks the broker too, so a loss is noticed (and bounded)
        # with no worker running; started here, in the process that serves.
        self._watchdog.start()
        # Small requests wait briefly to share a task; a large one is a task of its own.
        if len(request.events) < self._group_below:
            return self._group_commit.submit(request)
        return _result(self._acceptor.accept([request])[0])

    def depth(self) -> QueueDepth:
        """Return the broker's queue depth (messages ready, held, batches pending)."""
        return queue_depth(self._client)

    def memory(self) -> BrokerMemory:
        """Return the broker's memory, evictions and budgets."""
        return broker_memory(self._client)

    def budgets(self) -> tuple[int, int]:
        """Return the backlog budget in bytes and the idempotency records' budget."""
        return self._max_backlog_bytes, self._max_idempotency_records

    def backlog_age(self) -> float:
        """Seconds the oldest accepted, not yet stored batch has waited (0 when none): the lag."""
        return oldest_pending_age(self._client)

    def persistence(self) -> str:
        """Say what a 202 survives: "always", "everysec", "none" (no AOF), or "unknown"."""
        try:
            config = self._client.config_get("append*")
        except redis.ResponseError:
            return "unknown"  # CONFIG is disabled on some managed services.
        if config.get("appendonly") != "yes":
            return "none"
        return str(config.get("appendfsync", "unknown"))


def collect_stats(engine: Engine, client: redis.Redis, started_at: float) -> dict[str, Any]:
    """Return counters that add up: received = stored + duplicates + failed + queued.

    Constant in size and cost: per-topic counters are paged by GET /stats/topics.

    Reads only: committed batches whose pending mark is still there are told
    apart through the ledger, and the workers' sweep clears such marks.
    """
    # Read the pending marks before the database snapshot: a batch that commits
    # in between is then found in the ledger and not counted as queued too.
    accepted = read_pending(client)
    with engine.connect().execution_options(isolation_level="REPEATABLE READ") as conn:
        with conn.begin():
            totals = read_totals(conn)
            done = processed_batches(conn, list(accepted))
            losses = loss_summary(conn)
            retention = retention_state(conn)
    queued = sum(size for batch_id, size in accepted.items() if batch_id not in done)
    return {
        "total_received_queued": totals.received + queued,
        "unique_processed_db": totals.stored,
        "estimated_duplicate_dropped": totals.duplicates,
        "failed_events": totals.failed,
        "queued_events": queued,
        "uptime_seconds": round(time.monotonic() - started_at, 3),
        "broker_data_loss": losses,
        "stored_after_horizon": totals.stored_after_horizon,
        "retention": retention,
    }


def batch_status(engine: Engine, client: redis.Redis, batch_id: str) -> dict[str, Any] | None:
    """Return what became of an accepted batch: queued, or stored with its counts; None if unknown.

    The ledger answers first, so a stored batch is reported without the broker.
    A batch keeps its pending mark until after its ledger row commits: a mark
    found missing means the row, if any, is visible to the second look.
    """

    def ledger() -> dict[str, Any] | None:
        with engine.connect() as conn:
            return read_batch(conn, batch_id)

    row = ledger()
    if row is None:
        queued = pending_events(client, batch_id)
        if queued is not None:
            empty = dict.fromkeys(("stored", "duplicates", "failed", "processed_at"))
            return {"batch_id": batch_id, "status": "queued", "received": queued, **empty}
        row = ledger()
        if row is None:
            return None
    return {"batch_id": batch_id, "status": "stored", **row}
