"""What the compose tests share: the engine's environment, the stack README drives, step timings."""

from __future__ import annotations

import json
import secrets
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from scripts.stack import ROOT
from scripts.stack import wait_until

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


def readme_lines(section: str = "Compose", document: str = "README.md") -> list[str]:
    """Return the lines of the first `sh` block of the document's section of that title."""
    text = (ROOT / document).read_text()
    part = text[text.index(f"\n## {section}\n") :]
    block = part[part.index("```sh\n") + len("```sh\n") :]
    return [line for line in block[: block.index("```")].splitlines() if line.strip()]


class Stack:
    """The compose project in its directory, driven the way README says."""

    def __init__(self, engine: Engine, directory: Path) -> None:
        self.directory = directory
        port, prometheus_port, grafana_port = free_port(), free_port(), free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.prometheus_url = f"http://127.0.0.1:{prometheus_port}"
        self.grafana_url = f"http://127.0.0.1:{grafana_port}"
        self.token = secrets.token_hex(32)
        # Prometheus's token may read and nothing else, as .env.example suggests.
        self.read_token = secrets.token_hex(32)
        self.password = secrets.token_hex(16)
        self.grafana_password = secrets.token_hex(16)
        self.pgaf_passwords = (secrets.token_hex(16), secrets.token_hex(16))
        tokens = f"{self.token}:publish+read+admin,{self.read_token}:read"
        # The README's `$EDITOR .env`: fills in each empty secret, and free ports; the
        # monitoring profile's two and the HA overlay's two stay empty, as plain `up` must
        # work without them (the modules that need them fill them in, below).
        editor = " ".join(
            [
                "sed -i",
                f"-e s/^POSTGRES_PASSWORD=$/POSTGRES_PASSWORD={self.password}/",
                f"-e s/^API_TOKENS=$/API_TOKENS={tokens}/",
                f"-e s/^API_TOKEN=$/API_TOKEN={self.token}/",
                f"-e s/^FLOWER_BASIC_AUTH=$/FLOWER_BASIC_AUTH=admin:{secrets.token_hex(16)}/",
                f"-e s/^PROXY_PORT=.*/PROXY_PORT={port}/",
                f"-e s/^PROMETHEUS_PORT=.*/PROMETHEUS_PORT={prometheus_port}/",
                f"-e s/^GRAFANA_PORT=.*/GRAFANA_PORT={grafana_port}/",
            ]
        )
        self.env = {**engine.env, "COMPOSE_PROJECT_NAME": PROJECT_NAME, "EDITOR": editor}
        self.lines = readme_lines()
        self.ran: set[str] = set()

    def fill_monitoring_secrets(self) -> None:
        """Give .env's empty PROMETHEUS_TOKEN and GRAFANA_ADMIN_PASSWORD a value each."""
        self.fill_env(
            {"PROMETHEUS_TOKEN": self.read_token, "GRAFANA_ADMIN_PASSWORD": self.grafana_password}
        )

    def fill_ha_secrets(self) -> None:
        """Give .env's empty PGAF_MONITOR_PASSWORD and PGAF_REPLICATION_PASSWORD a value each."""
        monitor, replication = self.pgaf_passwords
        self.fill_env({"PGAF_MONITOR_PASSWORD": monitor, "PGAF_REPLICATION_PASSWORD": replication})

    def fill_env(self, values: dict[str, str]) -> None:
        """Set each named variable that .env leaves empty (`NAME=` on a line of its own)."""
        env_file = self.directory / ".env"
        text = env_file.read_text()
        for name, value in values.items():
            text = text.replace(f"\n{name}=\n", f"\n{name}={value}\n")
        env_file.write_text(text)

    def readme(self, command: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        """Run README's line that starts with command, exactly as written there."""
        (line,) = [line for line in self.lines if line.startswith(command)]
        self.ran.add(line)
        done = self.shell(line, timeout)
        assert done.returncode == 0, f"{line}\n{done.stdout}\n{done.stderr}"
        return done

    def shell(self, line: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", "-c", f"set -euo pipefail\n{line}"],
            cwd=self.directory,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def compose(self, *args: str, timeout: float = 300) -> str:
        done = subprocess.run(
            ["docker", "compose", *args],
            cwd=self.directory,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert done.returncode == 0, f"docker compose {' '.join(args)}\n{done.stderr}"
        return done.stdout

    def containers(self) -> list[dict[str, Any]]:
        out = self.compose("ps", "--all", "--format", "json")
        # One JSON object per line (compose v2.21 and later) or one array.
        rows = (
            json.loads(out)
            if out.lstrip().startswith("[")
            else [json.loads(line) for line in out.splitlines() if line.strip()]
        )
        return rows

    def running(self, service: str) -> list[dict[str, Any]]:
        rows = self.containers()
        return [row for row in rows if row["Service"] == service and row["State"] == "running"]

    def get(self, path: str, **params: Any) -> requests.Response:
        return requests.get(f"{self.url}{path}", params=params, headers=self.auth(), timeout=30)

    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def stats(self) -> dict[str, Any]:
        response = self.get("/stats")
        assert response.status_code == 200, response.text
        return response.json()

    def settled(self, received: int, timeout: float = 120) -> dict[str, Any]:
        """Wait until /stats has received this many events and stored or dropped them all."""
        figures: dict[str, Any] = {}

        def idle() -> bool:
            figures.update(self.stats())
            return figures["total_received_queued"] >= received and figures["queued_events"] == 0

        wait_until(idle, timeout=timeout, interval=0.2)
        return figures

    def stored_rows(self) -> int:
        query = "SELECT count(*) FROM events"
        out = self.compose("exec", "-T", "postgres", "psql", "-U", "aggregator", "-tAc", query)
        return int(out.strip())

    def logs(self, service: str) -> list[str]:
        out = self.compose("logs", "--no-log-prefix", "--no-color", service)
        return [line for line in out.splitlines() if line.strip()]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def publish(stack: Stack, event: dict[str, Any] | list[dict[str, Any]]) -> int:
    return requests.post(
        f"{stack.url}/publish", json=event, headers=stack.auth(), timeout=30
    ).status_code


def event(event_id: str, topic: str) -> dict[str, Any]:
    return {
        "topic": topic,
        "event_id": event_id,
        "timestamp": "2026-12-01T08:00:00+00:00",
        "source": "compose-test",
        "payload": {"id": event_id},
    }


def json_lines(lines: list[str]) -> list[dict[str, Any]]:
    """Parse every line as JSON (a line that is not fails the test, naming it)."""
    parsed = []
    for line in lines:
        try:
            parsed.append(json.loads(line))
        except ValueError:
            pytest.fail(f"not a JSON line: {line!r}")
    return parsed
