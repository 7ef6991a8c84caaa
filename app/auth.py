"""Bearer tokens with scopes, per-client budgets, and a limit on failed authentication.

Closed by default: create_app refuses to start without tokens unless
AUTH_DISABLED=1 (app.config). Every request but liveness, readiness, the API
document and its /docs page needs a token, unknown routes and methods included
(they get 404/405 only after it), and the token must carry the scope of the endpoint.
"""

from __future__ import annotations

import hashlib
import hmac
import logging

import redis
from flask import Flask
from flask import current_app
from flask import g
from flask import request
from werkzeug.datastructures import WWWAuthenticate
from werkzeug.exceptions import Forbidden
from werkzeug.exceptions import TooManyRequests
from werkzeug.exceptions import Unauthorized

from app.config import ApiToken
from app.config import Settings
from app.config import SettingsError
from app.ratelimit import RateBudget

logger = logging.getLogger(__name__)

# Probes, the OpenAPI document and the docs built on it stay open, so
# orchestrators and clients can use them.
OPEN_ENDPOINTS = frozenset(
    {
        "health.health",
        "health.ready",
        "api-docs.openapi_json",
        "api-docs.openapi_swagger_ui",
        "docs_assets",
    }
)
# The scope each endpoint needs; any other endpoint needs "read".
SCOPE_OF = {
    "events.publish_events": "publish",
    "events.publish_batch": "publish",
    "dead_letters.replay_dead_letter": "admin",
    "broker.acknowledge_broker_data_loss": "admin",
}


def _token_id(token: str) -> str:
    # Rate-limit keys and logs name a token by a digest, never by the token itself.
    return hashlib.sha256(token.encode()).hexdigest()[:16]


class _Tokens:
    """The configured tokens, compared in constant time, each with its id and scopes."""

    def __init__(self, tokens: tuple[ApiToken, ...]) -> None:
        self._tokens = tuple(
            (token.secret.encode(), _token_id(token.secret), token.scopes) for token in tokens
        )

    def match(self, presented: bytes) -> tuple[str, frozenset[str]] | None:
        # Compare with every token, so timing tells nothing about which one came close.
        found = None
        for secret, token_id, scopes in self._tokens:
            if hmac.compare_digest(presented, secret):
                found = (token_id, scopes)
        return found


def _client_address() -> str:
    return request.remote_addr or "unknown"


def _authenticate(tokens: _Tokens, failures: RateBudget | None) -> None:
    if request.endpoint in OPEN_ENDPOINTS:
        return
    address = _client_address()
    if failures is not None:
        wait = failures.exhausted(address)
        if wait is not None:
            raise TooManyRequests(
                "too many failed authentications from this address", retry_after=int(wait)
            )
    scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
    match = tokens.match(presented.encode()) if scheme.lower() == "bearer" else None
    if match is None:
        if failures is not None:
            failures.charge(address)
        raise Unauthorized(
            "send a valid token as 'Authorization: Bearer <token>'",
            www_authenticate=WWWAuthenticate("bearer", {"realm": "log-aggregator"}),
        )
    g.client_id, scopes = match
    needed = SCOPE_OF.get(request.endpoint or "", "read")
    if request.endpoint is not None and needed not in scopes:
        raise Forbidden(f"this token lacks the {needed!r} scope")


def _check_rate(budget: RateBudget) -> None:
    if request.endpoint in OPEN_ENDPOINTS:
        return
    client = g.get("client_id") or _client_address()
    wait = budget.charge(client)
    if wait is not None:
        raise TooManyRequests(
            f"budget of {budget.amount} per {budget.period} s spent", retry_after=int(wait)
        )


def charge_events(events: int) -> None:
    """Charge a publish for its events beyond the one its request already cost."""
    budget: RateBudget | None = current_app.extensions.get("rate_budget")
    if budget is None or events <= 1:
        return
    wait = budget.charge(g.get("client_id") or _client_address(), events - 1)
    if wait is not None:
        raise TooManyRequests(
            f"budget of {budget.amount} events per {budget.period} s spent",
            retry_after=int(wait),
        )


def init_auth(app: Flask, client: redis.Redis, settings: Settings) -> None:
    """Require tokens (unless explicitly disabled) and limit each client's budget."""
    if settings.api_tokens:
        tokens = _Tokens(settings.api_tokens)
        failures = None
        if settings.auth_failure_limit:
            failures = RateBudget.from_notation(
                client, settings.auth_failure_limit, name="auth-failures"
            )
            failures.start_syncing()
        app.before_request(lambda: _authenticate(tokens, failures))
    elif settings.auth_disabled:
        logger.warning("AUTH_DISABLED=1: every endpoint is open to anyone who can reach it")
    else:
        raise SettingsError(
            "no API_TOKENS configured: set API_TOKENS (see README, Who may do what)"
            " or AUTH_DISABLED=1 to run open"
        )
    if settings.rate_limit:
        # One budget per client across endpoints and processes (app.ratelimit).
        budget = RateBudget.from_notation(client, settings.rate_limit, name="requests")
        budget.start_syncing()
        app.extensions["rate_budget"] = budget
        app.before_request(lambda: _check_rate(budget))
