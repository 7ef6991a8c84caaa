"""The messages the API builds are the messages kombu would publish, and a worker runs them."""

from __future__ import annotations

import base64
import json

import msgpack
import redis

from tasks import celery_app
from tasks.ingest import store_batch
from tasks.messages import STAMP_HEADER
from tasks.messages import build_message
from tasks.messages import parse_stamp
from tasks.pending import QUEUE_KEY
from tasks.pending import STAMP_PLACEHOLDER

EVENTS = [
    {
        "topic": "t",
        "event_id": "1",
        "timestamp": "2026-03-01T08:00:00+00:00",
        "source": "s",
        "payload": {"n": 1, "nested": [1, "two", None]},
    }
]


def kombu_message(client: redis.Redis, batch_id: str) -> dict:
    """Publish through Celery and kombu to a queue no worker reads, and read back the message."""
    url = "redis://{host}:{port}/{db}".format(**client.connection_pool.connection_kwargs)
    with celery_app.connection_for_write(url) as connection:
        store_batch.apply_async(
            args=(batch_id, EVENTS),
            task_id=batch_id,
            argsrepr=f"({batch_id!r}, <1 events>)",
            kwargsrepr="{}",
            connection=connection,
        )
    [raw] = client.lrange(QUEUE_KEY, 0, -1)
    client.delete(QUEUE_KEY)
    return json.loads(raw)


def test_built_message_matches_what_kombu_publishes(quiet_broker: redis.Redis) -> None:
    ours = json.loads(build_message("b1", EVENTS))
    theirs = kombu_message(quiet_broker, "b1")
    assert ours.keys() == theirs.keys()
    for field in ("content-type", "content-encoding"):
        assert ours[field] == theirs[field]
    assert msgpack.unpackb(base64.b64decode(ours["body"])) == msgpack.unpackb(
        base64.b64decode(theirs["body"])
    )
    # Ours carries the acceptance stamp; the origin names the publishing process.
    assert ours["headers"].pop(STAMP_HEADER) == STAMP_PLACEHOLDER
    assert ours["headers"].pop("origin") and theirs["headers"].pop("origin")
    # The time limits are the worker's to set (Celery copies the publisher's config).
    assert ours["headers"].pop("timelimit") == [None, None]
    assert theirs["headers"].pop("timelimit") == [
        celery_app.conf.task_time_limit,
        celery_app.conf.task_soft_time_limit,
    ]
    assert ours["headers"] == theirs["headers"]
    # The delivery tag is the batch id (kombu's is random), so sweeps can look it up.
    assert ours["properties"].pop("delivery_tag") == "b1"
    theirs["properties"].pop("delivery_tag")
    # Celery names a reply queue for results; store_batch has none (ignore_result).
    assert ours["properties"].pop("reply_to") == ""
    theirs["properties"].pop("reply_to")
    # apply_async copies the argsrepr/kwargsrepr options into the properties as well.
    theirs["properties"].pop("argsrepr")
    theirs["properties"].pop("kwargsrepr")
    assert ours["properties"] == theirs["properties"]


def test_a_restored_message_is_the_same_bytes() -> None:
    # kombu restores a message with json loads/dumps; the resend sweep finds it by value.
    message = build_message("b2", EVENTS)
    assert json.dumps(json.loads(message)) == message


def test_stamps_parse() -> None:
    assert parse_stamp("abc:12") == ("abc", 12)
    assert parse_stamp(None) == (None, None)
    assert parse_stamp(STAMP_PLACEHOLDER) == (None, None)
