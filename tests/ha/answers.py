"""What the API answered during a failover (from its access log) and when batches were stored
(shared by the HA tests)."""

from __future__ import annotations

import json
from datetime import datetime

from sqlalchemy import Engine
from sqlalchemy import func
from sqlalchemy import select

from app.db import batches
from scripts.stack import Api


def answers_since(api: Api, offset: int) -> list[tuple[float, int]]:
    """Return (time, status) of every POST /publish the API answered after `offset` in its log."""
    answers = []
    with open(api.log, "rb") as handle:
        handle.seek(offset)
        for raw in handle:
            try:
                line = json.loads(raw)
            except ValueError:
                continue
            if line.get("path") == "/publish" and "status" in line:
                stamp = datetime.fromisoformat(line["time"].replace("Z", "+00:00")).timestamp()
                answers.append((stamp, int(line["status"])))
    return sorted(answers)


def unavailable_seconds(answers: list[tuple[float, int]], since: float) -> float:
    """Return the time from the first 503 after `since` to the last one (0 if none)."""
    refused = [stamp for stamp, status in answers if stamp >= since and status == 503]
    return max(refused) - min(refused) if refused else 0.0


def first_stored_after(engine: Engine, seq: int) -> float | None:
    """Return when the first batch accepted after acceptance `seq` was stored (wall clock)."""
    with engine.connect() as conn:
        moment = conn.execute(
            select(func.min(batches.c.processed_at)).where(batches.c.broker_seq > seq)
        ).scalar()
    return None if moment is None else moment.timestamp()


def batch_times(engine: Engine) -> list[float]:
    """Return when every batch was stored (wall clock, the database's), in order."""
    with engine.connect() as conn:
        moments = conn.execute(select(batches.c.processed_at).order_by("processed_at")).scalars()
        return [moment.timestamp() for moment in moments]
