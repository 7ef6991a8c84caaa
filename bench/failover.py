"""How long a PostgreSQL failover keeps writes out, and whether it loses a commit:
pg_auto_failover against Patroni with etcd, the two managers Debian ships.

    python -m bench.failover                          # both managers, 3 runs each (~3 min)
    python -m bench.failover --managers patroni --runs 5
    python -m bench.failover --default-timers         # each manager's own defaults (~1 min a run)

Each run starts a fresh primary and synchronous standby on loopback
(scripts.services.AutoFailoverCluster: a monitor and two keepers; PatroniCluster: one etcd
and two Patroni nodes), with short timers (pg_auto_failover: the tests' MONITOR_TIMERS;
Patroni: PATRONI_TIMERS, a 6 s leader key) or, with --default-timers, each one's defaults.
A writer commits one row per transaction through the libpq multi-host URL the application
uses (`target_session_attrs=read-write`, connect_timeout 1 s), reconnecting on any error. After
2 s of writes the primary's whole process tree (manager and PostgreSQL) is SIGKILLed, as
if its machine died. Reported per run: the write outage (from the kill to the first commit
on the other node), how many acknowledged commits the promoted node lacks (must be 0:
synchronous replication), and the commits per second before the kill (each waits for the
standby). The two managers' timers are not the same knobs, so compare each against its own
defaults as well as against the other.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import statistics
import threading
import time
from collections.abc import Callable
from collections.abc import Iterator
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path
from typing import Any

import psycopg2
import psycopg2.errors

from bench.harness import code_digest
from bench.harness import finish
from bench.harness import fmt
from bench.harness import log
from bench.harness import machine
from bench.harness import table
from bench.harness import warn_if_busy
from scripts.services import PATRONI_TIMERS
from scripts.services import AutoFailoverCluster
from scripts.services import PatroniCluster
from scripts.services import plain_dsn
from scripts.services import private_auto_failover
from scripts.services import private_patroni
from scripts.services import scratch_dir

WRITES_BEFORE_KILL_S = 2.0
WRITES_AFTER_RECOVERY_S = 1.0
OUTAGE_LIMIT_S = 180.0
# pg_auto_failover's defaults, set back on the monitor with --default-timers (milliseconds).
AUTO_FAILOVER_DEFAULTS = {
    "pgautofailover.health_check_period": 5000,
    "pgautofailover.health_check_timeout": 5000,
    "pgautofailover.health_check_max_retries": 2,
    "pgautofailover.health_check_retry_delay": 2000,
    "pgautofailover.node_considered_unhealthy_timeout": 20000,
    "pgautofailover.primary_demote_timeout": 30000,
}
PATRONI_DEFAULTS = {"ttl": 30, "loop_wait": 10, "retry_timeout": 10}


@dataclass
class Writer:
    """Commits one numbered row per transaction through the multi-host URL until stopped."""

    dsn: str
    acknowledged: list[tuple[float, int, int]] = field(default_factory=list)  # (time, n, port)
    errors: int = 0
    # A commit whose answer was lost with the old primary but which reached the standby: the
    # retry of the same row then finds it there (unique violation) and the writer moves on.
    in_doubt_found_committed: int = 0
    stopping: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        n = 0
        conn = None
        while not self.stopping.is_set():
            try:
                if conn is None:
                    conn = psycopg2.connect(self.dsn, connect_timeout=1)
                    conn.autocommit = True
                with conn.cursor() as cur:
                    cur.execute("INSERT INTO failover_probe (n) VALUES (%s)", (n + 1,))
                n += 1
                self.acknowledged.append((time.monotonic(), n, conn.info.port))
            except psycopg2.errors.UniqueViolation:
                n += 1
                self.in_doubt_found_committed += 1
            except psycopg2.Error:
                self.errors += 1
                if conn is not None:
                    with contextlib.suppress(psycopg2.Error):
                        conn.close()
                conn = None
                time.sleep(0.05)
        if conn is not None:
            conn.close()

    def first_commit_elsewhere(self, moment: float, port: int) -> float | None:
        """When the first commit after moment on a server other than port was acknowledged."""
        return next((at for at, _, on in self.acknowledged if at > moment and on != port), None)


@dataclass
class Manager:
    """One failover manager: how to start a pair, and the primary's port and processes."""

    name: str
    start: Callable[[Path, bool], contextlib.AbstractContextManager[Any]]
    primary: Callable[[Any], tuple[int, list[int]]]


@contextlib.contextmanager
def auto_failover_pair(base: Path, default_timers: bool) -> Iterator[AutoFailoverCluster]:
    options: dict[str, Any] = {}
    if default_timers:
        options = {"monitor_timers": AUTO_FAILOVER_DEFAULTS, "keeper_partition_timeout": 20}
    with private_auto_failover(base, **options) as cluster:
        yield cluster


@contextlib.contextmanager
def patroni_pair(base: Path, default_timers: bool) -> Iterator[PatroniCluster]:
    timers = PATRONI_DEFAULTS if default_timers else PATRONI_TIMERS
    with private_patroni(base, timers=timers) as cluster:
        yield cluster


def _auto_failover_primary(cluster: AutoFailoverCluster) -> tuple[int, list[int]]:
    node = cluster.primary()
    return node.port, node.pids()


def _patroni_primary(cluster: PatroniCluster) -> tuple[int, list[int]]:
    primary = cluster.primary()
    if primary is None:
        raise RuntimeError("no Patroni primary before the kill")
    return cluster.ports[primary], cluster.pids(primary)


MANAGERS = {
    "pg_auto_failover": Manager("pg_auto_failover", auto_failover_pair, _auto_failover_primary),
    "patroni": Manager("patroni", patroni_pair, _patroni_primary),
}


def one_run(manager: Manager, default_timers: bool) -> dict[str, Any]:
    with (
        scratch_dir(f"failover-{manager.name}-") as base,
        manager.start(base, default_timers) as cluster,
    ):
        dsn = plain_dsn(cluster.url())
        conn = psycopg2.connect(dsn)
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("CREATE TABLE failover_probe (n bigint PRIMARY KEY)")
        conn.close()
        writer = Writer(dsn)
        thread = threading.Thread(target=writer.run, daemon=True)
        thread.start()
        time.sleep(WRITES_BEFORE_KILL_S)
        port, pids = manager.primary(cluster)
        killed_at = time.monotonic()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        before_kill = sum(1 for at, _, _ in writer.acknowledged if at <= killed_at)
        deadline = killed_at + OUTAGE_LIMIT_S
        while (
            writer.first_commit_elsewhere(killed_at, port) is None and time.monotonic() < deadline
        ):
            time.sleep(0.05)
        time.sleep(WRITES_AFTER_RECOVERY_S)
        writer.stopping.set()
        thread.join(timeout=10)
        recovered_at = writer.first_commit_elsewhere(killed_at, port)
        acknowledged = {n for _, n, _ in writer.acknowledged}
        present: set[int] = set()
        if recovered_at is not None:
            conn = psycopg2.connect(dsn, connect_timeout=5)
            with conn.cursor() as cur:
                cur.execute("SELECT n FROM failover_probe")
                present = {row[0] for row in cur.fetchall()}
            conn.close()
        return {
            "killed_processes": len(pids),
            "acknowledged_before_kill": before_kill,
            "commits_per_s_before_kill": round(before_kill / WRITES_BEFORE_KILL_S),
            "acknowledged": len(acknowledged),
            "lost": len(acknowledged - present) if recovered_at is not None else None,
            "write_outage_s": None if recovered_at is None else round(recovered_at - killed_at, 2),
            "client_errors": writer.errors,
            "in_doubt_found_committed": writer.in_doubt_found_committed,
        }


def render(document: dict[str, Any]) -> str:
    rows = []
    for name, runs in document["results"].items():
        outages = [run["write_outage_s"] for run in runs if run["write_outage_s"] is not None]
        rows.append(
            [
                name,
                str(len(runs)),
                " / ".join(fmt(value, 1) for value in outages) or "none",
                fmt(statistics.median(outages), 1) if outages else "-",
                " / ".join(str(run["lost"]) for run in runs),
                " / ".join(str(run["commits_per_s_before_kill"]) for run in runs),
            ]
        )
    timers = "each manager's defaults" if document["default_timers"] else "short timers"
    return table(
        f"PostgreSQL primary SIGKILLed (manager and server), {timers}",
        ["manager", "runs", "write outage s (each run)", "median s", "lost", "commits/s before"],
        rows,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--managers", default="pg_auto_failover,patroni")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--default-timers", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    names = [name.strip() for name in args.managers.split(",") if name.strip()]
    unknown = [name for name in names if name not in MANAGERS]
    if unknown:
        parser.error(f"unknown manager(s) {unknown}: choose from {sorted(MANAGERS)}")
    warn_if_busy()
    document: dict[str, Any] = {
        "code": code_digest(),
        "machine": machine(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "default_timers": args.default_timers,
        "results": {name: [] for name in names},
    }
    # Interleaved, so a burst of load on the shared machine falls on both managers alike.
    for run in range(args.runs):
        for name in names:
            log(f"{name}: run {run + 1} of {args.runs}")
            document["results"][name].append(one_run(MANAGERS[name], args.default_timers))
    finish(document, "failover", args.json, render)
    # A run whose writes never came back (lost is None) failed as surely as one that lost.
    lost = [run["lost"] for runs in document["results"].values() for run in runs]
    return 0 if all(value == 0 for value in lost) else 1


if __name__ == "__main__":
    raise SystemExit(main())
