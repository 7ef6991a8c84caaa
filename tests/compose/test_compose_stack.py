"""README's Compose section, line by line, against a real Docker engine.

Every command of that section runs here as written (in a copy of the repository, under
its own project name), in order, and each step checks what the section says it does:
an unedited .env refused; `up --build -d --wait` healthy without a registry; the
publisher service's 20,000 events with exact duplicates and its JSON log; a smoke test
inside an API container; the same event 5 times stored once (seed test B); 3 API
replicas and 3 workers behind the proxy storing one of 50 concurrent copies (seed
test D), still 3 after `run --rm --no-deps publisher`; workers' JSON logs; `down`
and `up` keeping rows and counters (seed test C); `down -v` starting from zero.
"""

from __future__ import annotations

import json
import re
import secrets
import socket
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests

from scripts.stack import ROOT
from scripts.stack import wait_until
from tests.compose.harness import PROJECT_NAME
from tests.compose.harness import Engine
from tests.compose.harness import record

pytestmark = pytest.mark.incremental

APP_SERVICES = ("migrate", "aggregator", "worker", "flower")
LONG_RUNNING = ("postgres", "redis", "aggregator", "worker", "flower", "proxy")
SECRETS = ("POSTGRES_PASSWORD", "API_TOKENS", "API_TOKEN", "FLOWER_BASIC_AUTH")
EVENTS = 20_000
DUPLICATES = 2_000


def readme_lines() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("\n## Compose\n") :]
    block = section[section.index("```sh\n") + len("```sh\n") :]
    return [line for line in block[: block.index("```")].splitlines() if line.strip()]


class Stack:
    """The compose project in its directory, driven the way README says."""

    def __init__(self, engine: Engine, directory: Path) -> None:
        self.directory = directory
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.token = secrets.token_hex(32)
        self.password = secrets.token_hex(16)
        # The README's `$EDITOR .env`: fills in each empty secret, and a free port.
        editor = " ".join(
            [
                "sed -i",
                f"-e s/^POSTGRES_PASSWORD=$/POSTGRES_PASSWORD={self.password}/",
                f"-e s/^API_TOKENS=$/API_TOKENS={self.token}:publish+read+admin/",
                f"-e s/^API_TOKEN=$/API_TOKEN={self.token}/",
                f"-e s/^FLOWER_BASIC_AUTH=$/FLOWER_BASIC_AUTH=admin:{secrets.token_hex(16)}/",
                f"-e s/^PROXY_PORT=.*/PROXY_PORT={port}/",
            ]
        )
        self.env = {**engine.env, "COMPOSE_PROJECT_NAME": PROJECT_NAME, "EDITOR": editor}
        self.lines = readme_lines()
        self.ran: set[str] = set()

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


def publish(stack: Stack, event: dict[str, Any]) -> int:
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


@pytest.fixture(scope="module")
def stack(docker_engine: Engine, project_dir: Path) -> Iterator[Stack]:
    stack = Stack(docker_engine, project_dir)
    yield stack
    stack.shell("docker compose --profile publish down -v --remove-orphans", timeout=300)


def test_an_unedited_copy_of_env_example_is_refused(stack: Stack) -> None:
    done = stack.shell("cp .env.example .env && docker compose up --build -d --wait")
    assert done.returncode != 0
    # Compose names the first empty secret it meets (its order varies).
    refused = re.search(r"required variable (\w+) is missing a value", done.stderr)
    assert refused is not None and refused.group(1) in SECRETS, done.stderr
    assert not stack.containers()  # nothing was started
    stack.readme("cp .env.example .env && $EDITOR .env")
    filled = dict(
        line.split("=", 1) for line in (stack.directory / ".env").read_text().splitlines()
        if line and not line.startswith("#")
    )  # fmt: skip
    assert all(filled.values()), filled


def test_up_builds_without_a_registry_and_waits_until_every_service_is_healthy(
    stack: Stack,
) -> None:
    started = time.monotonic()
    stack.readme("docker compose up --build -d --wait", timeout=1200)
    record("up --build -d --wait: image built, every service healthy", started)
    states = {row["Service"]: row for row in stack.containers()}
    for service in LONG_RUNNING:
        assert states[service]["Health"] == "healthy", states[service]
    assert states["migrate"]["State"] == "exited" and states["migrate"]["ExitCode"] == 0
    # migrate says what it did, as JSON lines like every other process.
    applied = [entry["message"] for entry in json_lines(stack.logs("migrate"))]
    assert any(message.startswith("Running upgrade") for message in applied), applied
    # The image holds what runs, not the tests, benchmarks or docs.
    listing = stack.compose("run", "--rm", "--no-deps", "--entrypoint", "ls", "migrate", "/app")
    assert {"app", "tasks", "publisher", "migrations"} <= set(listing.split())
    assert not {"tests", "bench", "docs", "deploy", "scripts", ".env"} & set(listing.split())


def test_the_publisher_service_stores_20000_events_with_exact_duplicates(stack: Stack) -> None:
    started = time.monotonic()
    stack.readme("docker compose up -d --no-deps --force-recreate publisher")
    followed = stack.readme("docker compose logs -f publisher")
    record("publisher service: 20,000 events, verified", started)
    (document,) = [json.loads(line.split("|", 1)[-1]) for line in followed.stdout.splitlines()
                   if line.split("|", 1)[-1].strip().startswith("{")]  # fmt: skip
    assert document["summary"]["sent"] == EVENTS
    assert document["summary"]["errors"] == 0
    assert document["verify"]["ok"] is True, document["verify"]
    assert document["verify"]["observed_stored"] == EVENTS - DUPLICATES
    assert document["verify"]["observed_duplicates"] == DUPLICATES
    figures = stack.settled(EVENTS)
    assert figures["unique_processed_db"] == EVENTS - DUPLICATES
    assert figures["estimated_duplicate_dropped"] == DUPLICATES
    assert stack.stored_rows() == EVENTS - DUPLICATES


def test_a_smoke_test_runs_inside_an_api_container(stack: Stack) -> None:
    done = stack.readme("docker compose exec aggregator sh -c")
    shown = dict(line.split(None, 1) for line in done.stdout.splitlines() if line.strip())
    assert shown["unique_processed_db"] == str(EVENTS - DUPLICATES)
    # The container's own command line publishes and reads back through its own gunicorn.
    ndjson = json.dumps(json.dumps(event("smoke-1", "compose-smoke")))
    options = '--token "${API_TOKENS%%[:,]*}" --url http://127.0.0.1:8080'
    commands = [
        f"echo {ndjson} | aggregator publish - {options}",
        f"aggregator tail --topic compose-smoke --no-follow --json {options}",
    ]
    done = stack.shell(f"docker compose exec -T aggregator sh -c '{' && '.join(commands)}'")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1])["event_id"] == "smoke-1"


def test_the_same_event_five_times_is_stored_once_and_counted_four_times_as_duplicate(
    stack: Stack,
) -> None:
    before = stack.stats()
    assert [publish(stack, event("b-1", "compose-b")) for _ in range(5)] == [202] * 5
    after = stack.settled(before["total_received_queued"] + 5)
    assert after["unique_processed_db"] - before["unique_processed_db"] == 1
    assert after["estimated_duplicate_dropped"] - before["estimated_duplicate_dropped"] == 4


def test_three_api_replicas_and_three_workers_store_one_of_50_concurrent_copies(
    stack: Stack,
) -> None:
    started = time.monotonic()
    stack.readme("docker compose up -d --wait --scale aggregator=3 --scale worker=3")
    record("scale to 3 API replicas and 3 workers, healthy", started)
    assert len(stack.running("aggregator")) == 3 and len(stack.running("worker")) == 3
    since = stack.compose("exec", "-T", "postgres", "date", "-u", "+%Y-%m-%dT%H:%M:%SZ").strip()
    before = stack.stats()
    with ThreadPoolExecutor(50) as pool:
        codes = list(pool.map(lambda _: publish(stack, event("d-1", "compose-d")), range(50)))
    assert codes == [202] * 50
    after = stack.settled(before["total_received_queued"] + 50)
    assert after["unique_processed_db"] - before["unique_processed_db"] == 1
    assert after["estimated_duplicate_dropped"] - before["estimated_duplicate_dropped"] == 49
    assert after["failed_events"] == 0
    # The proxy spread the requests over every replica (it resolves the name per request).
    served = stack.compose("logs", "--no-color", "--since", since, "aggregator")
    replicas = {line.split("|", 1)[0].strip() for line in served.splitlines() if "/publish" in line}
    assert len(replicas) == 3, replicas
    # The publisher again, across the replicas: `--no-deps` leaves the scale as it is.
    started = time.monotonic()
    done = stack.readme("docker compose run --rm --no-deps publisher")
    record("run --rm --no-deps publisher across 3 + 3", started)
    assert json.loads(done.stdout.strip().splitlines()[-1])["verify"]["ok"] is True
    assert len(stack.running("aggregator")) == 3 and len(stack.running("worker")) == 3


def test_workers_and_api_replicas_log_json_lines_and_no_errors(stack: Stack) -> None:
    done = stack.readme("docker compose logs worker")
    lines = [line.split("|", 1)[1] for line in done.stdout.splitlines() if "|" in line]
    served = stack.compose("logs", "--no-color", "aggregator")
    lines += [line.split("|", 1)[1] for line in served.splitlines() if "|" in line]
    entries = json_lines(lines)
    assert any(entry["logger"] == "tasks.ingest" for entry in entries)
    errors = [
        entry
        for entry in entries
        if entry["level"] in ("ERROR", "CRITICAL") or entry.get("status", 0) >= 500
    ]
    assert not errors, "\n".join(json.dumps(entry) for entry in errors)


def test_down_and_up_keep_the_stored_events_and_the_counters(stack: Stack) -> None:
    before, rows = stack.stats(), stack.stored_rows()
    started = time.monotonic()
    stack.readme("docker compose --profile publish down && docker compose up -d --wait")
    record("down, then up -d --wait (data kept)", started)
    after = stack.stats()
    for counter in ("unique_processed_db", "estimated_duplicate_dropped", "total_received_queued"):
        assert after[counter] == before[counter], counter
    assert stack.stored_rows() == rows > EVENTS - DUPLICATES


def test_down_v_removes_the_data_too(stack: Stack) -> None:
    stack.readme("docker compose --profile publish down -v")
    assert not stack.containers()
    stack.compose("up", "-d", "--wait", timeout=600)
    figures = stack.stats()
    assert figures["unique_processed_db"] == 0 and figures["total_received_queued"] == 0
    assert stack.stored_rows() == 0
    assert set(stack.lines) == stack.ran, "README lines this test never ran"
