"""Celery task messages for the Redis transport, built without a kombu publish.

The acceptance script pushes the message itself, in the same atomic step as
the pending mark and the idempotency records, so the API builds the exact bytes
kombu's Redis transport would push: Celery's protocol 2 headers and body
(`celery.app.amqp.as_task_v2`), serialized with kombu's msgpack serializer,
base64 in kombu's JSON envelope. tests/test_messages.py checks the result
against a message kombu publishes.

Three choices differ from kombu's: the delivery tag is the batch id (kombu
picks a random one), so the resend sweep can ask kombu's unacked hash about a
batch directly; a header carries the acceptance stamp "<epoch>:<seq>", filled
in by the script; and the time limits are left to the worker (None, so its own
TASK_TIME_LIMIT/TASK_SOFT_TIME_LIMIT apply) where Celery copies the
publisher's configuration into every message.
"""

from __future__ import annotations

import base64
import json
import os
import socket
from typing import Any

from kombu.serialization import dumps as serialize

from tasks.pending import QUEUE_KEY
from tasks.pending import STAMP_HEADER
from tasks.pending import STAMP_PLACEHOLDER

TASK_NAME = "tasks.ingest.store_batch"
_HOSTNAME = socket.gethostname()


def build_message(batch_id: str, events: list[dict[str, Any]]) -> str:
    """Return the broker message that runs store_batch(batch_id, events)."""
    content_type, content_encoding, body = serialize(
        [
            [batch_id, events],
            {},
            {"callbacks": None, "errbacks": None, "chain": None, "chord": None},
        ],
        serializer="msgpack",
    )
    headers: dict[str, Any] = {
        "lang": "py",
        "task": TASK_NAME,
        "id": batch_id,
        "shadow": None,
        "eta": None,
        "expires": None,
        "group": None,
        "group_index": None,
        "retries": 0,
        "timelimit": [None, None],
        "root_id": batch_id,
        "parent_id": None,
        # Short, so monitoring does not repr() every event.
        "argsrepr": f"({batch_id!r}, <{len(events)} events>)",
        "kwargsrepr": "{}",
        "origin": f"gen{os.getpid()}@{_HOSTNAME}",
        "ignore_result": True,
        "replaced_task_nesting": 0,
        "stamped_headers": None,
        "stamps": {},
        STAMP_HEADER: STAMP_PLACEHOLDER,
    }
    envelope = {
        "body": base64.b64encode(body).decode(),
        "content-encoding": content_encoding,
        "content-type": content_type,
        "headers": headers,
        "properties": {
            "correlation_id": batch_id,
            "reply_to": "",
            "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": QUEUE_KEY},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": batch_id,
        },
    }
    # The standard library's default separators, as kombu uses: a message that
    # kombu restores (loads, then dumps) comes back byte for byte, so the
    # resend sweep can still find it on the queue by value.
    return json.dumps(envelope)


def parse_stamp(stamp: str | None) -> tuple[str | None, int | None]:
    """Split an acceptance stamp "<epoch>:<seq>" (None for messages without one)."""
    if not stamp or stamp == STAMP_PLACEHOLDER or ":" not in stamp:
        return None, None
    epoch, _, seq = stamp.rpartition(":")
    return epoch, int(seq)
