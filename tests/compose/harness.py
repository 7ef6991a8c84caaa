"""What the compose tests share: the engine's environment, the project name, step timings."""

from __future__ import annotations

import time
from dataclasses import dataclass

# Not the directory's name: a stack of the same name a person runs here is left alone.
PROJECT_NAME = "aggregator-compose-test"

# Wall time of each step, printed at the end of the run (conftest.py).
TIMINGS: dict[str, float] = {}


def record(step: str, started: float) -> None:
    """Note how long a step took since `started` (a time.monotonic() value)."""
    TIMINGS[step] = time.monotonic() - started


@dataclass
class Engine:
    """The environment every docker command of the tests runs with."""

    env: dict[str, str]
