"""What became of a batch: GET /batches/<id>, `aggregator batch` and the publish summary.

Against a real gunicorn (tokens required), a Celery worker and PostgreSQL: a
batch reads queued while a worker is held mid-transaction, then stored with
the ledger's counts; the same batch published again reads all duplicates;
unknown ids are 404 and malformed ones 422 naming the field. The CLI's
summary of a re-published file reports the server's outcome (stored 0,
duplicates 1000), says which batches are still queued, and labels its own
counts as client-side.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import requests
from sqlalchemy import Engine
from sqlalchemy import text

from scripts.stack import BIN
from scripts.stack import Api
from scripts.stack import Worker
from scripts.stack import wait_until
from tests.helpers import TableLock
from tests.helpers import make_event
from tests.helpers import publish

READER = "batches-" + secrets.token_hex(20)
PUBLISHER = "batches-publish-" + secrets.token_hex(20)


@pytest.fixture(scope="module")
def guarded(stack_env: dict[str, str], logs: Path) -> Iterator[Api]:
    """An API as deployed: one token that publishes and reads, one that only publishes."""
    env = {
        **stack_env,
        "AUTH_DISABLED": "",
        "API_TOKENS": f"{READER}:publish+read,{PUBLISHER}:publish",
    }
    server = Api(env, logs / "batches-api.log", workers=1).start()
    yield server
    server.stop()


@pytest.fixture
def url(guarded: Api, worker: Worker, clean: None) -> str:
    return guarded.url


def bearer(token: str = READER) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def get_batch(url: str, batch_id: str, token: str = READER) -> requests.Response:
    return requests.get(f"{url}/batches/{batch_id}", headers=bearer(token), timeout=10)


def stored_batch(url: str, batch_id: str) -> dict[str, Any]:
    """Wait until the batch reads stored; return its answer."""
    answers: list[dict[str, Any]] = []

    def stored() -> bool:
        response = get_batch(url, batch_id)
        assert response.status_code == 200, response.text
        answers.append(response.json())
        return answers[-1]["status"] == "stored"

    wait_until(stored, timeout=60, interval=0.05)
    return answers[-1]


def counts(answer: dict[str, Any]) -> tuple[int, int, int, int]:
    return (answer["received"], answer["stored"], answer["duplicates"], answer["failed"])


def test_a_batch_reads_queued_then_stored_and_its_copy_all_duplicates(
    url: str, engine: Engine
) -> None:
    batch = [make_event(f"b-{n}", topic="batches") for n in range(1000)]
    lock = TableLock(engine)
    try:
        first = publish(url, batch, **bearer()).json()["batch_id"]
        # The worker has claimed the batch and waits, uncommitted, on the lock.
        lock.wait_for_blocked_tasks(1)
        queued = get_batch(url, first)
        assert queued.status_code == 200, queued.text
        assert queued.json() == {
            "batch_id": first,
            "status": "queued",
            "received": 1000,
            "stored": None,
            "duplicates": None,
            "failed": None,
            "processed_at": None,
        }
    finally:
        lock.release()
    answer = stored_batch(url, first)
    assert counts(answer) == (1000, 1000, 0, 0)
    assert answer["batch_id"] == first and answer["processed_at"].endswith("+00:00")

    again = publish(url, batch, **bearer()).json()["batch_id"]
    assert again != first
    assert counts(stored_batch(url, again)) == (1000, 0, 1000, 0)
    # The first batch's answer does not change.
    assert get_batch(url, first).json() == answer


def test_events_the_database_refuses_count_as_failed(url: str, engine: Engine) -> None:
    with engine.begin() as conn:
        conn.execute(
            text("ALTER TABLE events ADD CONSTRAINT ck_batches_blocked CHECK (source <> 'blocked')")
        )
    try:
        body = [make_event("f-1"), {**make_event("f-2"), "source": "blocked"}]
        batch_id = publish(url, body, **bearer()).json()["batch_id"]
        assert counts(stored_batch(url, batch_id)) == (2, 1, 0, 1)
    finally:
        with engine.begin() as conn:
            conn.execute(text("ALTER TABLE events DROP CONSTRAINT IF EXISTS ck_batches_blocked"))


def test_an_unknown_batch_is_404_and_a_malformed_id_422_naming_it(url: str) -> None:
    unknown = get_batch(url, uuid.uuid4().hex)
    assert unknown.status_code == 404
    body = unknown.json()
    assert (body["code"], body["status"]) == (404, "Not Found")
    assert "never accepted here, or its ledger row was deleted" in body["message"]
    for garbage in ("not%20a%20batch", "x" * 201, "%C3%A9t%C3%A9", "a.b"):
        refused = get_batch(url, garbage)
        assert refused.status_code == 422, (garbage, refused.text)
        assert list(refused.json()["errors"]) == ["batch_id"]
        assert "the batch_id a 202 answered" in refused.json()["errors"]["batch_id"][0]


def test_reading_a_batch_needs_the_read_scope(url: str) -> None:
    batch_id = publish(url, [make_event("s-1")], **bearer(PUBLISHER)).json()["batch_id"]
    refused = get_batch(url, batch_id, token=PUBLISHER)
    assert refused.status_code == 403
    assert "'read' scope" in refused.json()["message"]
    assert requests.get(f"{url}/batches/{batch_id}", timeout=10).status_code == 401


def aggregator(*args: str, token: str = READER) -> subprocess.CompletedProcess[str]:
    """Run the console script as a user would, the token by environment."""
    env = {k: v for k, v in os.environ.items() if k not in ("API_TOKEN", "AGGREGATOR_URL")}
    return subprocess.run(
        [str(BIN / "aggregator"), *args],
        capture_output=True,
        text=True,
        env={**env, "API_TOKEN": token},
        timeout=120,
    )


def rows(output: str) -> dict[str, str]:
    """Return the summary's rows by name (the first twelve columns)."""
    return {line[:12].strip(): line[12:] for line in output.splitlines()}


@pytest.fixture
def log_lines(tmp_path: Path) -> Path:
    """1,000 lines of a log: 950 distinct events, and 50 of them again."""
    events = [make_event(f"line-{n}", topic="mylog") for n in range(950)]
    path = tmp_path / "lines.ndjson"
    path.write_bytes(b"".join(orjson.dumps(event) + b"\n" for event in events + events[:50]))
    return path


def test_the_summary_of_a_republished_file_is_the_servers_outcome(
    url: str, log_lines: Path
) -> None:
    first = aggregator("publish", str(log_lines), "--url", url, "--json")
    assert first.returncode == 0, first.stderr
    document = orjson.loads(first.stdout)
    outcome = document["outcome"]
    assert (outcome["stored"], outcome["duplicates"], outcome["failed"]) == (950, 50, 0)
    assert (outcome["batches"], outcome["stored_batches"], outcome["queued_batches"]) == (2, 2, 0)
    assert sorted(document["summary"]["batches"].values()) == [500, 500]

    again = aggregator("publish", str(log_lines), "--url", url)
    assert again.returncode == 0, again.stderr
    summary = rows(again.stdout)
    # The ids to look up with `aggregator batch`, in the text summary too.
    assert summary["accepted"].startswith("1000 events answered 202, in 2 batches: ")
    assert len(summary["accepted"].split(": ")[1].split()) == 2
    assert summary["outcome"] == (
        "stored 0, duplicates 1000, failed 0 (server's ledger: 2 of 2 batches stored)"
    )
    # The client's own count is still there, labelled as such.
    assert (
        summary["client-side"] == "950 distinct keys, 50 repeated within this run (not the outcome)"
    )
    assert "queued" not in summary

    ids = list(document["summary"]["batches"])
    looked = aggregator("batch", *ids, "--url", url)
    assert looked.returncode == 0, looked.stderr
    lines = looked.stdout.splitlines()
    assert [line.split()[:2] for line in lines] == [[ids[0], "stored"], [ids[1], "stored"]]
    assert sum(int(line.split("stored ")[2].split(",")[0]) for line in lines) == 950


def test_batch_command_says_unknown_and_malformed_ids(url: str) -> None:
    unknown = uuid.uuid4().hex
    missing = aggregator("batch", unknown, "--url", url, "--json")
    assert missing.returncode == 6
    assert orjson.loads(missing.stdout) == [{"batch_id": unknown, "status": "unknown"}]
    assert f"no batch {unknown}" in missing.stderr
    malformed = aggregator("batch", "not a batch", "--url", url)
    assert malformed.returncode == 3
    assert "HTTP 422" in malformed.stderr and "batch_id" in malformed.stderr


def test_the_summary_says_which_batches_are_still_queued(url: str, engine: Engine) -> None:
    lock = TableLock(engine)
    try:
        run = aggregator("publish", "--generate", "10", "--url", url, "--wait-stored", "0.5")
        assert run.returncode == 0, run.stderr
        summary = rows(run.stdout)
        assert summary["outcome"] == (
            "stored 0, duplicates 0, failed 0 so far (server's ledger: 0 of 1 batch stored)"
        )
        assert summary["queued"].startswith("still queued: 1 batch (10 events) after 0.")
        batch_id = summary["queued"].split("aggregator batch ")[1]
    finally:
        lock.release()
    waited = aggregator("batch", batch_id, "--url", url, "--wait", "60", "--json")
    assert waited.returncode == 0, waited.stderr
    [answer] = orjson.loads(waited.stdout)
    assert (answer["status"], *counts(answer)) == ("stored", 10, 9, 1, 0)


def test_a_publish_only_token_gets_its_summary_without_the_outcome(url: str) -> None:
    run = aggregator("publish", "--generate", "10", "--url", url, token=PUBLISHER)
    assert run.returncode == 0, run.stderr
    summary = rows(run.stdout)
    assert summary["accepted"].startswith("10 events answered 202, in 1 batch: ")
    assert summary["outcome"].startswith("not read: HTTP 403: this token lacks the 'read' scope")
