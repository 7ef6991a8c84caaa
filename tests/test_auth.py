"""Tokens and rate limits against a real gunicorn configured with both."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from scripts.stack import Api
from scripts.stack import Worker

TOKENS = ("current-token", "next-token")


@pytest.fixture(scope="module")
def guarded(stack_env: dict[str, str], logs: Path) -> Iterator[Api]:
    env = {**stack_env, "API_TOKENS": ",".join(TOKENS), "RATE_LIMIT": "5 per 2 seconds"}
    server = Api(env, logs / "auth-api.log", workers=1).start()
    yield server
    server.stop()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


EVENT = {
    "topic": "auth",
    "event_id": "a-1",
    "timestamp": "2026-01-01T00:00:00Z",
    "source": "tests",
    "payload": {},
}


def test_probes_and_document_need_no_token(guarded: Api) -> None:
    assert requests.get(f"{guarded.url}/health", timeout=10).status_code == 200
    assert requests.get(f"{guarded.url}/openapi.json", timeout=10).status_code == 200


@pytest.mark.parametrize(
    "headers",
    [{}, bearer("wrong"), {"Authorization": "Basic Y3VycmVudC10b2tlbg=="}, bearer("")],
)
def test_publishing_and_reading_need_a_valid_token(guarded: Api, headers: dict[str, str]) -> None:
    for method, path in (("post", "/publish"), ("get", "/events"), ("get", "/stats")):
        response = requests.request(
            method, f"{guarded.url}{path}", json=EVENT, headers=headers, timeout=10
        )
        assert response.status_code == 401, (path, response.text)
        assert response.json()["code"] == 401
        assert response.headers["WWW-Authenticate"].lower().startswith("bearer")


def test_every_configured_token_works_so_they_can_be_rotated(
    guarded: Api, worker: Worker, clean: None
) -> None:
    for token in TOKENS:
        response = requests.post(
            f"{guarded.url}/publish", json=EVENT, headers=bearer(token), timeout=10
        )
        assert response.status_code == 202, response.text


def test_each_token_is_rate_limited_with_retry_after(guarded: Api) -> None:
    codes = [
        requests.get(f"{guarded.url}/events", headers=bearer("next-token"), timeout=10)
        for _ in range(8)
    ]
    limited = [r for r in codes if r.status_code == 429]
    assert limited, [r.status_code for r in codes]
    assert int(limited[0].headers["Retry-After"]) >= 1
    assert limited[0].json()["code"] == 429
    # Another token has its own budget (it has spent at most one request of it).
    other = requests.get(f"{guarded.url}/events", headers=bearer("current-token"), timeout=10)
    assert other.status_code == 200
