"""The compose proxy (deploy/nginx) for real: nginx in front of gunicorn holds slow clients.

Renders the repository's template the way the official nginx image does (its
`${VAR}`s from the environment) and runs Debian's nginx with it in front of the
session's API. NGINX names the binary (scripts/test.sh finds or installs it).
"""

from __future__ import annotations

import os
import re
import socket
import statistics
import subprocess
import threading
import time
from collections.abc import Callable
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from scripts.services import find_nginx
from scripts.services import free_port
from scripts.stack import ROOT
from scripts.stack import Api
from scripts.stack import wait_until

TEMPLATE = ROOT / "deploy" / "nginx" / "aggregator.conf.template"


def render(values: dict[str, str]) -> str:
    """Substitute ${VAR} as envsubst does for the variables given; leave nginx's $vars."""
    text = TEMPLATE.read_text()
    missing = set(re.findall(r"\$\{([A-Z_]+)\}", text)) - set(values)
    assert not missing, f"the template needs {missing}"
    return re.sub(r"\$\{([A-Z_]+)\}", lambda m: values[m.group(1)], text)


class Proxy:
    def __init__(self, base: Path, upstream: str, **overrides: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        base.mkdir(parents=True, exist_ok=True)
        base.chmod(0o777)
        values = {
            "PROXY_LISTEN": f"127.0.0.1:{self.port}",
            "AGGREGATOR_UPSTREAM": upstream,
            "FLOWER_UPSTREAM": "127.0.0.1:9",  # never reached in these tests
            "PROXY_HEADER_TIMEOUT": "2s",
            "PROXY_BODY_TIMEOUT": "2s",
            "PROXY_CONNECTIONS_PER_CLIENT": "1000",
            **overrides,
        }
        (base / "aggregator.conf").write_text(render(values))
        user = "user root;" if os.geteuid() == 0 else ""
        (base / "nginx.conf").write_text(
            f"""{user}
worker_processes 1;
pid {base}/nginx.pid;
error_log {base}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {base}/body;
    proxy_temp_path {base}/proxy;
    fastcgi_temp_path {base}/fastcgi;
    uwsgi_temp_path {base}/uwsgi;
    scgi_temp_path {base}/scgi;
    include {base}/aggregator.conf;
}}
"""
        )
        self.base = base
        self._stderr = open(base / "stderr.log", "wb")
        self.process = subprocess.Popen(
            [
                str(find_nginx()),
                "-p",
                str(base),
                "-c",
                str(base / "nginx.conf"),
                "-g",
                "daemon off;",
            ],
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


@pytest.fixture(scope="module")
def proxy(api: Api, scratch_dir: Path) -> Iterator[Proxy]:
    server = Proxy(scratch_dir / "nginx", api.url.removeprefix("http://"))
    yield server
    server.stop()


def open_connections(proxy: Proxy, count: int, first_bytes: bytes) -> list[socket.socket]:
    host, port = proxy.url.removeprefix("http://").split(":")
    sockets = []
    for _ in range(count):
        sock = socket.create_connection((host, int(port)), timeout=5)
        if first_bytes:
            sock.sendall(first_bytes)
        sockets.append(sock)
    return sockets


def keep_dripping(sockets: list[socket.socket], stop: threading.Event) -> threading.Thread:
    """Send one more byte of each body every 0.5 s, under the proxy's 2 s between reads."""

    def drip() -> None:
        while not stop.wait(0.5):
            for sock in sockets:
                try:
                    sock.sendall(b" ")
                except OSError:
                    pass

    thread = threading.Thread(target=drip, daemon=True)
    thread.start()
    return thread


def still_waiting(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        sock.recv(1, socket.MSG_PEEK)
    except BlockingIOError:
        return True  # open, and nothing to read yet
    return False


def timed(call: Callable[[], requests.Response], times: int) -> list[float]:
    latencies = []
    for _ in range(times):
        started = time.perf_counter()
        assert call().status_code == 200
        latencies.append(time.perf_counter() - started)
    return latencies


DRIP_HEAD = (
    b"POST /publish HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    b"Content-Length: 100000\r\n\r\n{"
)


def test_health_stays_fast_through_the_proxy_beside_hundreds_of_idle_and_dripping_clients(
    proxy: Proxy,
) -> None:
    idle = open_connections(proxy, 200, b"")
    dripping = open_connections(proxy, 200, DRIP_HEAD)
    stop = threading.Event()
    dripper = keep_dripping(dripping, stop)
    try:
        with requests.Session() as session:
            latencies = timed(lambda: session.get(f"{proxy.url}/health", timeout=5), 300)
        p99 = statistics.quantiles(latencies, n=100)[98]
        assert p99 < 0.100, f"p99 {p99 * 1000:.1f} ms"
        # The dripping clients were still held open, unanswered (by nginx, not by the API).
        assert all(still_waiting(sock) for sock in dripping[:20])
    finally:
        stop.set()
        dripper.join()
        for sock in idle + dripping:
            sock.close()


def test_a_client_stalling_in_its_headers_is_cut_off_by_the_header_timeout(proxy: Proxy) -> None:
    (sock,) = open_connections(proxy, 1, b"GET /health HTTP/1.1\r\nHost: x\r\n")
    started = time.monotonic()
    sock.settimeout(10)
    try:
        assert sock.recv(4096) == b""  # nginx closes after PROXY_HEADER_TIMEOUT (2 s)
    finally:
        sock.close()
    assert 1.5 < time.monotonic() - started < 6


def test_a_body_over_the_limit_is_refused_by_the_proxy(proxy: Proxy) -> None:
    head = (
        b"POST /publish HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % (9 * 2**20)
    )
    (sock,) = open_connections(proxy, 1, head)
    try:
        assert sock.recv(4096).startswith(b"HTTP/1.1 413")  # from Content-Length, unread
    finally:
        sock.close()


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("post", "/flower/api/task/async-apply/tasks.ingest.store_batch"),
        ("post", "/flower/api/worker/shutdown/w1"),
        ("get", "/flower/api/tasks"),
        ("post", "/flower/dashboard"),
        ("get", "/flower/metrics"),
    ],
)
def test_flowers_control_api_and_metrics_are_closed_at_the_proxy(
    proxy: Proxy, method: str, path: str
) -> None:
    assert requests.request(method, f"{proxy.url}{path}", timeout=10).status_code == 403


def test_requests_in_progress_per_client_are_limited(api: Api, scratch_dir: Path) -> None:
    small = Proxy(
        scratch_dir / "nginx-limited",
        api.url.removeprefix("http://"),
        PROXY_CONNECTIONS_PER_CLIENT="5",
    )
    held = open_connections(small, 5, DRIP_HEAD)
    try:
        refused = requests.get(f"{small.url}/health", timeout=5)
        assert refused.status_code == 429
        for sock in held:
            sock.close()
        wait_until(
            lambda: requests.get(f"{small.url}/health", timeout=5).status_code == 200, timeout=10
        )
    finally:
        for sock in held:
            sock.close()
        small.stop()
