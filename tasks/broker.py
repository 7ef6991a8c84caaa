"""kombu's Redis transport with fixes for a broker in trouble, and leases on held messages.

1. A broker lost mid-task must not end the worker (a closed transport is a
   connection error, which Celery survives, not an AttributeError).
2. A worker fetches a message with BRPOP and then records it in the unacked
   hash; when that write fails (maxmemory, a read-only replica, a dropped
   connection) kombu raises and Celery exits with "Unrecoverable error". Here
   the worker keeps the message and runs it; it is then held nowhere in Redis,
   which is exactly the evidence the resend sweep (tasks.resend) acts on. The
   other writes Redis refuses at maxmemory (counting the queue in MULTI, a
   binding declared again at start, the sweep lock) are skipped the same way,
   and an acknowledgement Redis refuses (BUSY, away) is left to redelivery.
3. Leases: kombu restores a held message once its delivery time is older than
   the visibility timeout, whether its worker is alive or not. The worker's
   main process refreshes the delivery time of every message it holds
   (refresh_leases), so only messages of a dead worker age: the visibility
   timeout can be short (fast recovery after SIGKILL) without redelivering
   slow tasks.
4. One clock: kombu stamps a delivery and ages it with each host's own clock,
   so a worker whose clock is behind by more than the visibility timeout has
   every message it holds restored by the others, again and again. Here the
   delivery time, the lease and the sweep's "now" are all Redis TIME; a host
   clock that disagrees with it is only logged.
5. A node that cannot take writes now (a replica, a demoted primary, a
   primary without its replicas under `min-replicas-to-write`) answers BRPOP
   with an error reply, which Celery treats as fatal; here it is a connection
   error, and the worker reconnects (through Sentinel, to the primary).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
import weakref
from typing import Any

import redis
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from kombu.utils.json import dumps
from redis import sentinel

from app.failure_log import FailureLog
from tasks import pending

logger = logging.getLogger(__name__)

_CHANNELS: weakref.WeakSet[Channel] = weakref.WeakSet()
# Sockets close_connections_elsewhere shut already (until their connection drops them).
_SHUT: weakref.WeakSet[socket.socket] = weakref.WeakSet()

# Error replies of a Redis node that cannot take writes for now.
NOT_SERVING = ("NOREPLICAS", "READONLY", "MASTERDOWN")


class QoS(kombu_redis.QoS):
    """kombu's Redis QoS, keeping a message whose unacked record could not be written."""

    def restore_visible(self, start: int = 0, num: int = 10, interval: int = 10) -> None:
        # kombu's sweep, with the broker's clock for "now" instead of this host's.
        self._vrestore_count += 1
        if (self._vrestore_count - 1) % (interval or 1):
            return
        # The sweep takes a lock with SET, which Redis refuses at maxmemory: skip
        # this round rather than let the error end the worker.
        try:
            with self.channel.conn_or_acquire() as client:
                ceil = pending.redis_time(client) - self.visibility_timeout
                with kombu_redis.Mutex(client, self.unacked_mutex_key, self.unacked_mutex_expire):
                    expired = client.zrange(
                        self.unacked_index_key,
                        ceil,
                        0,
                        desc=True,
                        byscore=True,
                        offset=num and start,
                        num=num,
                        withscores=True,
                    )
                    for tag, _ in expired or []:
                        self.restore_by_tag(tag, client)
        except kombu_redis.MutexHeld:
            pass  # Another worker is sweeping.
        except redis.exceptions.ResponseError as exc:
            logger.warning("skipped a sweep for expired messages: %s", exc)

    def _remove_from_indices(self, delivery_tag: str, pipe: Any = None) -> Any:
        # kombu removes in MULTI/EXEC, and Redis refuses every command queued in
        # MULTI at maxmemory: an ack would fail (and end the worker) exactly when
        # acks are what frees memory. Outside MULTI, HDEL and ZREM are allowed at
        # maxmemory. The message goes first: if the second step is lost, a stray
        # index entry is harmless, whereas a message without one is never restored.
        if pipe is not None:
            return super()._remove_from_indices(delivery_tag, pipe)
        with self.channel.conn_or_acquire() as client:
            return (
                client.pipeline(transaction=False)
                .hdel(self.unacked_key, delivery_tag)
                .zrem(self.unacked_index_key, delivery_tag)
            )

    def ack(self, delivery_tag: str) -> None:
        # Redis answers BUSY while a script runs too long, and refuses anything
        # while it is away: an ack that fails must not end the worker. The batch
        # has committed; its message stays in the unacked hash and comes back
        # after the visibility timeout, and the ledger makes that copy a no-op.
        try:
            super().ack(delivery_tag)
        except redis.RedisError as exc:
            logger.warning(
                "could not acknowledge message %s (%s); it returns after the visibility"
                " timeout and is recognised as stored",
                delivery_tag,
                exc,
            )
            virtual.QoS.ack(self, delivery_tag)

    def reject(self, delivery_tag: str, requeue: bool = False) -> None:
        # Handing a message back is a WATCH/MULTI transaction, refused at
        # maxmemory. Then the message stays in the unacked hash; this process
        # forgets it (so its lease is no longer renewed) and the visibility
        # timeout brings it back.
        try:
            super().reject(delivery_tag, requeue=requeue)
        except redis.RedisError as exc:
            logger.warning(
                "could not hand message %s back (%s); it returns after the visibility timeout",
                delivery_tag,
                exc,
            )
            virtual.QoS.ack(self, delivery_tag)

    def append(self, message: Any, delivery_tag: str) -> None:
        # kombu's record of a delivery, stamped with the broker's clock (kombu
        # takes this host's), as leases and the sweep are.
        delivery = message.delivery_info
        record = dumps([message._raw, delivery["exchange"], delivery["routing_key"]])
        try:
            with self.channel.conn_or_acquire() as client:
                delivered_at = pending.redis_time(client)
                client.pipeline().zadd(self.unacked_index_key, {delivery_tag: delivered_at}).hset(
                    self.unacked_key, delivery_tag, record
                ).execute()
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

    def _create_client(self, asynchronous: bool = False) -> Any:
        # kombu builds a new redis.Redis object for every ack, unacked record and
        # hand-back (conn_or_acquire); the object is only a handle on the
        # channel's connection pool, so one per pool serves them all.
        if asynchronous:
            return super()._create_client(asynchronous=True)
        cached = self.__dict__.get("_sync_client")
        if cached is None or cached.connection_pool is not self.pool:
            cached = self.__dict__["_sync_client"] = super()._create_client()
        return cached

    def _size(self, queue: str) -> int:
        # kombu counts a queue in MULTI/EXEC, which Redis refuses at maxmemory;
        # the count is informative only, and a worker must still start.
        try:
            return super()._size(queue)
        except redis.exceptions.ResponseError:
            return 0

    def _queue_bind(self, exchange: str, routing_key: str, pattern: str, queue: str) -> None:
        # At maxmemory Redis refuses the write that records a binding. Tasks do
        # not need it (the API pushes onto the queue's list itself), only remote
        # control does (Flower's inspect, broadcast to each worker's pidbox).
        try:
            super()._queue_bind(exchange, routing_key, pattern, queue)
        except redis.exceptions.ResponseError as exc:
            logger.warning("could not bind %s to %s (%s); continuing", queue, exchange, exc)

    def _brpop_read(self, **options: Any) -> Any:
        # A node that cannot serve writes now (a replica, a demoted primary, a
        # primary without its replicas: min-replicas-to-write) answers BRPOP with
        # an error reply, which kombu passes on and Celery treats as fatal. It is
        # broker trouble like a lost connection: close it and let Celery reconnect,
        # through Sentinel when configured, to the primary.
        try:
            return super()._brpop_read(**options)
        except redis.exceptions.ReadOnlyError as exc:
            self._drop_connection()
            raise redis.exceptions.ConnectionError(f"the broker is a replica: {exc}") from exc
        except redis.exceptions.ResponseError as exc:
            if not str(exc).startswith(NOT_SERVING):
                raise
            self._drop_connection()
            raise redis.exceptions.ConnectionError(f"the broker cannot serve: {exc}") from exc

    def _drop_connection(self) -> None:
        client = self.__dict__.get("client")
        if client is not None and client.connection is not None:
            client.connection.disconnect()

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


class SentinelChannel(Channel, kombu_redis.SentinelChannel):
    """The channel above, finding the primary through Sentinel (kombu's SentinelChannel).

    The Sentinels come from the transport option `sentinels` (host, port
    pairs), not from alternate broker URLs: kombu switches to an alternate
    URL by its scheme, which would replace this transport with its stock one
    and drop the fixes above. Every new connection asks the Sentinels for the
    primary, so after a failover the worker's reconnect finds the promoted
    replica; a connection that meets a demoted primary (READONLY) is closed
    and raises ConnectionError, which the worker survives and retries.
    """

    from_transport_options = (  # type: ignore[assignment]
        *kombu_redis.SentinelChannel.from_transport_options,
        "sentinels",
    )
    sentinels: tuple[tuple[str, int], ...] = ()
    sentinel_kwargs: dict[str, Any] | None = None
    master_name: str | None = None

    def _sentinel_managed_pool(self, asynchronous: bool = False) -> Any:
        params = self._connparams(asynchronous)
        params.pop("host", None)
        params.pop("port", None)
        manager = sentinel.Sentinel(
            list(self.sentinels), sentinel_kwargs=self.sentinel_kwargs, **params
        )
        # Kept, as kombu does, so its connections to the Sentinels are closed with the channel.
        if asynchronous:
            self._async_sentinel_manager = manager
        else:
            self._sentinel_manager = manager
        if not self.master_name:
            raise ValueError("the transport option master_name is required")
        return manager.master_for(self.master_name, redis.Redis).connection_pool


class SentinelTransport(Transport):
    """kombu's Redis transport with our fixes, finding the primary through Sentinel."""

    Channel = SentinelChannel


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


class ClockCheck:
    """Says once when this host's clock and the broker's disagree, and once when they agree again.

    Leases no longer depend on it; the warning is for whoever reads this host's
    timestamps (logs, metrics) next to others'.
    """

    def __init__(self, tolerance: float = 1.0) -> None:
        self.tolerance = tolerance
        self.offset: float | None = None

    def observe(self, before: float, broker_now: float, after: float) -> None:
        """Compare the broker's time with this host's clock read just before and after it."""
        # The broker's reading fell somewhere between `before` and `after` on this
        # host's clock: only a difference beyond that window (and the tolerance)
        # is an offset, not a slow round trip.
        if before - broker_now > self.tolerance:
            offset: float | None = before - broker_now
        elif broker_now - after > self.tolerance:
            offset = after - broker_now
        else:
            offset = None
        if offset is not None and (
            self.offset is None or abs(offset - self.offset) > self.tolerance
        ):
            logger.warning(
                "this host's clock is %+.1f s off the broker's (Redis TIME), which leases use",
                offset,
                extra={"clock_offset_s": round(offset, 3)},
            )
        elif offset is None and self.offset is not None:
            logger.info("this host's clock agrees with the broker's again")
        self.offset = offset


def _connections(channel: Channel) -> list[Any]:
    """Return the Redis connections a channel holds: its BRPOP one and its pools' (never
    creating any)."""
    found = []
    # kombu's cached `client` is the one whose connection BRPOPs.
    connection = getattr(channel.__dict__.get("client"), "connection", None)
    if connection is not None:
        found.append(connection)
    for pool in (getattr(channel, "_pool", None), getattr(channel, "_async_pool", None)):
        if pool is None:
            continue
        # redis-py's own lists (no public way to see a pool's connections), which the
        # worker's threads change as they take and return connections: copy them again
        # if one changed while it was copied.
        for _ in range(3):
            try:
                found += [*pool._available_connections, *pool._in_use_connections]
                break
            except RuntimeError:
                continue
    return found


def close_connections_elsewhere(primary: tuple[str, int]) -> int:
    """Shut this process's broker connections to any node but `primary`; return how many.

    After a failover, a worker's BRPOP still waits on the old primary, and an ack sent
    there waits for an answer. When that node's machine is gone (no reset, packets
    dropped) only TCP keepalive or TCP_USER_TIMEOUT ends the wait, ~8 s later
    (app.redis_client), and the worker's event loop stands still meanwhile. Shutting the
    socket ends the wait at once; Celery reconnects through the Sentinels to `primary`.
    """
    wanted = (str(primary[0]), int(primary[1]))
    closed = 0
    for channel in list(_CHANNELS):
        if channel.closed:
            continue
        for connection in _connections(channel):
            sock = getattr(connection, "_sock", None)
            if sock is None or sock in _SHUT:
                continue
            if (str(connection.host), int(connection.port)) == wanted:
                continue
            # Shut, not closed: the thread using it closes it when it sees the end.
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
                closed += 1
            _SHUT.add(sock)
    return closed


def start_primary_watch(client: redis.Redis, every: float) -> threading.Thread | None:
    """With Sentinels, ask them every `every` seconds for the primary, and move this
    process's broker connections to it (close_connections_elsewhere); None without Sentinels."""
    pool = client.connection_pool
    if not isinstance(pool, sentinel.SentinelConnectionPool):
        return None

    def loop() -> None:
        stop = threading.Event()
        failures = FailureLog(logger, "asking the Sentinels for the primary")
        while not stop.wait(every):
            try:
                primary = pool.get_master_address()
                closed = close_connections_elsewhere(primary)
            except Exception as exc:  # No Sentinel answers, or none names a primary yet.
                failures.failed(exc)
                continue
            failures.succeeded()
            if closed:
                logger.warning(
                    "the Sentinels name %s:%s the primary: shut %d broker connection(s) "
                    "to another node, to reconnect there",
                    primary[0],
                    primary[1],
                    closed,
                )

    thread = threading.Thread(target=loop, name="primary-watch", daemon=True)
    thread.start()
    return thread


def start_leases(client: redis.Redis, every: float) -> threading.Thread:
    """Refresh this process's leases every `every` seconds in a daemon thread."""

    def loop() -> None:
        stop = threading.Event()
        clock = ClockCheck()
        failures = FailureLog(logger, "refreshing message leases")
        while not stop.wait(every):
            try:
                before = time.time()
                broker_now = pending.refresh_leases(client, held_tags())
                clock.observe(before, broker_now, time.time())
            except Exception as exc:  # The broker may be away; the next round tries again.
                failures.failed(exc)
            else:
                failures.succeeded()

    thread = threading.Thread(target=loop, name="message-leases", daemon=True)
    thread.start()
    return thread
