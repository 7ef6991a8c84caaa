"""Logs: every line gunicorn and the Celery worker write is one JSON object, with request ids."""

from __future__ import annotations

import json
import logging
import re
import sys
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import redis
import requests

from app.config import SettingsError
from app.config import load_settings
from app.logs import json_formatter
from app.logs import request_id_from
from scripts.services import RedisServer
from scripts.services import private_redis
from scripts.services import throwaway_database
from scripts.stack import Api
from scripts.stack import Worker
from scripts.stack import wait_until
from tests.helpers import make_event

HEX_ID = re.compile(r"[0-9a-f]{32}")
LEVELS = {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}


def records(log: Path) -> list[dict[str, Any]]:
    """Parse every line of a log; each must be one JSON object with the four common fields."""
    parsed = []
    for number, line in enumerate(log.read_text().splitlines(), start=1):
        try:
            record = json.loads(line)
        except ValueError:
            pytest.fail(f"{log.name} line {number} is not JSON: {line!r}")
        assert isinstance(record, dict), line
        assert record["level"] in LEVELS, line
        assert isinstance(record["logger"], str) and record["logger"], line
        assert isinstance(record["message"], str), line
        assert record["time"].endswith("Z"), line
        assert datetime.fromisoformat(record["time"]).utcoffset().total_seconds() == 0
        assert isinstance(record.get("exception", ""), str), line
        parsed.append(record)
    return parsed


def access_line(api: Api, request_id: str) -> dict[str, Any]:
    """Return the access log line of one request, waiting for it to be written."""
    found: list[dict[str, Any]] = []

    def written() -> bool:
        found[:] = [
            record
            for record in records(api.log)
            if record["logger"] == "gunicorn.access" and record.get("request_id") == request_id
        ]
        return bool(found)

    wait_until(written, timeout=10)
    assert len(found) == 1, found
    return found[0]


@pytest.fixture(scope="module")
def broker(scratch_dir: Path) -> Iterator[RedisServer]:
    """A Redis of this module's own, so no other test's worker takes its batches."""
    with private_redis(scratch_dir / "redis-logs") as server:
        yield server


@pytest.fixture(scope="module")
def env(
    stack_env: dict[str, str], pg_server_url: str, broker: RedisServer
) -> Iterator[dict[str, str]]:
    """The test environment on a database and a broker of this module's own."""
    with throwaway_database(pg_server_url, "agg_logs") as url:
        yield {**stack_env, "DATABASE_URL": url, "REDIS_URL": broker.url, "LOG_LEVEL": "INFO"}


@pytest.fixture(scope="module")
def api(env: dict[str, str], logs: Path) -> Iterator[Api]:
    """One gevent process, so concurrent requests share it, with the access log on."""
    log = logs / "logs-api.log"
    log.unlink(missing_ok=True)
    server = Api(env, log, workers=1, access_log=True).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def worker(env: dict[str, str], logs: Path) -> Iterator[Worker]:
    log = logs / "logs-worker.log"
    log.unlink(missing_ok=True)
    process = Worker(env, log).start()
    yield process
    process.stop()


def test_a_request_without_an_id_gets_one_in_the_answer_and_the_access_line(api: Api) -> None:
    response = requests.get(f"{api.url}/health", timeout=10)
    assert response.status_code == 200
    request_id = response.headers["X-Request-ID"]
    assert HEX_ID.fullmatch(request_id)
    line = access_line(api, request_id)
    assert (line["method"], line["path"], line["status"]) == ("GET", "/health", 200)
    assert line["message"] == "127.0.0.1 GET /health 200"
    assert line["client"] == "127.0.0.1"  # the client's address, on every access line
    assert isinstance(line["duration_ms"], float) and line["duration_ms"] >= 0
    assert "batch_id" not in line


def test_a_publish_is_traced_by_its_request_id_and_batch_id(api: Api, worker: Worker) -> None:
    request_id = f"client-{uuid.uuid4()}"
    events = [make_event(f"logs-{i}", topic="logs") for i in range(3)]
    response = requests.post(
        f"{api.url}/publish", json=events, headers={"X-Request-ID": request_id}, timeout=10
    )
    assert response.status_code == 202, response.text
    assert response.headers["X-Request-ID"] == request_id
    batch_id = response.json()["batch_id"]

    line = access_line(api, request_id)
    assert (line["method"], line["path"], line["status"]) == ("POST", "/publish", 202)
    assert line["batch_id"] == batch_id

    stored: list[dict[str, Any]] = []

    def logged() -> bool:
        stored[:] = [
            record
            for record in records(worker.log)
            if record["logger"] == "tasks.ingest" and record.get("batch_id") == batch_id
        ]
        return bool(stored)

    wait_until(logged, timeout=30)
    assert len(stored) == 1, stored
    line = stored[0]
    assert line["level"] == "INFO"
    assert (line["received"], line["stored"], line["duplicates"], line["failed"]) == (3, 3, 0, 0)
    assert line["replayed"] is False
    assert line["task"] == "tasks.ingest.store_batch" and line["task_id"]
    # Celery's own line for the task, from the same pool process, has it too.
    wait_until(
        lambda: any(
            record.get("batch_id") == batch_id and "succeeded" in record["message"]
            for record in records(worker.log)
        ),
        timeout=10,
    )


@pytest.mark.parametrize(
    "given",
    [
        "x" * 129,
        "spaces are not allowed",
        'quote"and{brace}',
        "ünïcödé",
    ],
)
def test_an_unusable_request_id_is_replaced(api: Api, given: str) -> None:
    response = requests.get(
        f"{api.url}/health", headers={"X-Request-ID": given.encode()}, timeout=10
    )
    request_id = response.headers["X-Request-ID"]
    assert request_id != given
    assert HEX_ID.fullmatch(request_id)
    assert access_line(api, request_id)["path"] == "/health"


def test_a_warning_inside_each_of_many_concurrent_requests_carries_its_own_id(
    api: Api, broker: RedisServer
) -> None:
    """Under gevent, 20 requests wait together in one process; each warning names its own."""
    ids = [f"stalled-{n}-{uuid.uuid4().hex[:8]}" for n in range(20)]
    with redis.Redis.from_url(broker.url) as client:
        # Every write waits: the API's acceptance times out (BROKER_TIMEOUT) and answers 503,
        # after the requests have all been waiting in their greenlets at once.
        client.execute_command("CLIENT", "PAUSE", "3000", "WRITE")
        try:
            with ThreadPoolExecutor(len(ids)) as pool:
                answers = list(
                    pool.map(
                        lambda request_id: requests.post(
                            f"{api.url}/publish",
                            json=make_event(request_id, topic="logs-stalled"),
                            headers={"X-Request-ID": request_id},
                            timeout=30,
                        ),
                        ids,
                    )
                )
        finally:
            client.execute_command("CLIENT", "UNPAUSE")
    assert [answer.status_code for answer in answers] == [503] * len(ids)
    assert [answer.headers["X-Request-ID"] for answer in answers] == ids

    for request_id in ids:
        assert access_line(api, request_id)["status"] == 503
    warnings = [
        record
        for record in records(api.log)
        if record["level"] == "WARNING" and record["message"].startswith("broker unavailable")
    ]
    assert sorted(record.get("request_id") for record in warnings) == sorted(ids)
    assert all(record["logger"] == "app.errors" for record in warnings)


def test_an_exception_is_one_string_field() -> None:
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        record = logging.getLogger("tests.logs").makeRecord(
            "tests.logs", logging.ERROR, __file__, 1, "failed: %s", ("x",), sys.exc_info()
        )
    line = json.loads(json_formatter().format(record))
    assert (line["level"], line["logger"], line["message"]) == ("ERROR", "tests.logs", "failed: x")
    assert line["exception"].startswith("Traceback (most recent call last):")
    assert line["exception"].rstrip().endswith("RuntimeError: boom")


def test_sane_request_ids_are_kept() -> None:
    for given in ("abc", "0f" * 16, str(uuid.uuid4()), "01J9ZQ3K+/=_.:-x", "x" * 128):
        assert request_id_from(given) == given
    for given in ("", None, "x" * 129, "a b", "a\tb", "a\nb", "é", "<script>"):
        assert HEX_ID.fullmatch(request_id_from(given))


def test_log_level_comes_from_the_environment() -> None:
    assert load_settings({}).log_level == "INFO"
    assert load_settings({"LOG_LEVEL": " debug "}).log_level == "DEBUG"
    with pytest.raises(SettingsError, match="LOG_LEVEL"):
        load_settings({"LOG_LEVEL": "verbose"})


def test_every_line_of_both_logs_is_one_json_object(api: Api, worker: Worker) -> None:
    """Last: stop both, so their start, work and shutdown are all in the logs."""
    requests.get(f"{api.url}/health", timeout=10)
    api.stop()
    worker.stop()
    api_lines = records(api.log)
    worker_lines = records(worker.log)
    loggers = {record["logger"] for record in api_lines + worker_lines}
    assert {"gunicorn.error", "gunicorn.access", "app.errors"} <= loggers
    assert {"celery.apps.worker", "celery.worker.strategy", "tasks.ingest"} <= loggers
    assert any(record["message"].endswith(" ready.") for record in worker_lines)
    # Celery prints "worker: Warm shutdown" as text; here it is a log line.
    assert any("Warm shutdown (SIGTERM)" in record["message"] for record in worker_lines)
    assert any(record["message"] == "Shutting down: Master" for record in api_lines)
