"""Machines of the HA tests: every process of one "host" in a cgroup, cut off and killed at once."""

from __future__ import annotations

import contextlib
import subprocess
import uuid
from pathlib import Path

import psutil

from scripts.stack import wait_until
from tests.ha.network import cgroup2_root


class Host:
    """One machine: a cgroup (v2) that holds every process it runs, and the ports it listens on.

    Processes are adopted once started, with their descendants; whatever they start later is
    born in the cgroup. power_cut() is a power cut: the host goes silent (iptables drops every
    packet to and from its ports, and every packet its processes' sockets send) and every
    process in the cgroup is SIGKILLed at once (`cgroup.kill`: none can fork its way out
    meanwhile). power_on() lifts the silence, so its services can be started again on the same
    ports. close() kills what is left and removes every rule and the cgroup.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.tag = f"aggregator-host-{name}-{uuid.uuid4().hex[:8]}"
        self.cgroup: Path = cgroup2_root() / self.tag
        self.cgroup.mkdir()
        self.ports: set[int] = set()
        self.active: list[list[str]] = []

    def members(self) -> set[int]:
        """Return the pids of the processes now in the host."""
        return {int(pid) for pid in (self.cgroup / "cgroup.procs").read_text().split()}

    def adopt(self, *pids: int, ports: tuple[int, ...] = ()) -> None:
        """Move processes and all their descendants into the host; note the ports it serves."""
        self.ports.update(ports)
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

    def _rules(self) -> list[list[str]]:
        drop = ["-m", "comment", "--comment", self.tag, "-j", "DROP"]
        rules = [
            ["INPUT", "-i", "lo", "-p", "tcp", direction, str(port), *drop]
            for port in sorted(self.ports)
            for direction in ("--dport", "--sport")
        ]
        return [*rules, ["OUTPUT", "-m", "cgroup", "--path", self.tag, *drop]]

    def power_cut(self) -> int:
        """Silence the host, then SIGKILL all its processes at once; return how many died."""
        for rule in self._rules():
            subprocess.run(["iptables", "-I", *rule], check=True, capture_output=True)
            self.active.append(rule)
        return self._kill_all()

    def _kill_all(self) -> int:
        killed = len(self.members())
        (self.cgroup / "cgroup.kill").write_text("1")
        wait_until(lambda: "populated 0" in (self.cgroup / "cgroup.events").read_text(), 10)
        return killed

    def power_on(self) -> None:
        """Let packets to and from the host through again (its processes are not started)."""
        while self.active:
            rule = self.active.pop()
            subprocess.run(["iptables", "-D", *rule], check=False, capture_output=True)

    def close(self) -> None:
        """Kill whatever still runs in the host, remove its rules and its cgroup."""
        self.power_on()
        if self.cgroup.exists():
            self._kill_all()
            self.cgroup.rmdir()


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
