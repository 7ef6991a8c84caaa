"""Real gunicorn, Celery worker and Flower processes, started with mirakuru (tests, demo, bench)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO
from typing import Self

import psutil
from mirakuru import HTTPExecutor
from mirakuru import SimpleExecutor

from scripts.services import LOOPBACK
from scripts.services import ROOT
from scripts.services import Place
from scripts.services import ServiceError
from scripts.services import free_port

BIN = Path(sys.executable).parent


def wait_until(
    condition: Callable[[], bool], timeout: float = 30.0, interval: float = 0.05
) -> None:
    """Poll condition until it holds or the deadline passes (never a bare sleep)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(interval)
    raise TimeoutError(f"condition not met within {timeout} s: {condition}")


class PortTaken(ServiceError):
    """The port asked for is taken: the process would answer somewhere else, or not at all."""

    def __init__(self, port: int) -> None:
        super().__init__(f"port {port} on 127.0.0.1 is taken")
        self.port = port


def chosen_port(port: int | None, place: Place = LOOPBACK) -> int:
    """Return `port` if it is free (PortTaken otherwise), or a free one when None or 0."""
    if not port:
        return free_port()
    if not place.port_is_free(port):
        raise PortTaken(port)
    return port


def alive(pid: int) -> bool:
    """Tell whether a process runs (a zombie waiting to be reaped does not)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _process_options(env: dict[str, str], log_file: object) -> dict[str, object]:
    """Options every process here is started with: our env on top of ours, output to a log."""
    return {
        "timeout": 60,
        "envvars": {**os.environ, **env},
        "stdin": subprocess.DEVNULL,
        "stdout": log_file,
        "stderr": subprocess.STDOUT,
        "cwd": str(ROOT),
    }


class _HttpProcess:
    """A process that is up once it answers HTTP; started and stopped with its log."""

    executor: HTTPExecutor
    _log_file: IO[bytes]

    def start(self) -> Self:
        self.executor.start()
        return self

    def stop(self) -> None:
        # The log is closed even when the process had died (killed: mirakuru says so).
        try:
            self.executor.stop()
        finally:
            self._log_file.close()


class Api(_HttpProcess):
    """gunicorn serving create_app() on loopback (or in `place`): on `port` (PortTaken if
    taken), or a free one."""

    def __init__(
        self,
        env: dict[str, str],
        log: Path,
        workers: int = 3,
        port: int | None = None,
        access_log: bool = False,
        place: Place = LOOPBACK,
    ) -> None:
        self.port = chosen_port(port, place)
        self.place = place
        self.url = f"http://{place.address}:{self.port}"
        self.log = log
        command = [
            str(BIN / "gunicorn"),
            "--bind",
            f"{place.address}:{self.port}",
            "--workers",
            str(workers),
            "app:create_app()",
        ]
        self._log_file = open(log, "ab")
        self.executor = HTTPExecutor(
            place.wrap(command),
            url=f"{self.url}/health",
            status=200,
            # No access log unless asked: a line per request would swamp the logs of
            # load tests and benchmarks.
            **_process_options(
                {**env, "GUNICORN_ACCESS_LOG": "-" if access_log else ""}, self._log_file
            ),
        )

    def worker_pids(self) -> list[int]:
        """Return the pids of gunicorn's worker processes."""
        return [child.pid for child in psutil.Process(self.executor.process.pid).children()]

    def pids(self) -> list[int]:
        """Return the pids of gunicorn's master and worker processes (none when it is down)."""
        process = self.executor.process
        return [] if process is None else [process.pid, *self.worker_pids()]


class Worker:
    """A Celery worker (prefork) whose log tells when it is ready."""

    def __init__(
        self,
        env: dict[str, str],
        log: Path,
        concurrency: int = 2,
        name: str = "w",
        place: Place = LOOPBACK,
    ) -> None:
        self.log = log
        self._offset = log.stat().st_size if log.exists() else 0
        command = [
            str(BIN / "celery"),
            "-A",
            "tasks",
            "worker",
            "--concurrency",
            str(concurrency),
            "--loglevel",
            "INFO",
            "--hostname",
            f"{name}-{free_port()}@%h",
            "--without-gossip",
            "--without-mingle",
        ]
        self._log_file = open(log, "ab")
        self.executor = SimpleExecutor(place.wrap(command), **_process_options(env, self._log_file))

    def output(self) -> str:
        """Return what this worker has logged since it started."""
        with open(self.log, "rb") as handle:
            handle.seek(self._offset)
            return handle.read().decode(errors="replace")

    def start(self) -> Worker:
        self.executor.start()
        try:
            wait_until(lambda: " ready." in self.output(), timeout=60)
        except TimeoutError:
            # Never leave a half-started worker behind for the caller to find.
            self.stop()
            raise
        return self

    @property
    def pid(self) -> int:
        return self.executor.process.pid

    def children(self) -> list[int]:
        """Return the pids of the prefork pool processes."""
        return [child.pid for child in psutil.Process(self.pid).children()]

    def pids(self) -> list[int]:
        """Return the pids of the main process and its pool."""
        return [self.pid, *self.children()]

    def kill_all(self) -> None:
        """SIGKILL the main process and its pool, as a crashed machine would."""
        pids = self.pids()
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.executor.process.wait()
        wait_until(lambda: not any(alive(pid) for pid in pids), timeout=10)
        self._log_file.close()

    def stop(self) -> None:
        if self.executor.running():
            self.executor.stop()
        self._log_file.close()


class Flower(_HttpProcess):
    """Flower on loopback, behind HTTP basic auth, for watching workers and queues."""

    def __init__(self, env: dict[str, str], log: Path, auth: str, port: int | None = None) -> None:
        self.port = chosen_port(port)
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        command = [
            str(BIN / "celery"),
            "-A",
            "tasks",
            "flower",
            f"--port={self.port}",
            "--address=127.0.0.1",
        ]
        self._log_file = open(log, "ab")
        # The login goes by environment (Flower reads FLOWER_*), not argv, so
        # `ps` does not show it.
        options = _process_options({**env, "FLOWER_BASIC_AUTH": auth}, self._log_file)
        # Flower's flower_* series belong to its own /metrics; given the API's
        # metrics directory, it would write them there too.
        options["envvars"].pop("PROMETHEUS_MULTIPROC_DIR", None)  # type: ignore[attr-defined]
        self.executor = HTTPExecutor(
            command,
            url=f"{self.url}/healthcheck",
            # Basic auth covers every page, so "up" means it answers at all.
            status=r"(200|401)",
            method="GET",
            **options,
        )
