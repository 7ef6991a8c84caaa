"""The main job end to end: services, migrations, API, worker, Flower, a verified publish, /stats.

Run through scripts/demo.sh, which prepares the venv first. Arguments are passed
to `aggregator publish` (e.g. `--events 2000 --batch-size 1 --concurrency 50`;
`--events N` stands for its `--generate N`), except the demo's own:

  --keep-running       API, worker and Flower stay up after the publish, with their
                       URLs and credentials printed, until Ctrl-C (or SIGTERM)
  --port N             the API's port (env DEMO_PORT, default 8080; 0: any free one)
  --flower-port N      Flower's port (env DEMO_FLOWER_PORT, default 5555; 0: any free one)
  --state-dir DIR      data and logs (default .local/; kept for the next run)
  --retention          after the publish, a retention run: events stored and then
                       back-dated RETENTION_DEMO_BACK days, `python -m app.retention`
                       with RETENTION_DAYS=7 dropping their day, /stats' retention,
                       and the same events sent again counted as stored_after_horizon
                       (it drops whatever the state directory's database holds from
                       over 7 days ago)
  -h, --help           this text (`aggregator publish --help` for the rest)

API_TOKENS=<token>:publish+read+admin keeps the token across runs (otherwise each
run makes a new one and prints it).

A port that is taken, or a state directory another demo is running from, stops
the demo before it starts anything, naming it: the URLs it prints, and the
README's, must be the ones that answer, and two demos never share one database. SIGINT and
SIGTERM stop everything started here, also when the demo runs as a background
job of a script (which starts it with SIGINT ignored); data stays in the state
directory for the next run.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import urllib.request
from contextlib import ExitStack
from datetime import UTC
from datetime import datetime
from datetime import timedelta
from pathlib import Path
from types import FrameType
from typing import IO
from typing import Any

from sqlalchemy import text

from app.db import make_engine
from scripts.services import ROOT
from scripts.services import local_services
from scripts.services import port_is_free
from scripts.stack import BIN
from scripts.stack import Api
from scripts.stack import Flower
from scripts.stack import Worker
from scripts.stack import chosen_port
from scripts.stack import wait_until

EXIT_PORT_TAKEN = 2
EXIT_STATE_IN_USE = 2
API_PORT = 8080
FLOWER_PORT = 5555


class Stopped(BaseException):
    """A stop signal arrived: unwind, stopping what was started (a BaseException, like Ctrl-C)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _stop(signum: int, _: FrameType | None) -> None:
    hold_stop_signals()
    raise Stopped(signum)


def _already_stopping(signum: int, _: FrameType | None) -> None:
    print(f"\n{signal.Signals(signum).name}: already stopping, please wait", flush=True)


def stop_on_signals() -> None:
    """Make the first SIGINT or SIGTERM raise Stopped.

    Installed explicitly because a background job of a non-interactive shell starts
    with SIGINT ignored, and Python then leaves it ignored. Processes started
    afterwards get the default disposition back (handlers do not survive exec).
    """
    for signum in STOP_SIGNALS:
        signal.signal(signum, _stop)


def hold_stop_signals() -> None:
    """From now on, stop signals only say a stop is under way: nothing cuts it short."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, _already_stopping)


def banner(text: str) -> None:
    print(f"\n== {text}", flush=True)


def wait_for_stop() -> None:
    """Block until a stop signal (Stopped comes out of the handler)."""
    while True:
        signal.pause()


def _port(raw: str) -> int:
    if not raw.isdigit() or not 0 <= int(raw) <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number from 0 to 65535, got {raw!r}")
    return int(raw)


def parse_args(argv: list[str], environ: dict[str, str]) -> tuple[argparse.Namespace, list[str]]:
    """Split the demo's own options from those passed on to `aggregator publish`."""
    parser = argparse.ArgumentParser(prog="demo.sh", allow_abbrev=False, add_help=False)
    parser.add_argument("--keep-running", action="store_true")
    # Defaults from the environment are strings, which argparse checks with the type too.
    parser.add_argument("--port", type=_port, default=environ.get("DEMO_PORT", str(API_PORT)))
    parser.add_argument(
        "--flower-port", type=_port, default=environ.get("DEMO_FLOWER_PORT", str(FLOWER_PORT))
    )
    parser.add_argument("--state-dir", type=Path, default=ROOT / ".local")
    parser.add_argument("--retention", action="store_true")
    parser.add_argument("-h", "--help", action="store_true")
    return parser.parse_known_args(argv)


def claim_state_dir(state: Path) -> IO[str] | None:
    """Lock the state directory for this run; None when another demo holds it.

    Two demos on one state directory would share (and stop) one PostgreSQL and write
    one Redis file. The lock is the open file's: it goes when this process ends,
    however it ends, and the services started here do not inherit it.
    """
    state.mkdir(parents=True, exist_ok=True)
    handle = (state / "demo.lock").open("a+", encoding="utf-8")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    handle.truncate(0)
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def state_in_use_message(state: Path) -> str:
    holder = (state / "demo.lock").read_text(encoding="utf-8").strip() or "?"
    return (
        f"demo: another demo (pid {holder}) is running from {state}; nothing was started."
        f" Stop it (Ctrl-C where it runs, or kill -INT {holder}), or run this one apart:"
        f" --state-dir DIR --port 0 --flower-port 0."
    )


def taken_port_message(args: argparse.Namespace) -> str | None:
    """Say which chosen port is taken and how to choose another; None when all are free."""
    for what, port, option, variable in (
        ("the API", args.port, "--port", "DEMO_PORT"),
        ("Flower", args.flower_port, "--flower-port", "DEMO_FLOWER_PORT"),
    ):
        if port and not port_is_free(port):
            return (
                f"demo: port {port} on 127.0.0.1 is taken, so {what} cannot listen there;"
                f" nothing was started. Stop what listens there, or choose another port:"
                f" {option} N or {variable}=N (0 picks a free one). A second demo"
                f" needs its own --state-dir DIR too."
            )
    return None


def generate_options(argv: list[str]) -> list[str]:
    """Return `aggregator publish` options; `--events N` means `--generate N` (default 20000)."""
    options = ["--generate" if arg == "--events" else arg for arg in argv]
    return options if "--generate" in options else ["--generate", "20000", *options]


def main(argv: list[str]) -> int:
    """Run the demo and return the publisher's exit code (128 + signal if stopped before)."""
    stop_on_signals()
    args, publish_args = parse_args(argv, dict(os.environ))
    if args.help:
        print(__doc__)
        return 0
    state: Path = args.state_dir
    claim = claim_state_dir(state)
    if claim is None:
        print(state_in_use_message(state), file=sys.stderr)
        return EXIT_STATE_IN_USE
    taken = taken_port_message(args)
    if taken:
        claim.close()
        print(taken, file=sys.stderr)
        return EXIT_PORT_TAKEN
    logs = state / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    code: int | None = None
    try:
        # The claim is released last, once everything started here is stopped.
        with claim, ExitStack() as stack:
            code = run(stack, args, publish_args, state, logs)
            hold_stop_signals()
            banner("stopping what this run started")
    except Stopped as stop:
        # The ExitStack has stopped everything on the way out.
        print(f"demo: stopped by {stop}; everything it started is stopped", flush=True)
        return code if code is not None else 128 + stop.signum
    return code


def run(
    stack: ExitStack, args: argparse.Namespace, publish_args: list[str], state: Path, logs: Path
) -> int:
    """Start everything (each stop registered before its start), publish, print /stats."""
    banner("PostgreSQL and Redis")
    env = stack.enter_context(local_services(state))
    print(f"DATABASE_URL={env['DATABASE_URL']}\nREDIS_URL={env['REDIS_URL']}", flush=True)

    banner("alembic upgrade head")
    subprocess.run(
        [str(BIN / "alembic"), "upgrade", "head"],
        env={**os.environ, **env},
        cwd=ROOT,
        check=True,
    )

    banner("API (gunicorn, 2 gevent workers), worker (Celery, 2 processes), Flower")
    # API and worker write metrics to one directory, so /metrics shows both.
    metrics = state / "metrics"
    shutil.rmtree(metrics, ignore_errors=True)
    metrics.mkdir()
    env["PROMETHEUS_MULTIPROC_DIR"] = str(metrics)
    # Publishing and reading need a token; this run makes one with every
    # scope unless given some (the first given one must publish and read).
    given = os.environ.get("API_TOKENS", "")
    token = given.split(",")[0].split(":")[0] or secrets.token_hex(32)
    env["API_TOKENS"] = given or f"{token}:publish+read+admin"
    # A port checked free at the start and taken since fails here (PortTaken), never moves.
    api = Api(env, logs / "api.log", workers=2, port=chosen_port(args.port))
    stack.callback(api.stop)
    api.start()
    worker = Worker(env, logs / "worker.log", concurrency=2, name="demo")
    stack.callback(worker.stop)
    worker.start()
    flower_password = secrets.token_urlsafe(12)
    flower = Flower(
        env,
        logs / "flower.log",
        auth=f"admin:{flower_password}",
        port=chosen_port(args.flower_port),
    )
    stack.callback(flower.stop)
    flower.start()
    print(f"API     {api.url}  (logs: {logs})")
    print(f"Token   {token}  (curl -H 'Authorization: Bearer {token}' {api.url}/stats)")
    print(f"Flower  {flower.url}  user admin, password {flower_password}", flush=True)

    publish = ["publish", "--url", api.url, *generate_options(publish_args), "--verify"]
    banner("aggregator " + " ".join(publish))
    command = [str(BIN / "aggregator"), *publish]
    # The token goes by environment, not argv, so `ps` does not show it.
    published = subprocess.run(command, env={**os.environ, **env, "API_TOKEN": token}, cwd=ROOT)

    banner("GET /stats")
    request = urllib.request.Request(
        f"{api.url}/stats", headers={"Authorization": f"Bearer {token}"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        print(json.dumps(json.load(response), indent=2, sort_keys=True), flush=True)

    if args.retention:
        show_retention(env, api.url, token)

    if args.keep_running:
        banner("running until Ctrl-C (or SIGTERM)")
        print(f"API     {api.url}   docs {api.url}/docs")
        print(f"Token   {token}   (every scope)")
        print(f"Flower  {flower.url}   user admin, password {flower_password}")
        print(f"Logs    {logs}")
        print(
            f"Env     export DATABASE_URL={env['DATABASE_URL']} REDIS_URL={env['REDIS_URL']}"
            f" API_TOKEN={token}  (for alembic, python -m app.retention, aggregator)",
            flush=True,
        )
        try:
            wait_for_stop()
        except Stopped as stop:
            # The way a kept-running demo ends: not a failure.
            print(f"demo: {stop}", flush=True)
    return published.returncode


# How far back the retention demo's events are moved, and the retention it runs with.
RETENTION_DEMO_BACK = 10
RETENTION_DEMO_DAYS = 7
RETENTION_DEMO_EVENTS = 100


def _api(url: str, token: str, method: str = "GET", body: object = None) -> dict[str, Any]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        url,
        data=data,
        method=method,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        answer: dict[str, Any] = json.load(response)
        return answer


def _settled(url: str, token: str, received: int) -> dict[str, Any]:
    """Wait until /stats has received that many events and queues none; return it."""
    figures: dict[str, Any] = {}

    def settled() -> bool:
        figures.update(_api(f"{url}/stats", token))
        return figures["queued_events"] == 0 and figures["total_received_queued"] >= received

    wait_until(settled, timeout=60, interval=0.2)
    return figures


def show_retention(env: dict[str, str], url: str, token: str) -> None:
    """Store events, back-date them, run retention, and send them again after the horizon."""
    back = timedelta(days=RETENTION_DEMO_BACK)
    run_id = secrets.token_hex(4)
    old = (datetime.now(UTC) - back).isoformat()
    batch = [
        {
            "topic": "retention-demo",
            "event_id": f"{run_id}-{n}",
            "timestamp": old,
            "source": "demo",
            "payload": {"n": n},
        }
        for n in range(RETENTION_DEMO_EVENTS)
    ]
    banner(f"retention: {len(batch)} events stored, then back-dated {RETENTION_DEMO_BACK} days")
    before = _api(f"{url}/stats", token)
    _api(f"{url}/publish", token, "POST", batch)
    start = _settled(url, token, before["total_received_queued"] + len(batch))
    # A demo cannot wait ten days: the rows (and their keys) are moved back in time.
    engine = make_engine(env["DATABASE_URL"], pool_size=1)
    try:
        with engine.begin() as conn:
            params = {"prefix": f"{run_id}-%", "back": back}
            moved = conn.execute(
                text(
                    "UPDATE events SET stored_at = stored_at - :back"
                    " WHERE topic = 'retention-demo' AND event_id LIKE :prefix"
                ),
                params,
            ).rowcount
            conn.execute(
                text(
                    "UPDATE event_keys SET horizon_from = horizon_from - :back"
                    " WHERE topic = 'retention-demo' AND event_id LIKE :prefix"
                ),
                params,
            )
        print(f"{moved} events now look stored {RETENTION_DEMO_BACK} days ago", flush=True)
        days = str(RETENTION_DEMO_DAYS)
        banner(f"RETENTION_DAYS={days} DEDUP_HORIZON_DAYS={days} python -m app.retention")
        subprocess.run(
            [sys.executable, "-m", "app.retention"],
            env={**os.environ, **env, "RETENTION_DAYS": days, "DEDUP_HORIZON_DAYS": days},
            cwd=ROOT,
            check=True,
        )
        with engine.connect() as conn:
            left = conn.execute(
                text("SELECT count(*) FROM events WHERE event_id LIKE :prefix"),
                {"prefix": f"{run_id}-%"},
            ).scalar_one()
    finally:
        engine.dispose()
    print(f"events of this run left: {left} (their day's partition was dropped)")
    banner("GET /stats: retention")
    print(json.dumps(_api(f"{url}/stats", token)["retention"], indent=2, sort_keys=True))

    banner("the same events sent again, after the horizon")
    _api(f"{url}/publish", token, "POST", batch)
    after = _settled(url, token, start["total_received_queued"] + len(batch))
    stored = after["unique_processed_db"] - start["unique_processed_db"]
    late = after["stored_after_horizon"] - start["stored_after_horizon"]
    duplicates = after["estimated_duplicate_dropped"] - start["estimated_duplicate_dropped"]
    print(
        f"stored again: {stored}, counted stored_after_horizon: {late}, duplicates: {duplicates}",
        flush=True,
    )


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
