"""What the API answered during a failover, read from its access log (shared by the HA tests)."""

from __future__ import annotations

import json
from datetime import datetime

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
