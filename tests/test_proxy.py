"""The compose proxy (deploy/nginx) for real: nginx in front of gunicorn holds slow clients.

Renders the repository's template the way the official nginx image does (its
`${VAR}`s from the environment) into a conf.d that the shipped deploy/nginx/nginx.conf
includes, as in the container, and runs Debian's nginx with it in front of the
session's API (tests/nginx.py). The template also loads under the nginx image's own nginx.conf
(deploy/standin/nginx/nginx.conf), which already sets keepalive_timeout and others in
`http`. NGINX names the binary (scripts/test.sh finds or installs it).
"""

from __future__ import annotations

import fcntl
import json
import re
import socket
import statistics
import struct
import subprocess
import termios
import threading
import time
import uuid
from collections.abc import Callable
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from app.schemas import MAX_WAIT_SECONDS
from scripts.services import find_nginx
from scripts.services import free_port
from scripts.stack import Api
from scripts.stack import Worker
from scripts.stack import wait_until
from tests.helpers import make_event
from tests.helpers import publish
from tests.helpers import settled_stats
from tests.helpers import stats
from tests.nginx import IMAGE_CONF
from tests.nginx import TEMPLATE
from tests.nginx import Proxy
from tests.nginx import lay_out


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
        # nginx drops the connection after PROXY_HEADER_TIMEOUT (2 s), with a reset
        # (reset_timedout_connection: its buffers are freed at once).
        with pytest.raises(ConnectionResetError):
            sock.recv(4096)
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

    def sixth_is_refused() -> bool:
        # nginx releases a finished request's count a moment after its answer, so the
        # start-up probe can still count when the first held ones arrive, and one of them
        # is refused instead: hold another in its place. And nginx counts a held
        # connection only once it has read its head: poll, briefly.
        for index, sock in enumerate(held):
            if not still_waiting(sock):
                sock.close()
                (held[index],) = open_connections(small, 1, DRIP_HEAD)
        return requests.get(f"{small.url}/health", timeout=5).status_code == 429

    try:
        wait_until(sixth_is_refused, timeout=5)
        for sock in held:
            sock.close()
        wait_until(
            lambda: requests.get(f"{small.url}/health", timeout=5).status_code == 200, timeout=10
        )
    finally:
        for sock in held:
            sock.close()
        small.stop()


def test_the_template_loads_under_the_nginx_images_own_nginx_conf(scratch_dir: Path) -> None:
    # The image's http block already sets keepalive_timeout, sendfile, access_log...:
    # a template that sets one again is an [emerg] there, and the proxy never starts.
    base = scratch_dir / "nginx-image-conf"
    conf = lay_out(
        base,
        IMAGE_CONF,
        {
            "PROXY_LISTEN": f"127.0.0.1:{free_port()}",
            "PROXY_RESOLVER": "127.0.0.1",
            "AGGREGATOR_UPSTREAM": "127.0.0.1:9",
            "FLOWER_UPSTREAM": "127.0.0.1:9",
            "PROXY_HEADER_TIMEOUT": "10s",
            "PROXY_BODY_TIMEOUT": "10s",
            "PROXY_CONNECTIONS_PER_CLIENT": "64",
        },
    )
    done = subprocess.run(
        [str(find_nginx()), "-t", "-p", str(base), "-c", str(conf)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr


HALF_HEADER = b"GET /health HTTP/1.1\r\nHost: x\r\n"


def test_health_holds_beside_2100_clients_holding_half_sent_headers(
    api: Api, scratch_dir: Path
) -> None:
    # The compose timeouts: a half-sent header is held for up to 10 s.
    proxy = Proxy(
        scratch_dir / "nginx-2100",
        api.url.removeprefix("http://"),
        PROXY_HEADER_TIMEOUT="10s",
        PROXY_BODY_TIMEOUT="10s",
    )
    held: list[socket.socket] = []
    try:
        held = open_connections(proxy, 2100, HALF_HEADER)
        with requests.Session() as session:
            for _ in range(20):
                assert session.get(f"{proxy.url}/health", timeout=5).status_code == 200
        # Every one still held open by nginx, unanswered, while /health was served.
        assert all(still_waiting(sock) for sock in held)
    finally:
        for sock in held:
            sock.close()
        proxy.stop()


def test_an_export_to_a_reader_that_stalls_is_streamed_not_spooled_to_the_proxys_disk(
    api: Api, worker: Worker, scratch_dir: Path
) -> None:
    topic = f"proxy-export-{uuid.uuid4().hex[:8]}"
    received = stats(api.url)["total_received_queued"]
    padding = "x" * 1000
    for start in range(0, 2000, 500):
        batch = [make_event(f"e-{n}", topic, pad=padding) for n in range(start, start + 500)]
        publish(api.url, batch)
    settled_stats(api.url, received + 2000)
    # Small socket buffers, so the ~2 MB export cannot hide in the kernel's.
    proxy = Proxy(
        scratch_dir / "nginx-export", api.url.removeprefix("http://"), listen_options="sndbuf=16k"
    )
    host, port = proxy.url.removeprefix("http://").split(":")
    try:
        body = read_export_slowly(host, int(port), topic)
        spooled = b"buffered to a temporary file" in (proxy.base / "error.log").read_bytes()
    finally:
        proxy.stop()
    assert not spooled
    head, _, rest = body.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    lines = dechunk(rest).splitlines()
    assert len(lines) == 2000
    assert json.loads(lines[-1])["event_id"] == "e-1999"


def read_export_slowly(host: str, port: int, topic: str) -> bytes:
    """Ask for an export, stop reading until nothing more arrives, then read it all."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a slow reader fills up soon
        sock.settimeout(30)
        sock.connect((host, port))
        sock.sendall(
            f"GET /events?topic={topic} HTTP/1.1\r\nHost: x\r\n"
            "Accept: application/x-ndjson\r\nConnection: close\r\n\r\n".encode()
        )
        # The reader stalls until what reached it stops growing: the proxy either holds the
        # rest of the export (~2 MB) somewhere, or stopped reading it from gunicorn.
        wait_until(stopped_growing(sock), timeout=20, interval=0.3)
        body = b""
        while chunk := sock.recv(1 << 16):
            body += chunk
        return body


def stopped_growing(sock: socket.socket) -> Callable[[], bool]:
    """A condition: the bytes waiting unread in sock's receive queue did not change since the
    last call."""
    last = [-1]

    def check() -> bool:
        waiting = struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0" * 4))[0]
        stopped = waiting == last[0] and waiting > 0
        last[0] = waiting
        return stopped

    return check


def dechunk(data: bytes) -> bytes:
    """Undo HTTP/1.1 chunked transfer coding."""
    out = b""
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out += data[:size]
        data = data[size + 2 :]
    return out


def test_the_proxy_waits_longer_for_an_answer_than_the_apis_longest_long_poll() -> None:
    # GET /events?wait=30 answers after 30 s: a 30 s proxy_read_timeout made it a 504.
    timeouts = re.findall(r"proxy_read_timeout\s+(\d+)s;", TEMPLATE.read_text())
    assert timeouts and all(int(seconds) > MAX_WAIT_SECONDS + 5 for seconds in timeouts)
