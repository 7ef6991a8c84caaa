"""The main job end to end: services, migrations, API, worker, Flower, a verified publish, /stats.

Run through scripts/demo.sh, which prepares the venv first. Arguments are passed
to `aggregator publish` (e.g. `--events 2000 --batch-size 1 --concurrency 50`;
`--events N` stands for its `--generate N`), except
`--keep-running`: then API, worker and Flower stay up after the publish, with
their URLs and credentials printed, until Ctrl-C. Everything started here is
stopped at the end; data stays in .local/ for the next run.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import urllib.request
from contextlib import ExitStack

from scripts.services import ROOT
from scripts.services import local_services
from scripts.stack import BIN
from scripts.stack import Api
from scripts.stack import Flower
from scripts.stack import Worker

STATE = ROOT / ".local"


def banner(text: str) -> None:
    print(f"\n== {text}", flush=True)


def wait_for_interrupt() -> None:
    """Block until Ctrl-C (SIGINT) or SIGTERM."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.wait(3600):
            pass
    except KeyboardInterrupt:
        pass


def generate_options(argv: list[str]) -> list[str]:
    """Return `aggregator publish` options; `--events N` means `--generate N` (default 20000)."""
    options = ["--generate" if arg == "--events" else arg for arg in argv]
    return options if "--generate" in options else ["--generate", "20000", *options]


def main(argv: list[str]) -> int:
    """Run the demo and return the publisher's exit code."""
    keep_running = "--keep-running" in argv
    argv = [arg for arg in argv if arg != "--keep-running"]
    logs = STATE / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        banner("PostgreSQL and Redis")
        env = stack.enter_context(local_services(STATE))
        print(f"DATABASE_URL={env['DATABASE_URL']}\nREDIS_URL={env['REDIS_URL']}")

        banner("alembic upgrade head")
        subprocess.run(
            [str(BIN / "alembic"), "upgrade", "head"],
            env={**os.environ, **env},
            cwd=ROOT,
            check=True,
        )

        banner("API (gunicorn, 2 gevent workers), worker (Celery, 2 processes), Flower")
        # API and worker write metrics to one directory, so /metrics shows both.
        metrics = STATE / "metrics"
        shutil.rmtree(metrics, ignore_errors=True)
        metrics.mkdir()
        env["PROMETHEUS_MULTIPROC_DIR"] = str(metrics)
        # Publishing and reading need a token; this run makes one with every
        # scope unless given some (the first given one must publish and read).
        given = os.environ.get("API_TOKENS", "")
        token = given.split(",")[0].split(":")[0] or secrets.token_hex(32)
        env["API_TOKENS"] = given or f"{token}:publish+read+admin"
        api = Api(env, logs / "api.log", workers=2, port=8080).start()
        stack.callback(api.stop)
        worker = Worker(env, logs / "worker.log", concurrency=2, name="demo").start()
        stack.callback(worker.stop)
        flower_password = secrets.token_urlsafe(12)
        flower = Flower(
            env, logs / "flower.log", auth=f"admin:{flower_password}", port=5555
        ).start()
        stack.callback(flower.stop)
        print(f"API     {api.url}  (logs: {logs})")
        print(f"Token   {token}  (curl -H 'Authorization: Bearer {token}' {api.url}/stats)")
        print(f"Flower  {flower.url}  user admin, password {flower_password}")

        publish = ["publish", "--url", api.url, *generate_options(argv), "--verify"]
        banner("aggregator " + " ".join(publish))
        command = [str(BIN / "aggregator"), *publish]
        # The token goes by environment, not argv, so `ps` does not show it.
        published = subprocess.run(command, env={**os.environ, **env, "API_TOKEN": token}, cwd=ROOT)

        banner("GET /stats")
        request = urllib.request.Request(
            f"{api.url}/stats", headers={"Authorization": f"Bearer {token}"}
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            print(json.dumps(json.load(response), indent=2, sort_keys=True))

        if keep_running:
            banner("running until Ctrl-C")
            print(f"API     {api.url}   docs {api.url}/docs")
            print(f"Token   {token}   (every scope)")
            print(f"Flower  {flower.url}   user admin, password {flower_password}")
            print(f"Logs    {logs}")
            wait_for_interrupt()
        banner("stopping what this run started")
    return published.returncode


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
