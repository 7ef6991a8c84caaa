"""Bearer tokens and per-token rate limits for everything but liveness and the API document."""

from __future__ import annotations

import hashlib
import hmac

import redis
from flask import Flask
from flask import g
from flask import request
from werkzeug.datastructures import WWWAuthenticate
from werkzeug.exceptions import TooManyRequests
from werkzeug.exceptions import Unauthorized

from app.config import Settings
from app.ratelimit import RateBudget

# Probes and the OpenAPI document stay open, so orchestrators and clients can use them.
OPEN_ENDPOINTS = frozenset({"health.health", "health.ready", "api-docs.openapi_json"})


def _token_id(token: str) -> str:
    # Rate-limit keys and logs name a token by a digest, never by the token itself.
    return hashlib.sha256(token.encode()).hexdigest()[:16]


def _check_token(tokens: tuple[tuple[bytes, str], ...]) -> None:
    if request.endpoint in OPEN_ENDPOINTS or request.endpoint is None:
        return
    scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
    candidate = presented.strip().encode()
    # Compare with every token, so timing tells nothing about which one came close.
    matches = [token_id for token, token_id in tokens if hmac.compare_digest(candidate, token)]
    if scheme.lower() != "bearer" or not matches:
        raise Unauthorized(
            "send a valid token as 'Authorization: Bearer <token>'",
            www_authenticate=WWWAuthenticate("bearer", {"realm": "log-aggregator"}),
        )
    g.client_id = matches[0]


def _check_rate(budget: RateBudget) -> None:
    if request.endpoint in OPEN_ENDPOINTS or request.endpoint is None:
        return
    client = g.get("client_id") or request.remote_addr or "unknown"
    budget.start_syncing()
    wait = budget.charge(client)
    if wait is not None:
        raise TooManyRequests(
            f"rate limit of {budget.amount} requests per {budget.period} s reached",
            retry_after=int(wait),
        )


def init_auth(app: Flask, client: redis.Redis, settings: Settings) -> None:
    """Require a bearer token when tokens are configured, and limit each client's rate."""
    if settings.api_tokens:
        tokens = tuple((token.encode(), _token_id(token)) for token in settings.api_tokens)
        app.before_request(lambda: _check_token(tokens))
    if settings.rate_limit:
        # One budget per client across endpoints and processes (app.ratelimit).
        budget = RateBudget.from_notation(client, settings.rate_limit)
        app.before_request(lambda: _check_rate(budget))
