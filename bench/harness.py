"""Shared pieces of the benchmarks: their services, process accounting, output.

Servers, databases and migrations come from scripts.services, as the tests' and the demo's do.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import sys
import threading
import time
from collections.abc import Callable
from collections.abc import Iterator
from collections.abc import Sequence
from dataclasses import dataclass
from dataclasses import field
from datetime import UTC
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil
import psycopg2
import redis
from sqlalchemy import make_url

from app.db import make_engine
from scripts.services import ROOT
from scripts.services import plain_dsn
from scripts.services import postgres_server_url
from scripts.services import private_auto_failover
from scripts.services import private_redis
from scripts.services import private_replicated_redis
from scripts.services import throwaway_database
from scripts.services import truncate_app_tables
from tasks.pending import forget_everything

RESULTS = ROOT / "bench" / "results"
LOOPBACK = {"127.0.0.1", "localhost", "::1", None, ""}


def log(message: str) -> None:
    """Print a progress line to stderr, so stdout holds only the result tables."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@dataclass
class Services:
    """Where the benchmark's PostgreSQL database and Redis are, and who runs them."""

    database_url: str
    redis_url: str
    private_postgres: bool
    private_redis: bool
    # A replicated broker: BROKER_SENTINELS and BROKER_SENTINEL_MASTER (redis_url is its primary).
    broker_env: dict[str, str] = field(default_factory=dict)

    @property
    def env(self) -> dict[str, str]:
        """Return the environment for API and worker processes."""
        return {"DATABASE_URL": self.database_url, "REDIS_URL": self.redis_url, **self.broker_env}


@contextlib.contextmanager
def bench_services(
    base: Path,
    *,
    durable: bool,
    redis_aof: bool,
    redis_fsync: str = "always",
    prefix: str = "agg_bench",
    replicas: int = 0,
    standby: str | None = None,
) -> Iterator[Services]:
    """Yield a fresh, migrated database and a Redis: DATABASE_URL/REDIS_URL when set, else private.

    The benchmark truncates and fills tables, so it always works in a database
    of its own (created here, dropped on the way out), even on a given server.
    With `replicas`, the private Redis is a primary with that many replicas and
    three Sentinels, found through them (BROKER_MIN_REPLICAS defaults to 1).
    With `standby` ("sync" or "async"), the private PostgreSQL is a pg_auto_failover primary
    with a synchronous standby, reached by its multi-host URL; "async" sets
    synchronous_commit=local on the bench's sessions, so the same pair commits without
    waiting for the standby.
    """
    with contextlib.ExitStack() as stack:
        if standby and not os.environ.get("DATABASE_URL"):
            cluster = stack.enter_context(private_auto_failover(base / "pg-ha"))
            server_url = cluster.url("postgres")
            if standby == "async":
                server_url += "&options=-c%20synchronous_commit%3Dlocal"
            log(f"started pg_auto_failover: primary and standby, commits {standby}")
        else:
            server_url = stack.enter_context(postgres_server_url(base / "pg", durable=durable))
        database_url = stack.enter_context(throwaway_database(server_url, prefix))
        redis_url = os.environ.get("REDIS_URL")
        broker_env: dict[str, str] = {}
        if replicas and not redis_url:
            cluster = stack.enter_context(
                private_replicated_redis(base / "redis", replicas=replicas)
            )
            redis_url = cluster.primary().url
            broker_env = {k: v for k, v in cluster.env().items() if k != "REDIS_URL"}
            log(f"started Redis on {redis_url} with {replicas} replica(s) and 3 Sentinels")
        if not redis_url:
            options = {"appendonly": redis_aof, "appendfsync": redis_fsync}
            redis_url = stack.enter_context(private_redis(base / "redis", **options)).url
            log(f"started Redis on {redis_url} (appendonly={redis_aof}, {redis_fsync})")
        yield Services(
            database_url,
            redis_url,
            private_postgres=not os.environ.get("DATABASE_URL"),
            private_redis=not os.environ.get("REDIS_URL"),
            broker_env=broker_env,
        )


def empty_tables(services: Services) -> None:
    """Empty the application's tables (and the pending marks of a private Redis)."""
    engine = make_engine(services.database_url)
    try:
        with engine.begin() as conn:
            truncate_app_tables(conn)
    finally:
        engine.dispose()
    if services.private_redis:
        client = redis.Redis.from_url(services.redis_url)
        try:
            forget_everything(client)
        finally:
            client.close()


def _local_process(pid: int, name_part: str) -> int | None:
    """Return pid when it is a local process whose name contains name_part."""
    with contextlib.suppress(psutil.Error):
        if name_part in psutil.Process(pid).name():
            return pid
    return None


def postmaster_pid(database_url: str) -> int | None:
    """Find the PostgreSQL server process when the server runs on this machine."""
    if make_url(database_url).host not in LOOPBACK:
        return None
    conn = psycopg2.connect(plain_dsn(database_url))
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT pg_backend_pid()")
            backend = cur.fetchone()[0]
        with contextlib.suppress(psutil.Error):
            parent = psutil.Process(backend).parent()
            if parent is not None:
                return _local_process(parent.pid, "postgres")
    finally:
        conn.close()
    return None


def redis_pid(redis_url: str) -> int | None:
    """Find the redis-server process when it runs on this machine."""
    client = redis.Redis.from_url(redis_url)
    try:
        host = client.connection_pool.connection_kwargs.get("host")
        if host not in LOOPBACK:
            return None
        return _local_process(int(client.info("server")["process_id"]), "redis")
    finally:
        client.close()


def postgres_settings(database_url: str) -> dict[str, str]:
    """Return PostgreSQL's version and durability settings, keyed as the result documents are."""
    conn = psycopg2.connect(plain_dsn(database_url))
    try:
        with conn.cursor() as cur:
            settings = {}
            for name in ("server_version", "fsync", "synchronous_commit", "shared_buffers"):
                cur.execute(f"SHOW {name}")
                settings[name] = cur.fetchone()[0]
    finally:
        conn.close()
    return {
        "postgresql": settings.pop("server_version"),
        **{f"postgres_{name}": value for name, value in settings.items()},
    }


def server_versions(services: Services) -> dict[str, str]:
    """Return the PostgreSQL and Redis versions and PostgreSQL's durability settings."""
    client = redis.Redis.from_url(services.redis_url)
    try:
        redis_version = str(client.info("server")["redis_version"])
    finally:
        client.close()
    return {**postgres_settings(services.database_url), "redis": redis_version}


def machine() -> dict[str, Any]:
    """Describe the machine and interpreter the numbers come from."""
    return {
        "cpus": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def code_digest() -> str:
    """Hash the application's source (app/, tasks/, migrations/, celery_config.py, gunicorn conf).

    The API and worker import whatever is on disk when they start, so the
    digest ties a result to the code it measured without asking git.
    """
    digest = hashlib.sha256()
    files = [ROOT / "celery_config.py", ROOT / "gunicorn.conf.py"]
    for folder in ("app", "tasks", "migrations"):
        files.extend(sorted((ROOT / folder).rglob("*.py")))
    for path in files:
        if path.exists():
            digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def describe(document: dict[str, Any]) -> str:
    """Return one line naming the servers and the machine's load, to print above the tables."""
    services = document.get("services", {})
    start = document["machine"]["load_average_at_start"][0]
    end = document.get("load_average_at_end", [float("nan")])[0]
    return (
        f"PostgreSQL {services.get('postgresql', '?')} (fsync {services.get('postgres_fsync')},"
        f" synchronous_commit {services.get('postgres_synchronous_commit')}),"
        f" Redis {services.get('redis', '?')}; {document['machine']['cpus']} CPUs,"
        f" 1-min load {start:.1f} at start, {end:.1f} at end; code {document.get('code')}"
    )


def warn_if_busy() -> None:
    """Say so when other work is running: the numbers of a busy machine are not comparable."""
    load = os.getloadavg()[0]
    cpus = os.cpu_count() or 1
    if load > cpus / 2:
        log(f"warning: 1-minute load average is {load:.1f} on {cpus} CPUs; results will be noisy")


@dataclass(frozen=True)
class CpuSnapshot:
    """CPU seconds of a process group at one moment."""

    per_process: dict[tuple[int, float], float]
    reaped: float


@dataclass
class ProcessGroup:
    """A process and (optionally) its descendants, accounted together."""

    name: str
    pid: int | None
    descendants: bool = True

    def processes(self) -> list[psutil.Process]:
        """Return the live processes of the group (empty when the root is unknown or gone)."""
        if self.pid is None:
            return []
        try:
            root = psutil.Process(self.pid)
            return [root, *root.children(recursive=True)] if self.descendants else [root]
        except psutil.NoSuchProcess:
            return []

    def cpu(self) -> CpuSnapshot | None:
        """Return the group's CPU seconds, per process plus what its root has reaped."""
        procs = self.processes()
        if not procs:
            return None
        per_process: dict[tuple[int, float], float] = {}
        reaped = 0.0
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                times = proc.cpu_times()
                per_process[(proc.pid, proc.create_time())] = times.user + times.system
                if self.descendants and proc.pid == self.pid:
                    # Children that exited (e.g. a PostgreSQL backend whose
                    # connection closed) are added here once their parent reaps them.
                    reaped = times.children_user + times.children_system
        return CpuSnapshot(per_process, reaped)

    def rss(self) -> int:
        """Return the summed resident set size of the group's processes, in bytes."""
        total = 0
        for proc in self.processes():
            with contextlib.suppress(psutil.Error):
                total += proc.memory_info().rss
        return total


def cpu_seconds(before: CpuSnapshot | None, after: CpuSnapshot | None) -> float | None:
    """Return the CPU seconds a group used between two snapshots."""
    if before is None or after is None:
        return None
    used = after.reaped - before.reaped
    for key, seconds in after.per_process.items():
        used += seconds - before.per_process.get(key, 0.0)
    for key, seconds in before.per_process.items():
        # A process that exited in between shows up in `reaped` with its whole
        # life's CPU; only the part after the first snapshot belongs here.
        if key not in after.per_process:
            used -= seconds
    return max(used, 0.0)


@dataclass
class RssSampler:
    """Sample each group's summed RSS in a thread and keep the peak."""

    groups: Sequence[ProcessGroup]
    interval: float = 0.2
    peaks: dict[str, int] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def _sample(self) -> None:
        for group in self.groups:
            self.peaks[group.name] = max(self.peaks.get(group.name, 0), group.rss())

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> RssSampler:
        self.peaks = {}
        self._stop.clear()
        self._sample()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()


def median(values: Sequence[float]) -> float:
    """Return the median of values (0.0 when empty)."""
    ordered = sorted(values)
    if not ordered:
        return 0.0
    middle = len(ordered) // 2
    if len(ordered) % 2:
        return ordered[middle]
    return (ordered[middle - 1] + ordered[middle]) / 2


def fmt(value: Any, digits: int = 0) -> str:
    """Format a number with thousands separators, or '-' when missing."""
    if value is None:
        return "-"
    if isinstance(value, float | int):
        return f"{value:,.{digits}f}"
    return str(value)


def table(title: str, headers: Sequence[str], rows: Sequence[Sequence[str]], left: int = 1) -> str:
    """Render rows as a Markdown table under a title: `left` text columns, then numbers."""
    widths = [
        max(len(headers[i]), *(len(row[i]) for row in rows)) if rows else len(headers[i])
        for i in range(len(headers))
    ]

    def line(cells: Sequence[str]) -> str:
        padded = [
            cell.ljust(w) if i < left else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "| " + " | ".join(padded) + " |"

    rule = (
        "|"
        + "|".join("-" * (w + 2) if i < left else "-" * (w + 1) + ":" for i, w in enumerate(widths))
        + "|"
    )
    return "\n".join([f"\n{title}", "", line(headers), rule, *(line(row) for row in rows)])


def write_json(path: Path | None, kind: str, document: dict[str, Any]) -> Path:
    """Write the result document to path, or bench/results/<kind>-<timestamp>.json."""
    if path is None:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        path = RESULTS / f"{kind}-{stamp}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2, sort_keys=False, default=str) + "\n")
    return path


def log_tail(path: Path, limit: int = 3000) -> str:
    """Return the end of a log file, for reports of a failed run."""
    if not path.exists():
        return ""
    return path.read_text(errors="replace")[-limit:]


def finish(
    document: dict[str, Any],
    kind: str,
    json_path: Path | None,
    render: Callable[[dict[str, Any]], str],
) -> Path:
    """Stamp the end of a run, warn if the code changed under it, print it and write the JSON."""
    document["finished_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    document["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    if code_digest() != document["code"]:
        document["code"] += " (changed during the run)"
        log("warning: the application's code changed during the run")
    print(render(document))
    path = write_json(json_path, kind, document)
    print(f"\nJSON: {path}")
    return path
