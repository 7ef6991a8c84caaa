"""Silent partitions for the HA suites: a port, or a whole host's processes, cut off."""

from __future__ import annotations

import contextlib
import os
import subprocess
import uuid
from pathlib import Path

from scripts.services import ServiceError
from scripts.services import find_iptables
from scripts.stack import wait_until


class SilentPartition:
    """Drops every packet to and from one loopback port (iptables), so its peers hear nothing.

    No reset, no refusal: connections to the port hang as across a cut network link. Each rule
    carries a comment naming this test run, and every rule added is removed on heal().

    With `process_group`, the processes of that group (a whole "host": pg_autoctl, PostgreSQL
    and its backends) are cut off too: moved into a cgroup of their own whose every outgoing
    packet is dropped, so their connections to other ports (a keeper's to the monitor) go
    silent as well. Processes they start later inherit the cgroup.
    """

    def __init__(self, port: int, process_group: int | None = None) -> None:
        self.port = port
        self.process_group = process_group
        self.tag = f"aggregator-ha-{uuid.uuid4().hex[:8]}"
        comment = ["-m", "comment", "--comment", self.tag, "-j", "DROP"]
        self.rules: list[list[str]] = [
            ["INPUT", "-i", "lo", "-p", "tcp", direction, str(port), *comment]
            for direction in ("--dport", "--sport")
        ]
        self.cgroup: Path | None = None
        if process_group is not None:
            self.cgroup = cgroup2_root() / self.tag
            self.rules.append(["OUTPUT", "-m", "cgroup", "--path", self.tag, *comment])
        self.active: list[list[str]] = []

    def cut(self) -> None:
        if self.cgroup is not None and self.process_group is not None:
            self.cgroup.mkdir()
            for pid in group_members(self.process_group):
                # A process may have ended since it was listed.
                try:
                    (self.cgroup / "cgroup.procs").write_text(str(pid))
                except (ProcessLookupError, OSError):
                    continue
        for rule in self.rules:
            subprocess.run(["iptables", "-I", *rule], check=True, capture_output=True)
            self.active.append(rule)

    def heal(self) -> None:
        while self.active:
            rule = self.active.pop()
            subprocess.run(["iptables", "-D", *rule], check=False, capture_output=True)
        if self.cgroup is not None and self.cgroup.exists():
            wait_until(self._emptied, timeout=10, interval=0.1)

    def _emptied(self) -> bool:
        """Move the cgroup's processes back to its parent and remove it; say whether it went.

        A process forked while the others were moved, or one that exited but is not reaped
        yet, keeps the cgroup busy (EBUSY) for a moment: the caller tries again.
        """
        assert self.cgroup is not None
        for pid in (self.cgroup / "cgroup.procs").read_text().split():
            with contextlib.suppress(ProcessLookupError, OSError):
                (self.cgroup.parent / "cgroup.procs").write_text(pid)
        try:
            self.cgroup.rmdir()
        except OSError:
            return False
        return True


def cgroup2_root() -> Path:
    """Return where the cgroup v2 hierarchy is mounted (alone, or beside v1 as `unified`)."""
    with open("/proc/mounts", encoding="utf-8") as mounts:
        for line in mounts:
            fields = line.split()
            if fields[2] == "cgroup2":
                return Path(fields[1])
    raise RuntimeError("no cgroup2 hierarchy is mounted")


def group_members(process_group: int) -> list[int]:
    """Return the pids of a process group's live members."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path("/proc", entry, "stat").read_text()
        except OSError:
            continue
        # Fields after the command name (which may hold spaces): state, ppid, pgrp, ...
        if int(stat.rsplit(")", 1)[1].split()[2]) == process_group:
            members.append(int(entry))
    return members


def iptables_usable() -> str | None:
    """Say why iptables cannot be used here (installed from Debian if missing), or None."""
    try:
        iptables = find_iptables()
    except (ServiceError, subprocess.CalledProcessError) as error:
        return f"iptables is not installed and could not be: {error}"
    probe = subprocess.run([str(iptables), "-S", "INPUT"], capture_output=True, text=True)
    return None if probe.returncode == 0 else f"iptables refused: {probe.stderr.strip()}"
