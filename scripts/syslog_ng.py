"""syslog-ng for the shipper test: the machine's, or Debian's packages unpacked beside rsyslog.

Debian's syslog-ng conflicts with rsyslog (both provide system-log-daemon), so
installing it would remove the logger the rsyslog recipe is tested with. Where
syslog-ng is not installed, its packages are downloaded (`apt-get download`) and
unpacked into a cache directory, and run from there with their own libraries and
modules. Nothing is installed and no service is started.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from scripts.services import ServiceError

# syslog-ng with its http() destination, and the libraries a Debian machine without
# syslog-ng lacks (the rest, such as libcurl and glib, come with Python and apt).
PACKAGES = ("syslog-ng-core", "syslog-ng-mod-http", "libivykis0", "libnet1", "libpcre3")
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "log-aggregator"
MULTIARCH = "x86_64-linux-gnu"


@dataclass(frozen=True)
class SyslogNg:
    """How to run one syslog-ng: its binary, modules and libraries."""

    binary: Path
    module_path: Path
    library_path: str = ""

    def command(self, config: Path, state: Path) -> list[str]:
        """syslog-ng in the foreground with its persist file, control socket and pid in `state`."""
        return [
            str(self.binary),
            "--foreground",
            "--stderr",
            f"--cfgfile={config}",
            f"--module-path={self.module_path}",
            f"--persist-file={state / 'syslog-ng.persist'}",
            f"--control={state / 'syslog-ng.ctl'}",
            f"--pidfile={state / 'syslog-ng.pid'}",
        ]

    def environ(self) -> dict[str, str]:
        """Variables its process needs besides the caller's (the unpacked libraries)."""
        if not self.library_path:
            return {}
        inherited = os.environ.get("LD_LIBRARY_PATH", "")
        return {"LD_LIBRARY_PATH": ":".join(p for p in (self.library_path, inherited) if p)}


def _installed(root: Path) -> SyslogNg | None:
    """The syslog-ng under root (/ or an unpacked tree) if it has the http() module."""
    modules = sorted((root / "usr/lib/syslog-ng").glob("3.*/libhttp.so"))
    binary = root / "usr/sbin/syslog-ng"
    if not modules or not binary.exists():
        return None
    if root == Path("/"):
        return SyslogNg(binary, modules[-1].parent)
    libraries = [
        root / "usr/lib/syslog-ng",
        root / "usr/lib" / MULTIARCH,
        root / "lib" / MULTIARCH,
    ]
    return SyslogNg(binary, modules[-1].parent, ":".join(str(p) for p in libraries))


def _download(packages: tuple[str, ...], into: Path) -> None:
    """`apt-get download` the packages into a directory, updating the lists once if needed."""
    if not shutil.which("apt-get") or not shutil.which("dpkg"):
        raise ServiceError("syslog-ng is missing: install syslog-ng-core and syslog-ng-mod-http")
    download = ["apt-get", "-o", "DPkg::Lock::Timeout=300", "download", "-qq", *packages]
    if subprocess.run(download, cwd=into, capture_output=True).returncode == 0:
        return
    if os.geteuid() != 0:
        raise ServiceError("syslog-ng is missing and apt's package lists are out of date")
    subprocess.run(["apt-get", "update", "-qq"], capture_output=True, check=True)
    subprocess.run(download, cwd=into, capture_output=True, check=True)


def _unpack(target: Path) -> None:
    """Unpack Debian's packages into target, atomically (a half-unpacked tree is never used)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        debs, tree = Path(scratch) / "debs", Path(scratch) / "root"
        debs.mkdir()
        debs.chmod(0o777)  # apt's download sandbox user writes here
        _download(PACKAGES, debs)
        for deb in sorted(debs.glob("*.deb")):
            subprocess.run(["dpkg-deb", "-x", str(deb), str(tree)], check=True)
        if target.exists():  # another session unpacked it meanwhile
            return
        tree.rename(target)


def find_syslog_ng() -> SyslogNg:
    """Locate syslog-ng with http(): $SYSLOG_NG, the machine's, else Debian's unpacked."""
    if os.environ.get("SYSLOG_NG"):
        found = _installed(Path(os.environ["SYSLOG_NG"]))
        if found is None:
            raise ServiceError(
                f"SYSLOG_NG={os.environ['SYSLOG_NG']} holds no syslog-ng with http()"
            )
        return found
    for root in (Path("/"), CACHE / "syslog-ng"):
        found = _installed(root)
        if found is not None:
            return found
    print("unpacking syslog-ng from Debian's packages", flush=True)
    _unpack(CACHE / "syslog-ng")
    found = _installed(CACHE / "syslog-ng")
    if found is None:
        raise ServiceError(
            f"Debian's packages unpacked into {CACHE / 'syslog-ng'} hold no syslog-ng"
        )
    return found
