"""Closed by default: tokens with scopes, budgets and failed logins, against real gunicorn."""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from scripts.stack import BIN
from scripts.stack import ROOT
from scripts.stack import Api
from scripts.stack import Worker
from scripts.stack import wait_until
from tests.helpers import fixed_hex
from tests.helpers import make_event

# Random, as tokens must be (app.config refuses placeholders and guessable ones).
PUBLISHER = "publisher-" + fixed_hex("publisher", 40)
NEXT = "next-" + fixed_hex("next", 40)
READER = "reader-" + fixed_hex("reader", 40)
ADMIN = "admin-" + fixed_hex("admin", 40)
BUDGET = "budget-" + fixed_hex("budget", 40)
TOKENS = f"{PUBLISHER},{NEXT}:publish+read,{READER}:read,{ADMIN}:admin,{BUDGET}"


@pytest.fixture(scope="module")
def guarded(stack_env: dict[str, str], logs: Path) -> Iterator[Api]:
    env = {
        **stack_env,
        "AUTH_DISABLED": "",
        "API_TOKENS": TOKENS,
        "RATE_LIMIT": "40 per 60 seconds",
        "AUTH_FAILURE_LIMIT": "1000 per minute",
    }
    server = Api(env, logs / "auth-api.log", workers=1).start()
    yield server
    server.stop()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


EVENT = make_event("a-1", topic="auth")


def test_probes_and_document_need_no_token(guarded: Api) -> None:
    for path in ("/health", "/ready", "/openapi.json", "/docs", "/docs/assets/swagger-ui.css"):
        assert requests.get(f"{guarded.url}{path}", timeout=10).status_code == 200, path


@pytest.mark.parametrize(
    "headers",
    [
        {},
        bearer("wrong"),
        {"Authorization": f"Basic {PUBLISHER}"},
        bearer(""),
        bearer(PUBLISHER + "x"),  # a character appended
        bearer(PUBLISHER[:-1]),  # a character removed
        bearer("x" + PUBLISHER[1:]),  # one changed
        {"Authorization": f"Bearer {PUBLISHER} {PUBLISHER}"},
    ],
)
def test_every_endpoint_needs_an_exact_token(guarded: Api, headers: dict[str, str]) -> None:
    for method, path in (
        ("post", "/publish"),
        ("get", "/events"),
        ("get", "/stats"),
        ("get", "/batches/0123456789abcdef0123456789abcdef"),
        ("get", "/metrics"),
        ("get", "/dead-letters"),
        ("post", "/broker/data-loss/acknowledge"),
    ):
        response = requests.request(
            method, f"{guarded.url}{path}", json=EVENT, headers=headers, timeout=10
        )
        assert response.status_code == 401, (path, response.text)
        assert response.json()["code"] == 401
        assert response.headers["WWW-Authenticate"].lower().startswith("bearer")


def test_every_configured_token_works_so_they_can_be_rotated(
    guarded: Api, worker: Worker, clean: None
) -> None:
    for token in (PUBLISHER, NEXT):
        response = requests.post(
            f"{guarded.url}/publish", json=EVENT, headers=bearer(token), timeout=10
        )
        assert response.status_code == 202, response.text


@pytest.mark.parametrize(
    ("token", "method", "path", "status"),
    [
        (READER, "post", "/publish", 403),
        (READER, "get", "/stats", 200),
        (READER, "get", "/batches/0123456789abcdef0123456789abcdef", 404),
        (ADMIN, "get", "/batches/0123456789abcdef0123456789abcdef", 403),
        (READER, "post", "/broker/data-loss/acknowledge", 403),
        (PUBLISHER, "post", "/broker/data-loss/acknowledge", 403),
        (PUBLISHER, "post", "/dead-letters/1/replay", 403),
        (ADMIN, "get", "/stats", 403),
        (ADMIN, "post", "/publish", 403),
        (ADMIN, "post", "/broker/data-loss/acknowledge", 200),
        (ADMIN, "post", "/dead-letters/999999/replay", 404),
    ],
)
def test_each_endpoint_needs_its_scope(
    guarded: Api, token: str, method: str, path: str, status: int
) -> None:
    response = requests.request(
        method, f"{guarded.url}{path}", json=EVENT, headers=bearer(token), timeout=10
    )
    assert response.status_code == status, response.text
    if status == 403:
        assert "scope" in response.json()["message"]


def test_unknown_routes_and_methods_need_a_token_and_add_no_metric_series(guarded: Api) -> None:
    assert requests.request("BREW", f"{guarded.url}/publish", timeout=10).status_code == 401
    assert requests.get(f"{guarded.url}/nope", timeout=10).status_code == 401
    headers = bearer(READER)
    assert requests.get(f"{guarded.url}/nope", headers=headers, timeout=10).status_code == 404
    methods = [f"M{n:03d}" for n in range(25)]
    for method in methods:
        answer = requests.request(method, f"{guarded.url}/stats", headers=headers, timeout=10)
        assert answer.status_code == 405
    text = requests.get(f"{guarded.url}/metrics", headers=headers, timeout=10).text
    seen = set(re.findall(r'aggregator_http_requests_total\{[^}]*method="([^"]+)"', text))
    assert "other" in seen
    assert not seen & set(methods)


def test_one_budget_per_token_across_endpoints_weighted_by_events(guarded: Api) -> None:
    # 40 per minute: a 30-event batch and a read leave 9; a 10-event batch is then refused whole.
    headers = bearer(BUDGET)
    batch = [make_event(f"w-{n}", topic="budget") for n in range(30)]
    # Not within 5 s of the window's end, so the whole test spends one window's budget.
    wait_until(lambda: time.time() % 60 < 55, timeout=10)
    spent = requests.post(f"{guarded.url}/publish", json=batch, headers=headers, timeout=10)
    assert spent.status_code == 202, spent.text
    assert requests.get(f"{guarded.url}/events", headers=headers, timeout=10).status_code == 200
    more = [make_event(f"x-{n}", topic="budget") for n in range(10)]
    refused = requests.post(f"{guarded.url}/publish", json=more, headers=headers, timeout=10)
    assert refused.status_code == 429, refused.text
    assert int(refused.headers["Retry-After"]) >= 1
    assert refused.json()["code"] == 429
    # Another token has its own budget.
    other = requests.get(f"{guarded.url}/events", headers=bearer(READER), timeout=10)
    assert other.status_code == 200


def test_a_batch_larger_than_the_whole_budget_is_refused_for_good_naming_it(
    guarded: Api,
) -> None:
    batch = [make_event(f"big-{n}", topic="budget") for n in range(41)]  # the budget is 40
    refused = requests.post(f"{guarded.url}/publish", json=batch, headers=bearer(NEXT), timeout=10)
    assert refused.status_code == 413, refused.text
    message = refused.json()["message"]
    assert "RATE_LIMIT" in message and "40 per 60 s" in message
    assert "Retry-After" not in refused.headers  # waiting would not help


@pytest.fixture
def strict(stack_env: dict[str, str], logs: Path) -> Iterator[Api]:
    env = {
        **stack_env,
        "AUTH_DISABLED": "",
        "API_TOKENS": TOKENS,
        "AUTH_FAILURE_LIMIT": "5 per minute",
        # A Redis database of its own: the failed logins other tests sent from
        # this address in the last minute are counted in the session's.
        "REDIS_URL": stack_env["REDIS_URL"].rsplit("/", 1)[0] + "/7",
    }
    server = Api(env, logs / "auth-strict-api.log", workers=1).start()
    yield server
    server.stop()


def test_failed_authentication_is_limited_per_address_but_never_locks_out_a_valid_token(
    strict: Api,
) -> None:
    codes = [
        requests.get(f"{strict.url}/stats", headers=bearer(f"guess-{n}"), timeout=10).status_code
        for n in range(7)
    ]
    assert codes[:5] == [401] * 5
    assert codes[5:] == [429, 429]
    wrong = requests.get(f"{strict.url}/stats", headers=bearer("guess-8"), timeout=10)
    assert int(wrong.headers["Retry-After"]) >= 1
    # Someone else's guessing from this address (a NAT, a shared proxy) does
    # not lock out the clients with valid tokens behind it.
    right = requests.get(f"{strict.url}/stats", headers=bearer(READER), timeout=10)
    assert right.status_code == 200, right.text


def test_the_api_refuses_to_start_without_tokens(stack_env: dict[str, str], logs: Path) -> None:
    env = {**stack_env, "AUTH_DISABLED": "", "API_TOKENS": ""}
    log = logs / "auth-refused.log"
    with open(log, "wb") as out:
        done = subprocess.run(
            [str(BIN / "gunicorn"), "--bind", "127.0.0.1:0", "--workers", "1", "app:create_app()"],
            env={**os.environ, **env},
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=60,
        )
    assert done.returncode != 0
    assert "no API_TOKENS configured" in log.read_text()


def test_short_tokens_are_refused_at_start(stack_env: dict[str, str], logs: Path) -> None:
    env = {**stack_env, "AUTH_DISABLED": "", "API_TOKENS": "demo-token"}
    done = subprocess.run(
        [str(BIN / "gunicorn"), "--bind", "127.0.0.1:0", "--workers", "1", "app:create_app()"],
        env={**os.environ, **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert "at least 32" in done.stdout + done.stderr


def test_running_open_is_logged_as_a_warning(api: Api) -> None:
    assert "AUTH_DISABLED=1: every endpoint is open" in api.log.read_text()
