"""Accepting publish requests onto the broker: the one entry point the API uses into tasks/.

A request is accepted when one Lua script (tasks.pending) has put the task
message on the queue, marked its batch pending with a copy for resending, and
stored the request's idempotency record, all at once; only then does the API
answer 202. A request repeated with the same key finds the record and gets the
first answer again, whether the first attempt was answered or not.
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass
from typing import Any

import redis
from sqlalchemy import Engine

from app.config import Settings
from tasks.broker_state import Watchdog
from tasks.broker_state import broker_name
from tasks.messages import build_message
from tasks.pending import IdempotencyRecord
from tasks.pending import QueueDepth
from tasks.pending import Scripts
from tasks.pending import idempotency_key
from tasks.pending import oldest_pending_age
from tasks.pending import queue_depth
from tasks.pending import read_pending

Events = list[dict[str, Any]]


class BrokerUnavailable(Exception):
    """The broker did not take a batch, so the request must not be acknowledged."""


class BacklogFull(BrokerUnavailable):
    """The broker holds as much unstored work as its budget allows."""


class KeyReused(Exception):
    """An idempotency key came back with a different body."""


def fingerprint(body: bytes) -> str:
    """Digest of a request body, to tell a true retry from a reused key."""
    return hashlib.blake2b(body, digest_size=16).hexdigest()


@dataclass(frozen=True)
class Request:
    """One publish request: its events and its idempotency key.

    `remember` is False when the server made the key up: no client can send it
    again, so no record is kept.
    """

    events: Events
    client_id: str
    key: str
    fingerprint: str
    remember: bool = True


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
    ) -> None:
        self._scripts = Scripts(client)
        self._watchdog = watchdog
        self._max_backlog_bytes = max_backlog_bytes
        self._idempotency_ttl = idempotency_ttl

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
        for attempt in range(3):
            if not remaining:
                break
            batch_id = uuid.uuid4().hex
            events = [event for index in remaining for event in requests[index].events]
            records = [
                (
                    idempotency_key(requests[index].client_id, requests[index].key),
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
            )
            if reply.status == "OK":
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
            elif attempt == 0:
                # No epoch: a new broker, or one that lost its state. Let the
                # check record what happened and set one, then try once more.
                self._watchdog.check_now()
            else:
                raise BrokerUnavailable("the broker has no epoch yet (its state is new or lost)")
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


def make_acceptor(client: redis.Redis, engine: Engine, settings: Settings) -> Acceptor:
    """Build the API process's acceptor, able to run a broker check when the epoch is missing."""
    watchdog = Watchdog(
        engine, client, broker_name(settings.redis_url), settings.broker_check_interval
    )
    return Acceptor(
        client,
        watchdog,
        max_backlog_bytes=settings.max_backlog_bytes,
        idempotency_ttl=settings.idempotency_ttl,
    )


def _answer_from(request: Request, record: IdempotencyRecord) -> Outcome:
    if record.fingerprint != request.fingerprint:
        return KeyReused(request.key)
    return Receipt(request.key, record.batch_id, record.accepted, replayed=True)


def queued_batches(client: redis.Redis) -> dict[str, int]:
    """Return the accepted batches not yet forgotten by a worker, with their sizes."""
    return read_pending(client)


def depth(client: redis.Redis) -> QueueDepth:
    """Return the broker's queue depth (messages ready, held, batches pending)."""
    return queue_depth(client)


def backlog_age(client: redis.Redis) -> float:
    """Seconds the oldest accepted, not yet stored batch has waited (0 when none): the lag."""
    return oldest_pending_age(client)


def persistence(client: redis.Redis) -> str:
    """Say what a 202 survives: "always", "everysec", "none" (no AOF), or "unknown"."""
    try:
        config = client.config_get("append*")
    except redis.ResponseError:
        return "unknown"  # CONFIG is disabled on some managed services.
    if config.get("appendonly") != "yes":
        return "none"
    return str(config.get("appendfsync", "unknown"))
