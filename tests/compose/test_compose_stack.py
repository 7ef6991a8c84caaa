"""README's Compose section, line by line, against a real Docker engine.

Every command of that section runs here as written (in a copy of the repository, under
its own project name), in order, and each step checks what the section says it does:
an unedited .env refused; `up --build -d --wait` healthy without a registry; the
publisher service's 20,000 events with exact duplicates and its JSON log; a smoke test
inside an API container; the same event 5 times stored once (seed test B); 3 API
replicas and 3 workers behind the proxy storing one of 50 concurrent copies (seed
test D), still 3 after `run --rm --no-deps publisher`; workers' JSON logs; the beat
sending retention runs that a worker carries out; `down`
and `up` keeping rows and counters (seed test C); `down -v` starting from zero, the
stack left running and empty for test_monitoring_profile.py (the session removes it).
"""

from __future__ import annotations

import json
import re
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.compose.harness import Stack
from tests.compose.harness import event
from tests.compose.harness import json_lines
from tests.compose.harness import publish
from tests.compose.harness import record

pytestmark = pytest.mark.incremental

APP_SERVICES = ("migrate", "aggregator", "worker", "flower")
LONG_RUNNING = ("postgres", "redis", "aggregator", "worker", "beat", "flower", "proxy")
SECRETS = (
    "POSTGRES_PASSWORD",
    "API_TOKENS",
    "API_TOKEN",
    "FLOWER_BASIC_AUTH",
)
# The monitoring profile's: optional for plain `up`, refused by their own containers.
MONITORING_SECRETS = ("PROMETHEUS_TOKEN", "GRAFANA_ADMIN_PASSWORD")
EVENTS = 20_000
DUPLICATES = 2_000


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
    assert all(filled[name] for name in SECRETS), filled
    # Left empty on purpose: the next step's plain `up` must not need them.
    assert [filled[name] for name in MONITORING_SECRETS] == ["", ""], filled


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


def test_the_beat_sends_retention_runs_that_a_worker_carries_out(stack: Stack) -> None:
    # Every 5 s instead of the hour .env.example leaves it at: recreates the beat alone.
    with (stack.directory / ".env").open("a") as env_file:
        env_file.write("RETENTION_INTERVAL=5\n")
    stack.compose("up", "-d", "--wait", "--no-deps", "beat", timeout=300)

    def runs() -> list[dict]:
        return [
            entry
            for entry in json_lines(stack.logs("worker"))
            if entry["message"] == "retention run"
        ]

    deadline = time.monotonic() + 90
    while not runs() and time.monotonic() < deadline:
        time.sleep(2)
    [first, *_] = runs() or [None]
    assert first is not None, "\n".join(stack.logs("beat")[-20:])
    # Off by default: it only keeps partitions ready ahead, and drops nothing.
    assert first["ran"] is True and first["dropped"] == [], first
    assert any("tasks.retention.run" in line for line in stack.logs("beat"))
    assert stack.stats()["retention"]["dropped_through"] == 0


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
