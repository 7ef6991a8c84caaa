"""Silent partitions for the replicated-broker suite: packets to and from a port dropped."""

from __future__ import annotations

import shutil
import subprocess
import uuid


class SilentPartition:
    """Drops every packet to and from one loopback port (iptables), so its peers hear nothing.

    No reset, no refusal: connections to the port hang as across a cut network link. Each rule
    carries a comment naming this test run, and every rule added is removed on heal().
    """

    def __init__(self, port: int) -> None:
        self.port = port
        self.tag = f"aggregator-ha-{uuid.uuid4().hex[:8]}"
        self.rules: list[list[str]] = [
            ["INPUT", "-i", "lo", "-p", "tcp", direction, str(port)]
            + ["-m", "comment", "--comment", self.tag, "-j", "DROP"]
            for direction in ("--dport", "--sport")
        ]
        self.active: list[list[str]] = []

    def cut(self) -> None:
        for rule in self.rules:
            subprocess.run(["iptables", "-I", *rule], check=True, capture_output=True)
            self.active.append(rule)

    def heal(self) -> None:
        while self.active:
            rule = self.active.pop()
            subprocess.run(["iptables", "-D", *rule], check=False, capture_output=True)


def iptables_usable() -> str | None:
    """Say why iptables cannot be used here, or None."""
    if shutil.which("iptables") is None:
        return "iptables is not installed (apt-get install iptables)"
    probe = subprocess.run(["iptables", "-S", "INPUT"], capture_output=True, text=True)
    return None if probe.returncode == 0 else f"iptables refused: {probe.stderr.strip()}"
