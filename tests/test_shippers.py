"""Shipping real logs with the programs people run (rsyslog, syslog-ng: Debian's) into a real API.

deploy/shippers/rsyslog/aggregator.conf, unchanged, follows a file with imfile and
feeds aggregator_client.omprog, which confirms a batch to rsyslog only once it was
answered 202. deploy/shippers/syslog-ng/aggregator.conf, unchanged, posts NDJSON
batches with syslog-ng's own http() destination. Checked for each: every line
stored once; an outage of the API loses nothing (the shipper keeps and resends, for
syslog-ng also across its own SIGKILL); reading the whole file again (its state
lost) stores nothing new and counts each line as a duplicate.
"""

from __future__ import annotations

import io
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from aggregator_client.omprog import Bridge
from aggregator_client.omprog import serve
from aggregator_client.outcomes import RequestOutcome
from scripts.services import find_rsyslogd
from scripts.services import port_is_free
from scripts.stack import Api
from scripts.stack import Worker
from scripts.stack import free_port
from scripts.stack import wait_until
from scripts.syslog_ng import find_syslog_ng

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "deploy" / "shippers" / "rsyslog" / "aggregator.conf"
SYSLOG_NG_RECIPE = ROOT / "deploy" / "shippers" / "syslog-ng" / "aggregator.conf"
TOKEN = secrets.token_hex(32)


class Rsyslog:
    """rsyslogd in the foreground with the recipe included, its state in `base`."""

    def __init__(self, base: Path, env: dict[str, str]) -> None:
        self.base = base
        self.env = env
        self.work = base / "work"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Rsyslog:
        self.work.mkdir(parents=True, exist_ok=True)
        conf = self.base / "rsyslog.conf"
        conf.write_text(
            f'global(workDirectory="{self.work}")\ninclude(file="{RECIPE}")\n', encoding="utf-8"
        )
        command = [str(find_rsyslogd()), "-n", "-f", str(conf), "-i", str(self.base / "pid")]
        with (self.base / "rsyslogd.log").open("ab") as log:
            self.process = subprocess.Popen(
                command, env={**os.environ, **self.env}, stdout=log, stderr=subprocess.STDOUT
            )
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=30)

    def forget(self) -> None:
        """Lose imfile's record of how far it read: the next start reads the file again."""
        for state in self.work.glob("imfile-state:*"):
            state.unlink()


class Restartable:
    """An API with tokens that can be stopped and started again on the same port."""

    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env = {**env, "AUTH_DISABLED": "", "API_TOKENS": TOKEN}
        self.logs = logs
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server: Api | None = None

    def start(self) -> None:
        log = self.logs / f"shippers-api-{uuid.uuid4().hex[:6]}.log"
        # The port may still be held for a moment by the server just stopped.
        wait_until(lambda: port_is_free(self.port), timeout=30, interval=0.2)
        self.server = Api(self.env, log, port=self.port).start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None


@pytest.fixture
def tokened_api(stack_env: dict[str, str], logs: Path, worker: Worker) -> Iterator[Restartable]:
    api = Restartable(stack_env, logs)
    api.start()
    yield api
    api.stop()


def topic_counts(url: str, topic: str) -> dict[str, int]:
    response = requests.get(
        f"{url}/stats/topics",
        params={"prefix": topic},
        headers={"Authorization": f"Bearer {TOKEN}"},
        timeout=10,
    )
    response.raise_for_status()
    rows = [row for row in response.json()["topics"] if row["topic"] == topic]
    if not rows:
        return {"stored": 0, "duplicates": 0, "failed": 0}
    return {name: rows[0][name] for name in ("stored", "duplicates", "failed")}


def write_lines(path: Path, first: int, count: int) -> None:
    # Every tenth line says the same as the one before it: two events, at two offsets.
    with path.open("a", encoding="utf-8") as handle:
        for n in range(first, first + count):
            said = n - 1 if n % 10 == 0 else n
            handle.write(f'level=info request={said} path="/orders/{said}" took={said % 97}ms\n')


def test_rsyslog_ships_each_line_once_through_an_outage_and_a_reread(
    tokened_api: Restartable, tmp_path: Path
) -> None:
    topic = f"rsyslog-{uuid.uuid4().hex[:8]}"
    log_file = tmp_path / "app.log"
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN, encoding="utf-8")
    write_lines(log_file, 1, 600)
    program = f"{sys.executable} -m aggregator_client.omprog --url {tokened_api.url}"
    env = {
        "AGGREGATOR_LOG_FILE": str(log_file),
        "AGGREGATOR_TOPIC": topic,
        "AGGREGATOR_OMPROG": f"{program} --token-file {token_file}",
        "PYTHONPATH": str(ROOT),
    }
    rsyslog = Rsyslog(tmp_path / "rsyslog", env).start()
    try:

        def stored(count: int) -> bool:
            return topic_counts(tokened_api.url, topic)["stored"] == count

        wait_until(lambda: stored(600), timeout=60, interval=0.5)
        # The API goes away while more lines arrive: rsyslog keeps them and retries.
        tokened_api.stop()
        write_lines(log_file, 601, 200)
        time.sleep(4)  # rsyslog tries again every 2 s (action.resumeInterval) meanwhile
        tokened_api.start()
        wait_until(lambda: stored(800), timeout=60, interval=0.5)
        # Its state lost, rsyslog reads the whole file again: nothing new is stored.
        rsyslog.stop()
        rsyslog.forget()
        rsyslog.start()
        wait_until(
            lambda: topic_counts(tokened_api.url, topic)["duplicates"] >= 800,
            timeout=60,
            interval=0.5,
        )
        time.sleep(2)  # anything more would show now
    finally:
        rsyslog.stop()
    assert topic_counts(tokened_api.url, topic) == {
        "stored": 800,
        "duplicates": 800,
        "failed": 0,
    }


class SyslogNgDaemon:
    """syslog-ng in the foreground with the recipe included, its state and buffer in `base`."""

    def __init__(self, base: Path, env: dict[str, str]) -> None:
        self.base = base
        self.buffer = base / "buffer"
        self.env = {**env, "AGGREGATOR_BUFFER_DIR": str(self.buffer)}
        self.syslog_ng = find_syslog_ng()
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> SyslogNgDaemon:
        self.buffer.mkdir(parents=True, exist_ok=True)
        config = self.base / "syslog-ng.conf"
        config.write_text(f'@version: 3.38\n@include "{SYSLOG_NG_RECIPE}"\n', encoding="utf-8")
        env = {**os.environ, **self.syslog_ng.environ(), **self.env}
        with (self.base / "syslog-ng.log").open("ab") as log:
            self.process = subprocess.Popen(
                self.syslog_ng.command(config, self.base), env=env, stdout=log, stderr=log
            )
        return self

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=30)

    def forget(self) -> None:
        """Lose where it read to and what it buffered: the next start reads the file again."""
        (self.base / "syslog-ng.persist").unlink(missing_ok=True)
        for queued in self.buffer.iterdir():
            queued.unlink()


def test_syslog_ng_ships_each_line_once_through_an_outage_its_kill_and_a_reread(
    tokened_api: Restartable, tmp_path: Path
) -> None:
    topic = f"syslog-ng-{uuid.uuid4().hex[:8]}"
    log_file = tmp_path / "app.log"
    write_lines(log_file, 1, 600)  # 540 different texts: every tenth repeats the one before
    env = {
        "AGGREGATOR_LOG_FILE": str(log_file),
        "AGGREGATOR_TOPIC": topic,
        "AGGREGATOR_URL": tokened_api.url,
        "AGGREGATOR_TOKEN": TOKEN,
    }
    daemon = SyslogNgDaemon(tmp_path / "syslog-ng", env).start()
    try:

        def counts() -> dict[str, int]:
            return topic_counts(tokened_api.url, topic)

        wait_until(lambda: sum(counts().values()) == 600, timeout=60, interval=0.5)
        assert counts() == {"stored": 540, "duplicates": 60, "failed": 0}
        # The API goes away while more lines arrive; syslog-ng, killed meanwhile, finds
        # them in its disk buffer (or the file) when it starts again.
        tokened_api.stop()
        write_lines(log_file, 601, 200)  # 180 more texts
        time.sleep(3)  # it tries every 2 s (time-reopen) meanwhile
        daemon.kill()
        daemon.start()
        tokened_api.start()
        wait_until(lambda: sum(counts().values()) >= 800, timeout=60, interval=0.5)
        # Its state lost, syslog-ng reads the whole file again: nothing new is stored.
        daemon.stop()
        daemon.forget()
        daemon.start()
        wait_until(lambda: counts()["duplicates"] >= 880, timeout=60, interval=0.5)
        time.sleep(2)  # anything more would show now
    finally:
        daemon.stop()
    assert topic_counts(tokened_api.url, topic) == {
        "stored": 720,
        "duplicates": 880,
        "failed": 0,
    }


# --- the omprog protocol, without rsyslog ------------------------------------------------------


class Recorded:
    """Stands in for the API's answers: accepts, or refuses events whose id starts with 'bad'."""

    def __init__(self, down: bool = False) -> None:
        self.down = down
        self.sent: list[tuple[list[str], str]] = []

    def __call__(self, events: list[dict], key: str) -> RequestOutcome:
        ids = [event["event_id"] for event in events]
        self.sent.append((ids, key))
        if self.down:
            return RequestOutcome(events, "ConnectionError", False, 0, 0.0, "refused", key)
        if any(event_id.startswith("bad") for event_id in ids):
            return RequestOutcome(events, "422", False, 0, 0.0, "HTTP 422: invalid input", key)
        return RequestOutcome(events, "202", True, 0, 0.0, None, key)


def line(event_id: str) -> str:
    event = {"topic": "t", "event_id": event_id, "timestamp": "2026-12-05T00:00:00Z"}
    return json.dumps({**event, "source": "s", "payload": {}})


def run(bridge: Bridge, lines: list[str], tmp_path: Path) -> list[str]:
    source = tmp_path / "in"
    source.write_text("".join(f"{text}\n" for text in lines), encoding="utf-8")
    answers = tmp_path / "out"
    with source.open(encoding="utf-8") as reading, answers.open("w", encoding="utf-8") as writing:
        serve(bridge, reading, writing)
    return answers.read_text(encoding="utf-8").splitlines()


def test_a_transaction_is_confirmed_only_after_its_publish(tmp_path: Path) -> None:
    api = Recorded()
    answers = run(
        Bridge(api, io.StringIO()),
        ["BEGIN TRANSACTION", line("a"), line("b"), "COMMIT TRANSACTION"],
        tmp_path,
    )
    assert answers == ["OK", "OK", "DEFER_COMMIT", "DEFER_COMMIT", "OK"]
    assert [ids for ids, _ in api.sent] == [["a", "b"]]


def test_a_failed_publish_is_resent_by_rsyslog_with_the_same_key(tmp_path: Path) -> None:
    api = Recorded(down=True)
    bridge = Bridge(api, io.StringIO())
    transaction = ["BEGIN TRANSACTION", line("a"), line("b"), "COMMIT TRANSACTION"]
    first = run(bridge, transaction, tmp_path)
    assert first[-1].startswith("ERROR")
    api.down = False
    again = run(bridge, transaction, tmp_path)
    assert again[-1] == "OK"
    assert api.sent[0][1] == api.sent[-1][1]  # the same lines, the same Idempotency-Key


def test_lines_refused_for_good_are_confirmed_and_reported_not_retried(tmp_path: Path) -> None:
    api = Recorded()
    rejected = io.StringIO()
    bridge = Bridge(api, rejected)
    lines = [line("a"), line("bad-1"), "not json", line("c"), line("d")]
    answers = run(bridge, ["BEGIN TRANSACTION", *lines, "COMMIT TRANSACTION"], tmp_path)
    assert answers[-1] == "OK"
    accepted = [ids for ids, _ in api.sent if not any(i.startswith("bad") for i in ids)]
    assert sorted(sum(accepted, [])) == ["a", "c", "d"]
    assert bridge.refused_lines == 2
    assert "not json" in rejected.getvalue()


def test_lines_without_an_id_get_the_documented_content_hash(tmp_path: Path) -> None:
    api = Recorded()
    bridge = Bridge(api, io.StringIO(), topic="logs")
    run(bridge, ['{"timestamp":"2026-12-05T00:00:00Z","source":"s","payload":{"m":1}}'], tmp_path)
    [(ids, _)] = api.sent
    assert ids[0].startswith("h:") and len(ids[0]) == 34
