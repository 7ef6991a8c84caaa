"""The demo (scripts/demo.sh) run for real: its ports, and stopping it as a background job.

A port that is taken stops it before it starts anything, with a message that
names the port and how to choose another (`--port`, `DEMO_PORT`, and the same
for Flower). Started as a background job of a non-interactive shell (SIGINT
ignored from the start), `kill -INT %1` stops it and every process it started.
The demo runs here on a throwaway database and a private Redis, with 10 events.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import orjson
import psutil
import pytest
import requests

from scripts.services import RedisServer
from scripts.services import private_redis
from scripts.services import throwaway_database
from scripts.stack import ROOT
from scripts.stack import wait_until

DEMO_VARIABLES = ("DEMO_PORT", "DEMO_FLOWER_PORT", "API_TOKENS", "API_TOKEN", "AGGREGATOR_URL")


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port something else listens on."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        yield listener.getsockname()[1]


@pytest.fixture
def demo_env(pg_server_url: str, scratch_dir: Path) -> Iterator[dict[str, str]]:
    """The environment of a demo that uses a database and a Redis of its own, never .local's."""
    redis_dir = scratch_dir / f"demo-redis-{os.getpid()}"
    with throwaway_database(pg_server_url, "agg_demo", migrated=False) as database_url:
        with private_redis(redis_dir) as server:
            yield demo_environment(database_url, server)


def demo_environment(database_url: str, redis_server: RedisServer) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in DEMO_VARIABLES}
    return {**env, "DATABASE_URL": database_url, "REDIS_URL": redis_server.url}


def base_env() -> dict[str, str]:
    # DATABASE_URL and REDIS_URL point nowhere: a demo that went past the port
    # check would fail at once rather than start servers under .local/.
    env = {k: v for k, v in os.environ.items() if k not in DEMO_VARIABLES}
    return {
        **env,
        "DATABASE_URL": "postgresql://127.0.0.1:1/none",
        "REDIS_URL": "redis://127.0.0.1:1",
    }


@pytest.mark.parametrize(
    ("how", "option", "variable", "what"),
    [
        ("option", "--port", "DEMO_PORT", "the API"),
        ("environment", "--port", "DEMO_PORT", "the API"),
        ("option", "--flower-port", "DEMO_FLOWER_PORT", "Flower"),
        ("environment", "--flower-port", "DEMO_FLOWER_PORT", "Flower"),
    ],
)
def test_a_taken_port_stops_the_demo_before_it_starts_anything(
    taken_port: int, tmp_path: Path, how: str, option: str, variable: str, what: str
) -> None:
    # The other port is any free one, so only the taken one can be refused.
    other = "--flower-port" if option == "--port" else "--port"
    argv = ["bash", "scripts/demo.sh", other, "0", "--state-dir", str(tmp_path)]
    env = base_env()
    if how == "option":
        argv += [option, str(taken_port)]
    else:
        env[variable] = str(taken_port)
    run = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stdout + run.stderr
    assert run.stderr.startswith(
        f"demo: port {taken_port} on 127.0.0.1 is taken, so {what} cannot listen there;"
        " nothing was started."
    )
    assert f"{option} N or {variable}=N (0 picks a free one)" in run.stderr
    assert run.stdout == ""  # not even the first banner
    assert not (tmp_path / "logs").exists()


def test_help_lists_the_demos_own_options_and_starts_nothing(tmp_path: Path) -> None:
    argv = ["bash", "scripts/demo.sh", "--help", "--state-dir", str(tmp_path / "state")]
    run = subprocess.run(
        argv, cwd=ROOT, env=base_env(), capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    for option in ("--keep-running", "--port", "--flower-port", "--state-dir", "API_TOKENS"):
        assert option in run.stdout
    assert "aggregator publish --help" in run.stdout
    assert not (tmp_path / "state").exists()


def test_sigint_stops_a_background_demo_and_everything_it_started(
    demo_env: dict[str, str], tmp_path: Path
) -> None:
    log, pidfile, go = tmp_path / "demo.log", tmp_path / "demo.pid", tmp_path / "go"
    # As a user would: a background job of a non-interactive shell, which starts
    # with SIGINT ignored, then `kill -INT %1`.
    script = f"""
bash scripts/demo.sh --keep-running --events 10 --port 0 --flower-port 0 \\
  --state-dir {tmp_path / "state"} > {log} 2>&1 &
echo $! > {pidfile}
until [ -e {go} ]; do sleep 0.05; done
kill -INT %1
wait %1
echo "demo exited $?"
"""
    shell = subprocess.Popen(
        ["bash", "-c", script], cwd=ROOT, env=demo_env, stdout=subprocess.PIPE, text=True
    )
    try:
        wait_until(lambda: _running(shell, log), timeout=180, interval=0.1)
        demo = psutil.Process(int(pidfile.read_text()))
        started = demo.children(recursive=True)
        names = {process.name() for process in started}
        assert {"gunicorn", "celery"} <= names, names
        api_url = next(
            line.split()[1] for line in _text(log).splitlines() if line.startswith("API ")
        )
        assert requests.get(f"{api_url}/health", timeout=5).status_code == 200
        # A second demo on the same state directory, on other ports, is refused before
        # it starts anything: it would stop this one's PostgreSQL and share its Redis file.
        second = subprocess.run(
            ["bash", "scripts/demo.sh", "--port", "0", "--flower-port", "0", "--state-dir"]
            + [str(tmp_path / "state")],
            cwd=ROOT,
            env=demo_env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert second.returncode == 2, second.stdout + second.stderr
        assert second.stderr.startswith(
            f"demo: another demo (pid {demo.pid}) is running from {tmp_path / 'state'};"
            " nothing was started."
        ), second.stderr
        assert "--state-dir DIR" in second.stderr
        assert second.stdout == ""
        ready = requests.get(f"{api_url}/ready", timeout=5)
        assert ready.status_code == 200, ready.text
        go.touch()
        out, _ = shell.communicate(timeout=60)
    finally:
        go.touch()
        if shell.poll() is None:
            shell.kill()
        # A demo that did not stop is stopped here, with all it started.
        _stop_tree(_demo_process(pidfile, tmp_path / "state"))
    assert out.strip() == "demo exited 0", _text(log)
    assert "demo: SIGINT" in _text(log) and "== stopping what this run started" in _text(log)
    assert gone(demo)
    # Its processes are gone, not merely their parent: nothing answers at the API's URL.
    wait_until(lambda: all(gone(process) for process in started), timeout=30)
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{api_url}/health", timeout=5)


def test_the_retention_demo_drops_a_day_and_counts_the_resend_after_the_horizon(
    demo_env: dict[str, str], tmp_path: Path
) -> None:
    run = subprocess.run(
        ["bash", "scripts/demo.sh", "--retention", "--events", "10", "--port", "0"]
        + ["--flower-port", "0", "--state-dir", str(tmp_path / "state")],
        cwd=ROOT,
        env=demo_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = run.stdout + run.stderr
    assert run.returncode == 0, out
    assert "100 events now look stored 10 days ago" in out
    retention_line = next(
        orjson.loads(line) for line in out.splitlines() if '"retention run"' in line
    )
    assert len(retention_line["dropped"]) == 1 and retention_line["keys_pruned"] == 100
    assert "events of this run left: 0" in out
    assert '"keys_pruned_before":' in out.replace(" ", "")
    assert "stored again: 100, counted stored_after_horizon: 100, duplicates: 0" in out


def _text(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def _running(shell: subprocess.Popen[str], log: Path) -> bool:
    """Tell whether the demo is up and waiting for Ctrl-C; fail at once if it ended instead."""
    if shell.poll() is not None:
        pytest.fail(f"the demo ended before it was up:\n{_text(log)}")
    return "== running until Ctrl-C" in _text(log)


def _demo_process(pidfile: Path, state: Path) -> psutil.Process | None:
    """Return this test's demo if it still runs (never another process that took its pid)."""
    try:
        process = psutil.Process(int(pidfile.read_text()))
        return process if str(state) in process.cmdline() else None
    except (FileNotFoundError, ValueError, psutil.NoSuchProcess):
        return None


def _stop_tree(root: psutil.Process | None) -> None:
    if root is None:
        return
    try:
        tree = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for process in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.terminate()
    _, left = psutil.wait_procs(tree, timeout=30)
    for process in left:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()


def gone(process: psutil.Process) -> bool:
    """Tell whether a process has ended (a zombie has; a new process with its pid is not it)."""
    try:
        return not process.is_running() or process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True
