"""The log survives a move: pg_dump/pg_restore to a server whose transaction counter is lower
or higher, then a full walk and a resumed walk, against real private PostgreSQL servers."""

from __future__ import annotations

import contextlib
import subprocess
import uuid
from pathlib import Path

import pytest
from sqlalchemy import Engine
from sqlalchemy import func
from sqlalchemy import select

from app import store
from app.db import events
from app.db import make_engine
from scripts.services import PostgresServer
from scripts.services import find_pg_bindir
from scripts.services import free_port
from scripts.services import migrate
from tests.helpers import make_event


def store_batches(engine: Engine, prefix: str, batches: int, size: int = 10) -> None:
    for b in range(batches):
        with engine.begin() as conn:
            rows = [make_event(f"{prefix}-{b}-{n}", topic="moved") for n in range(size)]
            store.store_batch(conn, f"{prefix}-{b}", rows)


def walk(engine: Engine, cursor: str | None = None) -> tuple[list[str], list[str]]:
    """Page through everything after cursor; return event ids and the cursor after each page."""
    ids: list[str] = []
    cursors: list[str] = []
    with engine.connect() as conn:
        while True:
            page, cursor = store.list_events(conn, limit=7, cursor=cursor)
            ids.extend(e["event_id"] for e in page)
            if cursor is None:
                return ids, cursors
            cursors.append(cursor)


HIGH_XID = 100 * 2**20


def cluster(scratch_dir: Path, next_xid: int | None) -> PostgresServer:
    """A private cluster, its transaction counter moved to next_xid when given."""
    server = PostgresServer(
        scratch_dir / f"pg-move-{uuid.uuid4().hex[:6]}",
        free_port(),
        find_pg_bindir(),
        durable=False,
    )
    server.start()
    if next_xid is not None:
        server.stop()
        server.set_next_xid(next_xid)
        server.start()
    return server


def plain(url: str) -> str:
    return url.replace("postgresql+psycopg2://", "postgresql://")


@pytest.mark.parametrize("counter", ["lower", "higher"])
def test_a_walk_and_a_saved_cursor_survive_dump_and_restore(
    scratch_dir: Path, counter: str
) -> None:
    with contextlib.ExitStack() as stack:
        source = cluster(scratch_dir, HIGH_XID if counter == "lower" else None)
        stack.callback(source.stop)
        target = cluster(scratch_dir, HIGH_XID if counter == "higher" else None)
        stack.callback(target.stop)
        source.create_database("log")
        migrate(source.url("log"))
        source_engine = make_engine(source.url("log"))
        stack.callback(source_engine.dispose)
        store_batches(source_engine, "old", 4)
        before, cursors = walk(source_engine)
        assert len(before) == 40
        saved = cursors[2]  # a client stopped after its third page
        with source_engine.connect() as conn:
            old_txid = conn.execute(select(func.max(events.c.txid))).scalar_one()

        target.create_database("log")
        dump = target.base / "log.dump"
        bindir = find_pg_bindir()
        subprocess.run(
            [str(bindir / "pg_dump"), "-Fc", "-f", str(dump), plain(source.url("log"))], check=True
        )
        subprocess.run(
            [str(bindir / "pg_restore"), "-d", plain(target.url("log")), str(dump)], check=True
        )
        engine = make_engine(target.url("log"))
        stack.callback(engine.dispose)
        after, _ = walk(engine)
        assert after == before
        resumed, _ = walk(engine, saved)
        assert resumed == before[21:]
        # New events after the move follow the old ones, whatever the new server's
        # transaction ids are (lower ones once broke a (txid, id) order).
        store_batches(engine, "new", 2)
        with engine.connect() as conn:
            new_txid = conn.execute(
                select(func.min(events.c.txid)).where(events.c.event_id.like("new-%"))
            ).scalar_one()
        assert (new_txid < old_txid) == (counter == "lower")
        everything, _ = walk(engine)
        assert everything[:40] == before and len(everything) == 60
        tail, _ = walk(engine, saved)
        assert tail == before[21:] + everything[40:]
