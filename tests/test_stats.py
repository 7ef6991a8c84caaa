"""/stats against a broker and a database set up by hand: queued is what the ledger lacks.

And /stats/topics?oldest=true against real gunicorn and Celery: each topic's oldest event
kept, only when asked, at most 100 topics a page.
"""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any

import redis
import requests
from sqlalchemy import Engine
from sqlalchemy import func
from sqlalchemy import select

from aggregator_client.client import Client
from app import store
from app.db import events
from scripts.stack import Api
from scripts.stack import Worker
from tasks.acceptance import collect_stats
from tasks.broker_state import check
from tasks.messages import build_message
from tasks.pending import Scripts
from tasks.pending import read_pending
from tests.helpers import publish
from tests.helpers import settled_stats

EVENTS = [
    {
        "topic": "stats",
        "event_id": str(n),
        "timestamp": "2026-03-01T08:00:00+00:00",
        "source": "s",
        "payload": {},
    }
    for n in range(3)
]


def topic_events(topic: str) -> list[dict[str, Any]]:
    return [event | {"topic": topic} for event in EVENTS]


def test_a_committed_batch_whose_mark_is_left_is_not_counted_as_queued(
    engine: Engine, quiet_broker: redis.Redis, clean: None
) -> None:
    scripts = Scripts(quiet_broker)
    # The broker accepts once a check has cleared it for these events.
    check(engine, quiet_broker, "redis://quiet-stats/0", wanted=len(EVENTS))
    reply = scripts.accept(
        "b-stats",
        build_message("b-stats", EVENTS),
        len(EVENTS),
        [],
        max_backlog_bytes=10**9,
        idempotency_ttl=60,
        max_idempotency_records=10,
    )
    assert reply.status == "OK"
    before = collect_stats(engine, quiet_broker, time.monotonic())
    assert (before["queued_events"], before["total_received_queued"]) == (3, 3)

    # The worker committed, then could not clear the mark (the broker was away).
    with engine.begin() as conn:
        store.store_batch(conn, "b-stats", EVENTS, epoch=reply.epoch, seq=reply.seq)
    after = collect_stats(engine, quiet_broker, time.monotonic())
    assert (after["queued_events"], after["total_received_queued"]) == (0, 3)
    assert after["unique_processed_db"] == 3
    # Reading never writes: the mark is left for the workers' sweep to clear.
    assert read_pending(quiet_broker) == {"b-stats": 3}


def test_topic_pages_say_each_topics_oldest_event_only_when_asked(
    api: Api, worker: Worker, clean: None, engine: Engine
) -> None:
    url = api.url
    publish(url, [event for topic in ("oldest.a", "oldest.b") for event in topic_events(topic)])
    settled_stats(url, received=6)
    with engine.connect() as conn:
        first = {
            row.topic: row
            for row in conn.execute(
                select(events.c.topic, func.min(events.c.position).label("position"))
                .where(events.c.topic.like("oldest.%"))
                .group_by(events.c.topic)
            )
        }
        stored_at = dict(
            conn.execute(
                select(events.c.topic, events.c.stored_at).where(
                    events.c.position.in_([row.position for row in first.values()])
                )
            ).all()
        )
    params = {"prefix": "oldest.", "oldest": "true", "limit": 100}
    page = requests.get(f"{url}/stats/topics", params=params, timeout=10).json()
    assert page["next_cursor"] is None
    assert [
        (row["topic"], row["oldest_position"], datetime.fromisoformat(row["oldest_stored_at"]))
        for row in page["topics"]
    ] == [(topic, first[topic].position, stored_at[topic]) for topic in ("oldest.a", "oldest.b")]
    assert page["topics"][0]["stored"] == 3
    # Paging with oldest walks the same way; the client asks for it too.
    one = requests.get(f"{url}/stats/topics", params=params | {"limit": 1}, timeout=10).json()
    assert one["topics"] == page["topics"][:1] and one["next_cursor"] is not None
    assert list(Client(url).topic_stats("oldest.", oldest=True)) == page["topics"]
    # Without it (or with oldest=false) the rows are the counters alone, 1,000 a page.
    for plain in (
        {"prefix": "oldest.", "limit": 1000},
        params | {"oldest": "false", "limit": 1000},
    ):
        rows = requests.get(f"{url}/stats/topics", params=plain, timeout=10).json()["topics"]
        assert [set(row) for row in rows] == [{"topic", "stored", "duplicates", "failed"}] * 2


def test_a_page_with_oldest_is_at_most_100_topics(api: Api) -> None:
    too_many = requests.get(
        f"{api.url}/stats/topics", params={"oldest": "true", "limit": 101}, timeout=10
    )
    assert too_many.status_code == 422
    assert too_many.json()["errors"] == {"limit": ["must be at most 100 with oldest=true"]}
    not_a_flag = requests.get(f"{api.url}/stats/topics", params={"oldest": "maybe"}, timeout=10)
    assert not_a_flag.status_code == 422 and "oldest" in not_a_flag.json()["errors"]
    # The default limit (100) fits, and the parameter is in the OpenAPI document.
    assert requests.get(f"{api.url}/stats/topics?oldest=1", timeout=10).status_code == 200
    document = requests.get(f"{api.url}/openapi.json", timeout=10).json()
    parameters = document["paths"]["/stats/topics"]["get"]["parameters"]
    oldest = next(p for p in parameters if p["name"] == "oldest")
    assert oldest["in"] == "query" and oldest["schema"]["type"] == "boolean"
