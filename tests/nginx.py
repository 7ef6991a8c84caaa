"""Debian's nginx run with the repository's proxy configuration (deploy/nginx), for tests.

Renders the template the way the official nginx image does (its `${VAR}`s from the
environment) into a conf.d that the shipped deploy/nginx/nginx.conf includes, as in the
container, with the image's absolute paths moved under a directory of the test's own.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import requests

from scripts.services import LOOPBACK
from scripts.services import Place
from scripts.services import find_nginx
from scripts.services import free_port
from scripts.stack import ROOT
from scripts.stack import wait_until

TEMPLATE = ROOT / "deploy" / "nginx" / "aggregator.conf.template"
SHIPPED_CONF = ROOT / "deploy" / "nginx" / "nginx.conf"  # compose mounts it over the image's
IMAGE_CONF = ROOT / "deploy" / "standin" / "nginx" / "nginx.conf"  # the official image's file


def render(values: dict[str, str]) -> str:
    """Substitute ${VAR} as envsubst does for the variables given; leave nginx's $vars."""
    text = TEMPLATE.read_text()
    missing = set(re.findall(r"\$\{([A-Z_]+)\}", text)) - set(values)
    assert not missing, f"the template needs {missing}"
    return re.sub(r"\$\{([A-Z_]+)\}", lambda m: values[m.group(1)], text)


def main_conf(source: Path, base: Path) -> str:
    """An nginx.conf of the image's layout, with its absolute paths moved under base."""
    text = source.read_text()
    mime_types = Path("/etc/nginx/mime.types")
    if not mime_types.exists():  # an nginx from elsewhere than Debian's package
        mime_types = base / "mime.types"
        mime_types.write_text("types {}\n")
    moves = {
        "/etc/nginx/conf.d/": f"{base}/conf.d/",
        "/etc/nginx/mime.types": str(mime_types),
        "/var/log/nginx/": f"{base}/",
        "/var/run/nginx.pid": f"{base}/nginx.pid",
    }
    for old, new in moves.items():
        assert old in text, f"{source} no longer names {old}"
        text = text.replace(old, new)
    # The image's `nginx` account does not exist here; as root, workers run as root.
    user = "user root;" if os.geteuid() == 0 else ""
    text, found = re.subn(r"^user\s+nginx;", user, text, flags=re.M)
    assert found == 1, f"{source} no longer runs workers as nginx"
    return text


def lay_out(base: Path, main: Path, values: dict[str, str], http_extra: str = "") -> Path:
    """Write main (paths moved) and the rendered template into conf.d; return nginx.conf.

    `http_extra` goes into the `http` block before the template (an `upstream` group its
    AGGREGATOR_UPSTREAM names, another access log).
    """
    (base / "conf.d").mkdir(parents=True, exist_ok=True)
    base.chmod(0o777)
    # Temporary files where the test can see them, before the template in include order.
    (base / "conf.d" / "00-paths.conf").write_text(
        "".join(f"{kind}_temp_path {base}/{kind};\n" for kind in TEMP_KINDS)
    )
    (base / "conf.d" / "01-extra.conf").write_text(http_extra)
    (base / "conf.d" / "aggregator.conf").write_text(render(values))
    conf = base / "nginx.conf"
    conf.write_text(main_conf(main, base))
    return conf


TEMP_KINDS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")


class Proxy:
    """Debian's nginx with the repository's template and nginx.conf, in front of `upstream`."""

    def __init__(
        self,
        base: Path,
        upstream: str,
        main: Path = SHIPPED_CONF,
        listen_options: str = "",
        http_extra: str = "",
        place: Place = LOOPBACK,
        **overrides: str,
    ) -> None:
        self.port = free_port()
        self.url = f"http://{place.address}:{self.port}"
        base.mkdir(parents=True, exist_ok=True)
        values = {
            "PROXY_LISTEN": f"{place.address}:{self.port} {listen_options}".strip(),
            "PROXY_RESOLVER": "127.0.0.1",  # never asked: the upstreams here are addresses
            "AGGREGATOR_UPSTREAM": upstream,
            "FLOWER_UPSTREAM": "127.0.0.1:9",  # never reached in these tests
            "PROXY_HEADER_TIMEOUT": "2s",
            "PROXY_BODY_TIMEOUT": "2s",
            "PROXY_CONNECTIONS_PER_CLIENT": "1000",
            **overrides,
        }
        conf = lay_out(base, main, values, http_extra)
        self.base = base
        self._stderr = open(base / "stderr.log", "wb")
        self.process = subprocess.Popen(
            place.wrap([str(find_nginx()), "-p", str(base), "-c", str(conf), "-g", "daemon off;"]),
            stdout=subprocess.DEVNULL,
            stderr=self._stderr,
        )
        try:
            wait_until(self._answers, timeout=15)
        except TimeoutError:
            self.stop()
            raise RuntimeError((base / "stderr.log").read_text() + self.error_log()) from None

    def _answers(self) -> bool:
        try:
            return requests.get(f"{self.url}/health", timeout=1).status_code == 200
        except requests.RequestException:
            return False

    def error_log(self) -> str:
        path = self.base / "error.log"
        return path.read_text() if path.exists() else ""

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)
        self._stderr.close()
