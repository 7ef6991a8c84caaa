"""The Redis transport with one fix: a broker lost mid-task must not end the worker."""

from __future__ import annotations

from typing import Any

import redis
from kombu.transport import redis as kombu_redis


class Channel(kombu_redis.Channel):
    """A Redis channel that reports a closed transport as a connection error."""

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
