"""A silent partition of one loopback port, and what the HA suites need of the machine."""

from __future__ import annotations

import subprocess
import uuid
from pathlib import Path

from scripts.services import ServiceError
from scripts.services import find_iptables


class SilentPartition:
    """Drops every packet to and from one loopback port (iptables), so its peers hear nothing.

    No reset, no refusal: connections to the port hang as across a cut network link. Each rule
    carries a comment naming this test run, and every rule added is removed on heal(). (Whole
    hosts are cut off inside their network namespaces instead: tests/ha/hosts.py.)
    """

    def __init__(self, port: int) -> None:
        self.port = port
        self.tag = f"aggregator-ha-{uuid.uuid4().hex[:8]}"
        comment = ["-m", "comment", "--comment", self.tag, "-j", "DROP"]
        self.rules: list[list[str]] = [
            ["INPUT", "-i", "lo", "-p", "tcp", direction, str(port), *comment]
            for direction in ("--dport", "--sport")
        ]
        self.active: list[list[str]] = []

    def cut(self) -> None:
        for rule in self.rules:
            subprocess.run([str(find_iptables()), "-I", *rule], check=True, capture_output=True)
            self.active.append(rule)

    def heal(self) -> None:
        while self.active:
            rule = self.active.pop()
            subprocess.run([str(find_iptables()), "-D", *rule], check=False, capture_output=True)


def cgroup2_root() -> Path:
    """Return where the cgroup v2 hierarchy is mounted (alone, or beside v1 as `unified`)."""
    with open("/proc/mounts", encoding="utf-8") as mounts:
        for line in mounts:
            fields = line.split()
            if fields[2] == "cgroup2":
                return Path(fields[1])
    raise RuntimeError("no cgroup2 hierarchy is mounted")


def iptables_usable() -> str | None:
    """Say why iptables cannot be used here (installed from Debian if missing), or None."""
    try:
        iptables = find_iptables()
    except (ServiceError, subprocess.CalledProcessError) as error:
        return f"iptables is not installed and could not be: {error}"
    probe = subprocess.run([str(iptables), "-S", "INPUT"], capture_output=True, text=True)
    return None if probe.returncode == 0 else f"iptables refused: {probe.stderr.strip()}"
