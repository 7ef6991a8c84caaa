"""The `aggregator` command and the client library against a real API, worker and database.

Every command runs as its own process, the console script pip installed, so what
is tested is what a user types.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC
from datetime import datetime
from datetime import timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
import requests
from sqlalchemy import Engine
from sqlalchemy import text

from aggregator_client.client import Client
from scripts.stack import BIN
from scripts.stack import Api
from scripts.stack import Worker
from scripts.stack import wait_until
from tests.helpers import assert_adds_up
from tests.helpers import make_event
from tests.helpers import settled_stats
from tests.helpers import stats

TOKEN = "cli-" + secrets.token_hex(20)
WRONG = "cli-" + "w" * 40


@pytest.fixture
def url(api: Api, worker: Worker, clean: None) -> str:
    return api.url


def aggregator(
    *args: str, stdin: bytes | None = None, token: str | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[bytes]:
    """Run the console script; the token goes by environment, as users are told to."""
    env = {k: v for k, v in os.environ.items() if k not in ("API_TOKEN", "AGGREGATOR_URL")}
    if token:
        env["API_TOKEN"] = token
    return subprocess.run(
        [str(BIN / "aggregator"), *args],
        input=stdin,
        capture_output=True,
        env=env,
        timeout=timeout,
    )


def ndjson(events: list[dict[str, Any]]) -> bytes:
    return b"".join(orjson.dumps(event) + b"\n" for event in events)


def json_out(run: subprocess.CompletedProcess[bytes]) -> Any:
    assert run.returncode == 0, run.stderr.decode()
    return orjson.loads(run.stdout)


def test_publishes_an_ndjson_file_and_counts_it_exactly(
    url: str, engine: Engine, tmp_path: Path
) -> None:
    events = [make_event(f"f-{n}", topic="files") for n in range(1200)]
    path = tmp_path / "events.ndjson"
    # Blank lines are skipped; the copy of event 7 is a duplicate.
    path.write_bytes(ndjson(events[:600]) + b"\n  \n" + ndjson(events[600:] + [events[7]]))
    run = aggregator("publish", str(path), "--url", url, "--json")
    summary = json_out(run)["summary"]
    assert (summary["planned"], summary["sent"], summary["unique"]) == (1201, 1201, 1200)
    assert (summary["errors"], summary["unsent"], summary["stopped_by"]) == (0, 0, None)
    assert summary["requests"] == 3  # batches of 500
    figures = settled_stats(url, received=1201)
    assert figures["topics"]["files"] == {"stored": 1200, "duplicates": 1, "failed": 0}
    assert_adds_up(figures, engine, sent=1201)


def test_raw_log_lines_are_published_once_however_often_the_file_is_sent(
    url: str, engine: Engine, tmp_path: Path
) -> None:
    # An nginx-style access log as it is: no JSON, a repeated line (two requests that
    # looked alike), a blank line and a CRLF ending.
    lines = [
        f'10.0.0.{n % 7} - - [05/Dec/2026:09:13:{n % 60:02d} +0000] "GET /orders/{n} HTTP/1.1" 200'
        for n in range(300)
    ]
    lines[120] = lines[119]
    path = tmp_path / "access.log"
    path.write_bytes(("\n".join(lines[:200]) + "\n\n" + "\n".join(lines[200:]) + "\r\n").encode())
    first = json_out(
        aggregator("publish", str(path), "--lines", "--topic", "nginx", "--url", url, "--json")
    )
    assert first["outcome"]["stored"] == 300 and first["outcome"]["duplicates"] == 0
    again = json_out(
        aggregator("publish", str(path), "--lines", "--topic", "nginx", "--url", url, "--json")
    )
    assert (again["outcome"]["stored"], again["outcome"]["duplicates"]) == (0, 300)
    figures = settled_stats(url, received=600)
    assert figures["topics"]["nginx"] == {"stored": 300, "duplicates": 300, "failed": 0}
    assert_adds_up(figures, engine, sent=600)
    page = requests.get(
        f"{url}/events", params={"topic": "nginx", "limit": 500}, timeout=10
    ).json()["events"]
    by_line = {event["payload"]["line"]: event for event in page}
    # Line 202 is the 201st event: the blank line 201 holds none.
    assert by_line[202]["payload"] == {
        "message": lines[200],
        "origin": str(path.resolve()),
        "line": 202,
    }
    assert by_line[121]["payload"]["message"] == by_line[120]["payload"]["message"]
    assert by_line[301]["payload"]["message"] == lines[299]  # the CRLF is not part of it
    assert all(event["event_id"].startswith("l:") for event in page)


def test_lines_need_a_topic_and_a_topic_needs_lines(url: str, tmp_path: Path) -> None:
    path = tmp_path / "app.log"
    path.write_text("started\n", encoding="utf-8")
    missing = aggregator("publish", str(path), "--lines", "--url", url)
    assert missing.returncode == 2
    assert "--lines needs --topic" in missing.stderr.decode()
    stray = aggregator("publish", str(path), "--topic", "t", "--url", url)
    assert stray.returncode == 2
    assert "--topic goes with --lines" in stray.stderr.decode()
    assert stats(url)["total_received_queued"] == 0


def test_a_file_with_a_broken_line_is_refused_whole(url: str, tmp_path: Path) -> None:
    path = tmp_path / "broken.ndjson"
    path.write_bytes(ndjson([make_event("b-1"), make_event("b-2")]) + b'{"topic": \n')
    run = aggregator("publish", str(path), "--url", url)
    assert run.returncode == 2
    assert "line 3: not JSON" in run.stderr.decode()
    assert "nothing was sent" in run.stderr.decode()
    assert stats(url)["total_received_queued"] == 0


def test_a_refused_event_is_named_by_its_line_in_the_file(url: str, tmp_path: Path) -> None:
    # Two blank lines above it: line 750 holds the 748th event, the 248th (index 247)
    # of the second batch of 500. The API names the index; the command names the line.
    events = [make_event(f"line-{n}", topic="lines") for n in range(1000)]
    events[747] = {**events[747], "timestamp": "yesterday"}
    text = ndjson(events[:8]) + b"\n\n" + ndjson(events[8:])
    path = tmp_path / "events.ndjson"
    path.write_bytes(text)
    assert text.splitlines()[749] == orjson.dumps(events[747])
    run = aggregator("publish", str(path), "--url", url, "--no-progress")
    assert run.returncode == 3, run.stderr.decode()
    out = run.stdout.decode()
    assert f"refused     {path} line 750: timestamp: " in out, out
    assert '"247"' not in out and "first error" not in out
    document = json_out_code(aggregator("publish", str(path), "--url", url, "--json"), 3)
    [refusal] = document["refused"]
    assert (refusal["line"], refusal["where"]) == (750, f"{path} line 750")
    assert list(refusal["errors"]) == ["timestamp"]
    assert document["refused_total"] == 1


def json_out_code(run: subprocess.CompletedProcess[bytes], code: int) -> Any:
    assert run.returncode == code, run.stderr.decode()
    return orjson.loads(run.stdout)


def test_publishes_from_stdin_and_stops_at_a_broken_line(url: str, engine: Engine) -> None:
    good = [make_event(f"s-{n}", topic="stdin") for n in range(30)]
    run = aggregator("publish", "-", "--url", url, "--batch-size", "10", stdin=ndjson(good))
    assert run.returncode == 0, run.stderr.decode()
    assert "30 events answered 202" in run.stdout.decode()
    # From a pipe nothing can be checked ahead: what came before the bad line
    # is published, and the line is named.
    more = [make_event(f"s-{n}", topic="stdin") for n in range(30, 40)]
    run = aggregator("publish", "-", "--url", url, "--json", stdin=ndjson(more) + b"[1]\n")
    assert run.returncode == 2
    assert "stdin: line 11: expected a JSON object" in run.stderr.decode()
    document = orjson.loads(run.stdout)
    assert document["summary"]["sent"] == 10
    figures = settled_stats(url, received=40)
    assert figures["topics"]["stdin"] == {"stored": 40, "duplicates": 0, "failed": 0}
    assert_adds_up(figures, engine, sent=40)


def test_a_live_pipe_is_published_as_it_arrives(url: str) -> None:
    sender = subprocess.Popen(
        [str(BIN / "aggregator"), "publish", "-", "--url", url, "--linger", "0.2"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert sender.stdin is not None
    try:
        sender.stdin.write(ndjson([make_event(f"p-{n}", topic="pipe") for n in range(3)]))
        sender.stdin.flush()
        # The pipe is still open and the batch far from full: sent after the linger.
        settled_stats(url, received=3)
        sender.stdin.write(ndjson([make_event(f"p-{n}", topic="pipe") for n in range(3, 5)]))
    finally:
        out, err = sender.communicate(timeout=30)
    assert sender.returncode == 0, err.decode()
    assert "5 events answered 202" in out.decode()
    assert "in 2 requests" in out.decode()
    assert settled_stats(url, received=5)["topics"]["pipe"]["stored"] == 5


def test_generated_run_verifies_exactly(url: str) -> None:
    run = aggregator(
        "publish", "--url", url, "--generate", "2000", "--duplicates", "0.2", "--verify", "--json"
    )
    document = json_out(run)
    assert document["verify"]["ok"] is True
    assert document["summary"]["unique"] == 1600
    assert (document["verify"]["observed_stored"], document["verify"]["observed_duplicates"]) == (
        1600,
        400,
    )


def test_tail_prints_what_is_stored_then_follows_new_events(url: str) -> None:
    first = [make_event(f"t-{n}", topic="tailed", level="info") for n in range(5)]
    Client(url).publish(first, batch_size=5)
    settled_stats(url, received=5)
    follower = subprocess.Popen(
        [
            str(BIN / "aggregator"),
            "tail",
            "--url",
            url,
            "--topic",
            "tailed",
            "--json",
            "--wait",
            "2",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert follower.stdout is not None
        seen = [orjson.loads(follower.stdout.readline()) for _ in range(5)]
        assert [event["event_id"] for event in seen] == [f"t-{n}" for n in range(5)]
        later = [make_event(f"t-{n}", topic="tailed", level="error") for n in range(5, 8)]
        Client(url).publish(later + [make_event("elsewhere", topic="other")], batch_size=10)
        seen = [orjson.loads(follower.stdout.readline()) for _ in range(3)]
        assert [event["event_id"] for event in seen] == ["t-5", "t-6", "t-7"]
        assert seen[0]["payload"] == {"level": "error"}
    finally:
        follower.send_signal(signal.SIGINT)
        _, err = follower.communicate(timeout=10)
    assert follower.returncode == 0, err.decode()
    # Stopped, it says where to resume: from there only what came later.
    cursor = err.decode().split("resume with --cursor ")[1].split()[0]
    Client(url).publish([make_event("t-8", topic="tailed")])
    settled_stats(url, received=10)
    resumed = aggregator(
        "tail", "--url", url, "--topic", "tailed", "--cursor", cursor, "--no-follow", "--json"
    )
    assert [orjson.loads(line)["event_id"] for line in resumed.stdout.splitlines()] == ["t-8"]


def test_tail_filters_stops_at_the_end_or_a_limit_and_resumes(url: str) -> None:
    levels = ["info", "error", "info", "error", "error"]
    events = [make_event(f"l-{n}", topic="levels", level=lv) for n, lv in enumerate(levels)]
    Client(url).publish(events, batch_size=5)
    settled_stats(url, received=5)
    errors = aggregator(
        "tail", "--url", url, "--topic", "levels", "--payload", '{"level": "error"}', "--no-follow"
    )
    assert errors.returncode == 0, errors.stderr.decode()
    lines = errors.stdout.decode().splitlines()
    assert [line.split()[3] for line in lines] == ["l-1", "l-3", "l-4"]
    assert "levels" in lines[0] and '{"level":"error"}' in lines[0]
    two = aggregator("tail", "--url", url, "--topic", "levels", "--limit", "2", "--json")
    assert [event["event_id"] for event in map(orjson.loads, two.stdout.splitlines())] == [
        "l-0",
        "l-1",
    ]
    # Stopped at the limit, it names the cursor after the last event printed.
    rest = aggregator(
        "tail", "--url", url, "--topic", "levels", "--no-follow", "--cursor", resume_cursor(two)
    )
    assert [line.split()[3] for line in rest.stdout.decode().splitlines()] == ["l-2", "l-3", "l-4"]
    # At the end too: from there, nothing until something new is stored.
    Client(url).publish([make_event("l-5", topic="levels")])
    settled_stats(url, received=6)
    new = aggregator(
        "tail", "--url", url, "--topic", "levels", "--no-follow", "--cursor", resume_cursor(rest)
    )
    assert [line.split()[3] for line in new.stdout.decode().splitlines()] == ["l-5"]


def resume_cursor(run: subprocess.CompletedProcess[bytes]) -> str:
    """Return the cursor a stopped `aggregator tail` said to resume from."""
    return run.stderr.decode().split("resume with --cursor ")[1].split()[0]


def test_tail_since_a_relative_time_skips_older_events(url: str) -> None:
    now = datetime.now(UTC)
    old = {**make_event("old", topic="since"), "timestamp": (now - timedelta(hours=2)).isoformat()}
    new = {**make_event("new", topic="since"), "timestamp": now.isoformat()}
    Client(url).publish([old, new])
    settled_stats(url, received=2)
    recent = aggregator("tail", "--url", url, "--topic", "since", "--since", "10m", "--no-follow")
    assert recent.returncode == 0, recent.stderr.decode()
    assert [line.split()[3] for line in recent.stdout.decode().splitlines()] == ["new"]
    older = aggregator("tail", "--topic", "since", "--until", "1h", "--no-follow", "--url", url)
    assert [line.split()[3] for line in older.stdout.decode().splitlines()] == ["old"]


def test_global_options_are_taken_before_the_command(url: str) -> None:
    # argparse answered "invalid choice" to this order.
    Client(url).publish([make_event("g-1", topic="global")])
    settled_stats(url, received=1)
    before = json_out(aggregator("--url", url, "--json", "stats", "--topics"))
    after = json_out(aggregator("stats", "--topics", "--url", url, "--json"))
    mixed = json_out(aggregator("--json", "stats", "--url", url, "--topics"))
    assert (
        before == after == mixed == [{"topic": "global", "stored": 1, "duplicates": 0, "failed": 0}]
    )


def test_completion_offers_the_topics_the_api_knows(url: str) -> None:
    Client(url).publish([make_event("c-1", topic="orders.eu"), make_event("c-2", topic="other")])
    settled_stats(url, received=2)
    env = {
        **os.environ,
        "COMP_WORDS": f"aggregator tail --url {url} --topic ord",
        "COMP_CWORD": "5",
        "_AGGREGATOR_COMPLETE": "bash_complete",
    }
    offered = subprocess.run(
        [str(BIN / "aggregator")], env=env, capture_output=True, timeout=30, check=True
    )
    assert offered.stdout.decode().split() == ["plain,orders.eu"]
    script = subprocess.run(
        [str(BIN / "aggregator")],
        env={**os.environ, "_AGGREGATOR_COMPLETE": "bash_source"},
        capture_output=True,
        timeout=30,
        check=True,
    )
    assert b"complete -o nosort -F _aggregator_completion aggregator" in script.stdout


def test_stats_prints_the_apis_figures(url: str) -> None:
    Client(url).publish([make_event("x-1", topic="stats.a"), make_event("x-1", topic="stats.a")])
    settled_stats(url, received=2)
    totals = json_out(aggregator("stats", "--url", url, "--json"))
    assert totals == requests.get(f"{url}/stats", timeout=10).json() | {
        "uptime_seconds": totals["uptime_seconds"]
    }
    assert (totals["unique_processed_db"], totals["estimated_duplicate_dropped"]) == (1, 1)
    topics = json_out(aggregator("stats", "--url", url, "--topics", "--prefix", "stats.", "--json"))
    assert topics == [{"topic": "stats.a", "stored": 1, "duplicates": 1, "failed": 0}]
    oldest = json_out(
        aggregator("stats", "--url", url, "--topics", "--oldest", "--prefix", "stats.", "--json")
    )
    assert oldest == list(Client(url).topic_stats("stats.", oldest=True))
    assert oldest[0]["oldest_position"] is not None
    table = aggregator("stats", "--url", url, "--topics", "--oldest", "--prefix", "stats.")
    assert "oldest_stored_at" in table.stdout.decode()
    assert str(oldest[0]["oldest_position"]) in table.stdout.decode()
    text_run = aggregator("stats", "--url", url)
    assert "unique_processed_db" in text_run.stdout.decode()


def test_dead_letters_are_listed_and_replayed(url: str, engine: Engine) -> None:
    with engine.begin() as conn:
        conn.execute(
            text("ALTER TABLE events ADD CONSTRAINT ck_cli_not_blocked CHECK (source <> 'blocked')")
        )
    try:
        Client(url).publish([make_event("d-1"), {**make_event("d-2"), "source": "blocked"}])
        settled_stats(url, received=2)
        [letter] = json_out(aggregator("dead-letters", "list", "--url", url, "--json"))
        assert (letter["event_id"], letter["topic"]) == ("d-2", "orders")
        assert "ck_cli_not_blocked" in letter["error"]
        refused = aggregator("dead-letters", "replay", str(letter["id"]), "--url", url)
        assert refused.returncode == 3
        assert "still refuses" in refused.stdout.decode()
    finally:
        with engine.begin() as conn:
            conn.execute(text("ALTER TABLE events DROP CONSTRAINT IF EXISTS ck_cli_not_blocked"))
    replayed = aggregator("dead-letters", "replay", str(letter["id"]), "--url", url, "--json")
    assert json_out(replayed) == [{"id": letter["id"], "result": "stored"}]
    assert json_out(aggregator("dead-letters", "list", "--url", url, "--json")) == []
    figures = stats(url)
    assert (figures["unique_processed_db"], figures["failed_events"]) == (2, 0)
    assert_adds_up(figures, engine, sent=2)


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts connections (the kernel's backlog) but never answers."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        yield listener.getsockname()[1]


@pytest.mark.parametrize("kind", ["refused", "silent"])
@pytest.mark.parametrize(
    "command", [["publish", "--generate", "100"], ["tail"], ["stats"], ["dead-letters", "list"]]
)
def test_an_unreachable_api_fails_fast_with_a_clear_message(
    kind: str, command: list[str], silent_port: int
) -> None:
    if kind == "silent":
        target = f"http://127.0.0.1:{silent_port}"
    else:
        with socket.socket() as probe:  # Bound, closed: nothing listens there.
            probe.bind(("127.0.0.1", 0))
            target = f"http://127.0.0.1:{probe.getsockname()[1]}"
    started = time.monotonic()
    run = aggregator(*command, "--url", target)
    elapsed = time.monotonic() - started
    assert run.returncode == 4
    assert run.stderr.decode().startswith(
        f"aggregator: cannot reach the API: no answer from {target}"
    )
    assert run.stdout == b""  # no summary, no progress claiming anything was sent
    # The health check's budget is 2 s; the rest is starting Python.
    assert elapsed < 6, elapsed


@pytest.fixture(scope="module")
def guarded(stack_env: dict[str, str], logs: Path) -> Iterator[Api]:
    """An API that needs a token, with a small budget so retries after 429 are exercised."""
    env = {
        **stack_env,
        "AUTH_DISABLED": "",
        "API_TOKENS": TOKEN,
        "RATE_LIMIT": "20 per 1 second",
        "AUTH_FAILURE_LIMIT": "1000 per minute",
    }
    server = Api(env, logs / "cli-api.log", workers=1).start()
    yield server
    server.stop()


def test_a_wrong_token_stops_the_run_at_once(
    guarded: Api, worker: Worker, clean: None, tmp_path: Path
) -> None:
    path = tmp_path / "events.ndjson"
    path.write_bytes(ndjson([make_event(f"w-{n}") for n in range(200)]))
    run = aggregator(
        "publish",
        str(path),
        "--url",
        guarded.url,
        "--batch-size",
        "1",
        "--concurrency",
        "2",
        "--json",
        token=WRONG,
    )
    assert run.returncode == 5
    summary = orjson.loads(run.stdout)["summary"]
    assert summary["sent"] == 0
    assert summary["stopped_by"] == "the API refused the token"
    # At most the requests in flight and the few read ahead were sent.
    assert summary["requests"] <= 8 and summary["unsent"] >= 192
    assert "refused the token" in run.stderr.decode()
    for command in (["stats"], ["tail"], ["dead-letters", "list"]):
        refused = aggregator(*command, "--url", guarded.url, token=WRONG)
        assert refused.returncode == 5, command
        assert "HTTP 401" in refused.stderr.decode()


def test_client_retries_after_429_and_counts_each_event_once(
    guarded: Api, worker: Worker, clean: None, engine: Engine
) -> None:
    # Budget 20 events a second; 300 events in batches of 10 must wait for it.
    events = [make_event(f"r-{n}", topic="budget") for n in range(300)]
    with Client(guarded.url, TOKEN, max_retries=30, concurrency=4) as client:
        summary = client.publish(events, batch_size=10)
    assert (summary.sent, summary.errors, summary.ambiguous) == (300, 0, 0)
    # /metrics spends the same budget: ask until it has room again.
    scrapes: list[requests.Response] = []
    wait_until(lambda: _scrape(guarded, scrapes).status_code == 200, timeout=10)
    refused = [
        line
        for line in scrapes[-1].text.splitlines()
        if line.startswith("aggregator_http_requests_total") and 'status="429"' in line
    ]
    assert refused and float(refused[0].split()[-1]) > 0  # the budget did push back
    wait_until(lambda: _topic(guarded, "budget") == (300, 0), timeout=60)


def _scrape(api: Api, scrapes: list[requests.Response]) -> requests.Response:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    scrapes.append(requests.get(f"{api.url}/metrics", headers=headers, timeout=10))
    return scrapes[-1]


def _topic(api: Api, topic: str) -> tuple[int, int] | None:
    """Return (stored, duplicates) of a topic, or None while the budget refuses (429)."""
    response = requests.get(
        f"{api.url}/stats/topics",
        params={"prefix": topic},
        headers={"Authorization": f"Bearer {TOKEN}"},
        timeout=10,
    )
    if response.status_code == 429:
        return None
    rows = response.json()["topics"]
    return (rows[0]["stored"], rows[0]["duplicates"]) if rows else (0, 0)


def test_an_idempotency_key_makes_a_resent_batch_count_once(url: str, engine: Engine) -> None:
    batch = [make_event(f"k-{n}", topic="keyed") for n in range(20)]
    with Client(url) as client:
        first = client.publish_batch(batch, idempotency_key="cli-test-key-0001")
        again = client.publish_batch(batch, idempotency_key="cli-test-key-0001")
    assert first.accepted and again.accepted
    assert first.batch_id == again.batch_id
    figures = settled_stats(url, received=20)
    assert figures["total_received_queued"] == 20  # the resend was not received twice
    assert figures["topics"]["keyed"] == {"stored": 20, "duplicates": 0, "failed": 0}
    assert_adds_up(figures, engine, sent=20)


def test_gzip_and_ndjson_bodies_are_stored_exactly_and_compressed_on_the_wire(
    url: str, engine: Engine
) -> None:
    batch = [make_event(f"z-{n}", topic="zipped") for n in range(50)]
    with Client(url, compress=True, ndjson=True) as client:
        first = client.publish_batch(batch, idempotency_key="cli-gzip-key-0001")
        # The same key again: the same bytes (gzip without a timestamp), so a replay.
        again = client.publish_batch(batch, idempotency_key="cli-gzip-key-0001")
        # The same events as a plain JSON array: other bytes on the wire than the
        # compressed ones, which the API's digest of the raw body tells apart.
        plain = client.publish_batch(
            batch, idempotency_key="cli-gzip-key-0001", compress=False, ndjson=False
        )
    assert first.accepted and again.accepted, (first.error, again.error)
    assert again.batch_id == first.batch_id
    assert plain.final == "422" and "Idempotency-Key" in str(plain.error), plain.error
    figures = settled_stats(url, received=50)
    assert figures["topics"]["zipped"] == {"stored": 50, "duplicates": 0, "failed": 0}
    assert_adds_up(figures, engine, sent=50)


def test_an_ndjson_body_is_refused_naming_the_line(url: str) -> None:
    batch = [make_event(f"y-{n}", topic="lined") for n in range(5)]
    batch[3] = {**batch[3], "timestamp": "yesterday"}
    with Client(url, compress=True, ndjson=True) as client:
        refused = client.publish_batch(batch)
    # The API names NDJSON lines from 1: the fourth event is line 4.
    assert refused.final == "422" and list(refused.errors) == ["line 4"], refused.errors


def test_publish_gzip_ndjson_counts_a_file_exactly_and_names_a_refused_line(
    url: str, engine: Engine, tmp_path: Path
) -> None:
    events = [make_event(f"g-{n}", topic="gzipped") for n in range(700)]
    path = tmp_path / "events.ndjson"
    path.write_bytes(ndjson(events + [events[9]]))
    for flags in (["--gzip"], ["--gzip", "--ndjson"]):
        summary = json_out(aggregator("publish", str(path), *flags, "--url", url, "--json"))
        assert (summary["summary"]["sent"], summary["summary"]["errors"]) == (701, 0)
    figures = settled_stats(url, received=1402)
    assert figures["topics"]["gzipped"] == {"stored": 700, "duplicates": 702, "failed": 0}
    assert_adds_up(figures, engine, sent=1402)
    # A refused event in the second request (of 500) is named by its line in the file,
    # from the API's "line N" of that NDJSON body.
    events[620] = {**events[620], "timestamp": "yesterday"}
    path.write_bytes(ndjson(events))
    run = aggregator("publish", str(path), "--gzip", "--ndjson", "--url", url, "--json")
    document = json_out_code(run, 3)
    [refusal] = document["refused"]
    assert (refusal["line"], list(refusal["errors"])) == (621, ["timestamp"]), refusal
