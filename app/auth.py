"""Bearer tokens and per-token rate limits for everything but liveness and the API document."""

from __future__ import annotations

import hashlib
import hmac

from flask import Flask
from flask import g
from flask import request
from flask_limiter import Limiter
from werkzeug.datastructures import WWWAuthenticate
from werkzeug.exceptions import Unauthorized

from app.config import Settings

# Probes and the OpenAPI document stay open, so orchestrators and clients can use them.
OPEN_ENDPOINTS = frozenset({"health.health", "health.ready", "api-docs.openapi_json"})


def _token_id(token: str) -> str:
    # Rate-limit keys and logs name a token by a digest, never by the token itself.
    return hashlib.sha256(token.encode()).hexdigest()[:16]


def _check_token(tokens: tuple[bytes, ...]) -> None:
    if request.endpoint in OPEN_ENDPOINTS or request.endpoint is None:
        return
    scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
    candidate = presented.strip().encode()
    # Compare with every token, so timing tells nothing about which one came close.
    matches = [hmac.compare_digest(candidate, token) for token in tokens]
    if scheme.lower() != "bearer" or not any(matches):
        raise Unauthorized(
            "send a valid token as 'Authorization: Bearer <token>'",
            www_authenticate=WWWAuthenticate("bearer", {"realm": "log-aggregator"}),
        )
    g.client_id = _token_id(presented.strip())


def _client_key() -> str:
    return g.get("client_id") or request.remote_addr or "unknown"


def _is_open() -> bool:
    return request.endpoint in OPEN_ENDPOINTS


def init_auth(app: Flask, settings: Settings) -> None:
    """Require a bearer token when tokens are configured, and limit each client's rate."""
    if settings.api_tokens:
        tokens = tuple(token.encode() for token in settings.api_tokens)
        app.before_request(lambda: _check_token(tokens))
    # Counters live in Redis, so the limit holds across processes and replicas.
    # If Redis is away the limit is skipped: publishing answers 503 on its own.
    Limiter(
        _client_key,
        app=app,
        default_limits=[settings.rate_limit] if settings.rate_limit else [],
        default_limits_exempt_when=_is_open,
        storage_uri=settings.redis_url,
        storage_options={"socket_timeout": settings.broker_timeout},
        strategy="fixed-window",
        headers_enabled=True,
        swallow_errors=True,
        key_prefix="aggregator-limit",
    )
