"""Fuzzing the HTTP API from its own OpenAPI document, and hostile bodies.

schemathesis generates valid and invalid requests for every documented
operation; every answer must be documented and never a 5xx. The run is bounded
so CI stays fast; FUZZ_EXAMPLES raises the number of cases per operation.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck
from hypothesis import settings
from schemathesis.core.parameters import ParameterLocation
from schemathesis.generation import GenerationMode

from app import create_app
from app.config import Settings
from scripts.stack import Api
from scripts.stack import Worker

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "60"))


def _document() -> dict[str, Any]:
    # The same document GET /openapi.json serves (test_api checks that one);
    # building the app opens no connection.
    document = create_app(Settings(auth_disabled=True)).test_client().get("/openapi.json")
    spec: dict[str, Any] = document.get_json()
    # Long polls (wait up to 30 s each) would make the run minutes long; they
    # are tested in test_reading.py, and left out here.
    operation = spec["paths"]["/events"]["get"]
    operation["parameters"] = [p for p in operation["parameters"] if p["name"] != "wait"]
    return spec


@schemathesis.serializer("application/x-ndjson")
def _ndjson(context: Any, value: Any) -> bytes:
    # /publish documents NDJSON as a string (one event per line): sent as its text; a
    # negative case's other values as one JSON line each.
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8", "surrogatepass")
    values = value if isinstance(value, list) else [value]
    return b"".join(json.dumps(item).encode() + b"\n" for item in values)


schema = schemathesis.openapi.from_dict(_document())


TOKEN = "fuzz-" + secrets.token_hex(20)


@pytest.fixture(scope="module")
def closed_api(stack_env: dict[str, str], logs: Path) -> Iterator[Api]:
    """The API as deployed: closed, one token with every scope (schemathesis also
    checks that requests with made-up credentials are refused)."""
    env = {
        **stack_env,
        "AUTH_DISABLED": "",
        "API_TOKENS": f"{TOKEN}:publish+read+admin",
        "AUTH_FAILURE_LIMIT": "1000000 per minute",
    }
    server = Api(env, logs / "fuzz-api.log").start()
    yield server
    server.stop()


def credentials(case: schemathesis.Case) -> dict[str, str]:
    """The real token, unless the case breaks its headers on purpose.

    A negative case may drop or mangle the Authorization header as its one
    invalid part; adding the token back would make it a valid request that
    schemathesis then expects to be refused. Sent as generated, it gets a 401.
    """
    headers = case.meta.components.get(ParameterLocation.HEADER) if case.meta else None
    if headers is not None and headers.mode == GenerationMode.NEGATIVE:
        return {}
    return {"Authorization": f"Bearer {TOKEN}"}


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_api_conforms_to_its_document(
    case: schemathesis.Case, closed_api: Api, worker: Worker
) -> None:
    # A document cannot say "no NUL anywhere inside payload" or bound its depth
    # and size, so a schema-valid payload may still get a (documented) 422.
    case.call_and_validate(
        base_url=closed_api.url,
        headers=credentials(case),
        timeout=30,
        excluded_checks=[schemathesis.checks.positive_data_acceptance],
    )


@pytest.fixture
def url(api: Api, worker: Worker) -> str:
    return api.url


def post_raw(url: str, body: bytes, content_type: str = "application/json") -> requests.Response:
    return requests.post(
        f"{url}/publish", data=body, headers={"Content-Type": content_type}, timeout=60
    )


def still_serving(url: str) -> None:
    assert requests.get(f"{url}/health", timeout=10).status_code == 200


def test_hundred_megabyte_body_is_refused_unread(url: str) -> None:
    # Content-Length alone decides: the server answers before the body arrives.
    with socket.create_connection(url.removeprefix("http://").split(":")) as sock:  # type: ignore[arg-type]
        sock.sendall(
            b"POST /publish HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 104857600\r\n\r\n["
        )
        sock.settimeout(10)
        answer = sock.recv(4096)
    assert answer.startswith(b"HTTP/1.1 413")
    still_serving(url)


def test_a_body_of_a_million_values_is_refused_before_it_is_parsed(url: str) -> None:
    # 1,000,000 values in 2,000,001 bytes: under MAX_BODY_BYTES (2 MiB), over the count.
    response = post_raw(url, b"[" + b",".join([b"0"] * 1_000_000) + b"]")
    assert response.status_code == 413
    assert "at most 100000" in response.json()["message"]
    still_serving(url)


def test_an_array_over_the_batch_limit_is_refused(url: str) -> None:
    response = post_raw(url, b"[" + b",".join([b"{}"] * 1001) + b"]")
    assert response.status_code == 422
    assert "1 to 1000" in response.json()["errors"]["_schema"][0]


def test_ten_thousand_levels_of_nesting_are_refused(url: str) -> None:
    payload = b"[" * 10_000 + b"]" * 10_000
    body = b'{"topic":"t","event_id":"e","timestamp":"2026-01-01T00:00:00Z","source":"s","payload":'
    response = post_raw(url, body + payload + b"}")
    assert response.status_code == 400
    assert "JSON" in response.json()["message"]
    still_serving(url)


@pytest.mark.parametrize(
    "body",
    [b"\xff\xfe{}", b'{"topic": "\xc3\x28"}', b'{"topic": "\\ud800"}', b"\x00"],
)
def test_invalid_utf8_and_lone_surrogates_are_400(url: str, body: bytes) -> None:
    response = post_raw(url, body)
    assert response.status_code == 400, response.text
    still_serving(url)


def test_huge_string_is_refused(url: str) -> None:
    event = {
        "topic": "t" * 1_000_000,
        "event_id": "e",
        "timestamp": "2026-01-01T00:00:00Z",
        "source": "s",
        "payload": {},
    }
    response = requests.post(f"{url}/publish", json=event, timeout=60)
    assert response.status_code == 422
    assert list(response.json()["errors"]) == ["topic"]


@pytest.mark.parametrize(
    "content_type",
    ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data", "application/xml"],
)
def test_wrong_content_types_are_415(url: str, content_type: str) -> None:
    assert post_raw(url, b"{}", content_type).status_code == 415
