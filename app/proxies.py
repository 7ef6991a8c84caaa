"""The client's address: X-Forwarded-For believed only from the proxies named in TRUSTED_PROXIES."""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Iterable
from ipaddress import IPv4Network
from ipaddress import IPv6Network
from ipaddress import ip_address
from typing import Any

from werkzeug.middleware.proxy_fix import ProxyFix

WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


class TrustedProxyFix:
    """WSGI middleware: ProxyFix for requests whose peer is a trusted proxy, nothing for others.

    A client that reaches gunicorn directly, around the proxy, is taken at its
    own address whatever X-Forwarded-For it sends, so it can neither dodge the
    limits kept per address nor pin them on someone else's.
    """

    def __init__(
        self, app: WsgiApp, hops: int, trusted: tuple[IPv4Network | IPv6Network, ...]
    ) -> None:
        self.app = app
        self.fixed = ProxyFix(app, x_for=hops, x_proto=hops)
        self.trusted = trusted

    def is_trusted(self, peer: str | None) -> bool:
        """Tell whether the peer's address is in a trusted network."""
        try:
            address = ip_address(peer or "")
        except ValueError:
            return False  # a unix socket, or nothing
        return any(address in network for network in self.trusted)

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        if self.is_trusted(environ.get("REMOTE_ADDR")):
            return self.fixed(environ, start_response)
        return self.app(environ, start_response)
