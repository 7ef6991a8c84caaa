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
import math

import redis
from flask import Flask
from flask import current_app
from flask import g
from flask import request
from werkzeug.datastructures import WWWAuthenticate
from werkzeug.exceptions import Forbidden
from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.exceptions import TooManyRequests
from werkzeug.exceptions import Unauthorized

from app.config import ApiToken
from app.config import Settings
from app.config import SettingsError
from app.ratelimit import RateBudget

logger = logging.getLogger(__name__)

# A publish costs one unit of the budget per event, or per this many bytes of
# body if that is more, charged before the body is read.
BODY_BYTES_PER_UNIT = 8192

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
    scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
    match = tokens.match(presented.encode()) if scheme.lower() == "bearer" else None
    if match is None:
        # Only failed attempts count, and only they are refused when too many
        # came from one address: a valid token is never locked out by others'
        # guessing from its address (tokens are long and random, app.config, so
        # guessing stays hopeless; the limit bounds what wrong attempts cost).
        if failures is not None:
            address = _client_address()
            wait = failures.exhausted(address)
            if wait is not None:
                raise TooManyRequests(
                    "too many failed authentications from this address", retry_after=int(wait)
                )
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
    _spend(budget, 1, "a request")


def _refuse_if_never_fits(budget: RateBudget, cost: int, what: str) -> None:
    # Refused for good rather than with a 429 a client would retry forever.
    if cost > budget.amount:
        raise RequestEntityTooLarge(
            f"{what} costs {cost} of the budget (RATE_LIMIT), which is {budget.describe()}:"
            f" it can never pass; send at most {budget.amount} per request"
        )


def _spend(budget: RateBudget, cost: int, what: str) -> None:
    _refuse_if_never_fits(budget, cost, what)
    wait = budget.charge(g.get("client_id") or _client_address(), cost)
    if wait is not None:
        raise TooManyRequests(f"budget of {budget.describe()} spent", retry_after=int(wait))


def charge_body(size: int) -> None:
    """Charge a publish for its body's size before it is read: one per BODY_BYTES_PER_UNIT.

    The request already paid one; called again with a larger size (a gzip
    body's decoded size) it charges only the difference. charge_events later
    adds what its events cost beyond this, so a publish costs
    max(events, size / BODY_BYTES_PER_UNIT).
    """
    budget: RateBudget | None = current_app.extensions.get("rate_budget")
    paid = g.get("body_units", 1)
    units = max(paid, math.ceil(size / BODY_BYTES_PER_UNIT))
    g.body_units = units
    if budget is not None and units > paid:
        what = f"a body of {size} bytes (one per {BODY_BYTES_PER_UNIT} bytes)"
        _refuse_if_never_fits(budget, units, what)
        _spend(budget, units - paid, what)


def charge_events(events: int) -> None:
    """Charge a publish for its events beyond what its request and body already cost."""
    budget: RateBudget | None = current_app.extensions.get("rate_budget")
    paid = g.get("body_units", 1)
    if budget is not None and events > paid:
        _refuse_if_never_fits(budget, events, f"a batch of {events} events")
        _spend(budget, events - paid, f"a batch of {events} events")


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
            "no API_TOKENS configured: set API_TOKENS (see docs/api.md, Who may do what)"
            " or AUTH_DISABLED=1 to run open"
        )
    if settings.rate_limit:
        # One budget per client across endpoints and processes (app.ratelimit).
        budget = RateBudget.from_notation(client, settings.rate_limit, name="requests")
        budget.start_syncing()
        app.extensions["rate_budget"] = budget
        app.before_request(lambda: _check_rate(budget))
