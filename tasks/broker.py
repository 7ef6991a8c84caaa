"""kombu's Redis transport with three fixes, and leases on the messages a live worker holds.

1. A broker lost mid-task must not end the worker (a closed transport is a
   connection error, which Celery survives, not an AttributeError).
2. A worker fetches a message with BRPOP and then records it in the unacked
   hash; when that write fails (maxmemory, a read-only replica, a dropped
   connection) kombu raises and Celery exits with "Unrecoverable error". Here
   the worker keeps the message and runs it; it is then held nowhere in Redis,
   which is exactly the evidence the resend sweep (tasks.resend) acts on.
3. Leases: kombu restores a held message once its delivery time is older than
   the visibility timeout, whether its worker is alive or not. The worker's
   main process refreshes the delivery time of every message it holds
   (refresh_leases), so only messages of a dead worker age: the visibility
   timeout can be short (fast recovery after SIGKILL) without redelivering
   slow tasks.
"""

from __future__ import annotations

import logging
import threading
import weakref
from typing import Any

import redis
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual

from tasks import pending

logger = logging.getLogger(__name__)

_CHANNELS: weakref.WeakSet[Channel] = weakref.WeakSet()


class QoS(kombu_redis.QoS):
    """kombu's Redis QoS, keeping a message whose unacked record could not be written."""

    def append(self, message: Any, delivery_tag: str) -> None:
        try:
            super().append(message, delivery_tag)
        except redis.RedisError as exc:
            logger.warning(
                "could not record message %s as unacked (%s); running it anyway", delivery_tag, exc
            )
            virtual.QoS.append(self, message, delivery_tag)


class Channel(kombu_redis.Channel):
    """A Redis channel that reports a closed transport as a connection error."""

    QoS = QoS

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _CHANNELS.add(self)

    def _connparams(self, asynchronous: bool = False) -> dict[str, Any]:
        # On a lost connection Celery first collects the connection (which
        # detaches the transport from it) and then closes it; closing hands
        # unacknowledged messages back and needs a client, and kombu raises
        # AttributeError, which Celery treats as fatal. A connection error is
        # ignored instead, and the messages come back after the visibility timeout.
        if self.connection is None or self.connection.client is None:
            raise redis.exceptions.ConnectionError("the broker connection is closed")
        return super()._connparams(asynchronous=asynchronous)


class Transport(kombu_redis.Transport):
    """kombu's Redis transport, using the channel above."""

    Channel = Channel


def held_tags() -> list[str]:
    """Return the delivery tags of the messages this process's channels hold."""
    tags: list[str] = []
    for channel in list(_CHANNELS):
        qos = getattr(channel, "_qos", None)
        # A channel closed after a lost connection may still list messages it
        # can no longer acknowledge; renewing their leases would hide them forever.
        if qos is None or channel.closed or channel.connection is None:
            continue
        for _ in range(3):
            try:
                tags.extend(str(tag) for tag in list(qos._delivered))
                break
            except RuntimeError:  # Changed size while we copied it; copy again.
                continue
    return tags


def start_leases(client: redis.Redis, every: float) -> threading.Thread:
    """Refresh this process's leases every `every` seconds in a daemon thread."""

    def loop() -> None:
        stop = threading.Event()
        while not stop.wait(every):
            try:
                pending.refresh_leases(client, held_tags())
            except Exception:  # The broker may be away; the next round tries again.
                logger.warning("could not refresh message leases", exc_info=True)

    thread = threading.Thread(target=loop, name="message-leases", daemon=True)
    thread.start()
    return thread
