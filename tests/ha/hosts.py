"""Machines of the HA tests: network namespaces joined by veth pairs, each with a cgroup.

A Network is the test's own /24: a bridge in this (the root) namespace with the .254 address,
so the test reaches every host, and a blackhole route under it, so a packet for the subnet
never leaves the machine once the bridge is gone. A Host is a network namespace
(`ip netns add`) with its own interfaces, routes, address and packet filter, one end of a veth
pair as its eth0 and the other on the bridge; and a cgroup (v2) holding every process it runs,
so they can be killed at once. Services are started in a host through `ip netns exec` (its
Place), listening on the host's address; their processes are then adopted into its cgroup.

Faults, each silent (packets dropped inside the host's namespace: no reset, no refusal):
isolate() cuts every link of the host (heal() restores them); cut_off(other) cuts the link
between two hosts only; power_cut() isolates the host and SIGKILLs all its processes at once
(`cgroup.kill`: none can fork its way out meanwhile).
"""

from __future__ import annotations

import contextlib
import random
import shutil
import subprocess
import uuid
from pathlib import Path

import psutil

from scripts.services import Place
from scripts.services import find_iptables
from scripts.stack import wait_until
from tests.ha.network import cgroup2_root

SUPERNET = "10.231"


def _ip(*argv: str) -> str:
    done = subprocess.run(["ip", *argv], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(argv)}: {done.stderr.strip()}")
    return done.stdout


class Network:
    """The hosts of one test, on a bridge of their own; close() removes every trace."""

    def __init__(self) -> None:
        self.tag = uuid.uuid4().hex[:6]
        self.bridge = f"agb{self.tag}"
        self.hosts: list[Host] = []
        self._undo: list[list[str]] = []
        # First the blackhole (a high metric: the bridge's own route wins while it exists).
        # Its /24 is one no other test run holds: adding the route claims it (another
        # session of the suite may pick the same one at the same moment: pick again).
        for _ in range(20):
            taken = _ip("-o", "route", "show")
            free = [n for n in range(1, 250) if f"{SUPERNET}.{n}.0/24" not in taken]
            self.prefix = f"{SUPERNET}.{random.choice(free)}"
            self.cidr = f"{self.prefix}.0/24"
            try:
                _ip("route", "add", "blackhole", self.cidr, "metric", "4000")
            except RuntimeError:
                continue
            break
        else:
            raise RuntimeError(f"no free /24 under {SUPERNET}.0.0/16")
        self._undo.append(["route", "del", "blackhole", self.cidr, "metric", "4000"])
        _ip("link", "add", self.bridge, "type", "bridge")
        self._undo.append(["link", "del", self.bridge])
        _ip("addr", "add", f"{self.prefix}.254/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        # With br_netfilter loaded (a Docker engine loads it and sets FORWARD to DROP),
        # frames between two ports of the bridge pass the FORWARD chain: let ours through.
        self._forward = ["FORWARD", "-i", self.bridge, "-o", self.bridge, "-j", "ACCEPT"]
        subprocess.run(
            [str(find_iptables()), "-I", *self._forward], check=True, capture_output=True
        )

    def host(self, name: str) -> Host:
        """Add a host with the next address (.1, .2, ...)."""
        host = Host(self, name, f"{self.prefix}.{len(self.hosts) + 1}")
        self.hosts.append(host)
        return host

    def host_at(self, place: Place) -> Host:
        """Return the host a server was placed on."""
        return next(host for host in self.hosts if host.place == place)

    def close(self) -> None:
        for host in self.hosts:
            host.close()
        subprocess.run([str(find_iptables()), "-D", *self._forward], capture_output=True)
        while self._undo:
            subprocess.run(["ip", *self._undo.pop()], capture_output=True)


class Host:
    """One machine: a network namespace with its address, and a cgroup with its processes."""

    def __init__(self, network: Network, name: str, address: str) -> None:
        self.name = name
        self.address = address
        self.network = network
        self.netns = f"agg-{network.tag}-{name}"
        self.place = Place(address, self.netns)
        self.cgroup: Path = cgroup2_root() / f"aggregator-host-{network.tag}-{name}"
        self._etc = Path("/etc/netns") / self.netns
        self._outside = f"v{network.tag}{name}"[:15]
        # `ip netns exec` binds these over /etc/hosts and /etc/resolv.conf: names resolve
        # locally, and no lookup waits for a DNS server the namespace cannot reach.
        self._etc.mkdir(parents=True, exist_ok=True)
        (self._etc / "hosts").write_text(f"127.0.0.1 localhost\n{address} {self.netns}\n")
        (self._etc / "resolv.conf").write_text("options timeout:1 attempts:1\n")
        _ip("netns", "add", self.netns)
        _ip(
            "link",
            "add",
            self._outside,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            self.netns,
        )
        _ip("link", "set", self._outside, "master", network.bridge, "up")
        _ip("-n", self.netns, "addr", "add", f"{address}/24", "dev", "eth0")
        _ip("-n", self.netns, "link", "set", "eth0", "up")
        _ip("-n", self.netns, "link", "set", "lo", "up")
        self.cgroup.mkdir()

    def members(self) -> set[int]:
        """Return the pids of the processes now in the host."""
        return {int(pid) for pid in (self.cgroup / "cgroup.procs").read_text().split()}

    def adopt(self, *pids: int) -> None:
        """Move processes and all their descendants into the host's cgroup."""
        # Each pass moves what is still outside; a child forked by a process before that
        # process moved is found by the next pass, and none is forked outside after it.
        for _ in range(50):
            outside = [pid for pid in _with_descendants(pids) if pid not in self.members()]
            if not outside:
                return
            for pid in outside:
                with contextlib.suppress(ProcessLookupError, OSError):
                    (self.cgroup / "cgroup.procs").write_text(str(pid))
        raise RuntimeError(f"host {self.name}: processes keep escaping the cgroup")

    def _filter(self, *argv: str) -> None:
        subprocess.run(
            self.place.wrap([str(find_iptables()), *argv]), check=True, capture_output=True
        )

    def isolate(self) -> None:
        """Drop every packet in and out of the host but its own loopback's (a cut cable)."""
        self._filter("-I", "INPUT", "!", "-i", "lo", "-j", "DROP")
        self._filter("-I", "OUTPUT", "!", "-o", "lo", "-j", "DROP")

    def cut_off(self, other: Host) -> None:
        """Drop every packet between this host and `other` only (one link cut)."""
        self._filter("-I", "INPUT", "-s", other.address, "-j", "DROP")
        self._filter("-I", "OUTPUT", "-d", other.address, "-j", "DROP")

    def heal(self) -> None:
        """Let every packet through again (the namespace holds no other rules)."""
        self._filter("-F", "INPUT")
        self._filter("-F", "OUTPUT")

    def power_cut(self) -> int:
        """Isolate the host, then SIGKILL all its processes at once; return how many died."""
        self.isolate()
        return self._kill_all()

    def power_on(self) -> None:
        """Let packets to and from the host through again (its processes are not started)."""
        self.heal()

    def _kill_all(self) -> int:
        killed = len(self.members())
        (self.cgroup / "cgroup.kill").write_text("1")
        wait_until(lambda: "populated 0" in (self.cgroup / "cgroup.events").read_text(), 10)
        return killed

    def close(self) -> None:
        """Kill whatever still runs in the host; remove its cgroup, namespace and link."""
        if self.cgroup.exists():
            self._kill_all()
            # A cgroup is removable once its last process has been reaped, a moment after
            # "populated 0" (EBUSY meanwhile).
            wait_until(lambda: _removed(self.cgroup), timeout=10, interval=0.1)
        subprocess.run(["ip", "netns", "del", self.netns], capture_output=True)
        subprocess.run(["ip", "link", "del", self._outside], capture_output=True)
        shutil.rmtree(self._etc, ignore_errors=True)


def _removed(cgroup: Path) -> bool:
    try:
        cgroup.rmdir()
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return True


def _with_descendants(pids: tuple[int, ...]) -> list[int]:
    found = []
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            process = psutil.Process(pid)
            for member in (process, *process.children(recursive=True)):
                # A zombie has left every cgroup already; its parent has yet to reap it.
                with contextlib.suppress(psutil.Error):
                    if member.status() != psutil.STATUS_ZOMBIE:
                        found.append(member.pid)
    return found
