"""The HTTP boundary against a real gunicorn: every answer is JSON, bad input is named."""

from __future__ import annotations

import re
import socket
import time

import orjson
import pytest
import redis
import requests

from scripts.services import RedisServer
from scripts.stack import Api
from scripts.stack import Worker


def event(event_id: str = "e-1", **overrides: object) -> dict[str, object]:
    body: dict[str, object] = {
        "topic": "orders",
        "event_id": event_id,
        "timestamp": "2026-01-01T12:00:00+01:00",
        "source": "tests",
        "payload": {"amount": 3},
    }
    body.update(overrides)
    return body


@pytest.fixture
def url(api: Api, worker: Worker, clean: None) -> str:
    return api.url


def post(url: str, body: object, **kwargs: object) -> requests.Response:
    return requests.post(f"{url}/publish", json=body, timeout=10, **kwargs)


def assert_error(response: requests.Response, code: int) -> dict[str, object]:
    assert response.status_code == code, response.text
    assert response.headers["Content-Type"] == "application/json"
    body = response.json()
    assert body["code"] == code
    assert body["status"] and body["message"]
    assert "Traceback" not in response.text
    return body


def test_single_event_is_accepted(url: str) -> None:
    response = post(url, event())
    assert response.status_code == 202
    body = response.json()
    assert body["accepted"] == 1
    # Without an Idempotency-Key the server makes one up and says so.
    assert re.fullmatch(r"[0-9a-f]{32}", body["batch_id"])
    assert re.fullmatch(r"[0-9a-f]{32}", body["idempotency_key"])
    assert response.headers["Idempotency-Key"] == body["idempotency_key"]


def test_batch_is_accepted_on_both_paths(url: str) -> None:
    batch = [event(f"e-{i}") for i in range(3)]
    assert post(url, batch).json()["accepted"] == 3
    response = requests.post(f"{url}/publish/batch", json=batch, timeout=10)
    assert response.status_code == 202
    assert response.json()["accepted"] == 3


def test_malformed_json_is_400(url: str) -> None:
    response = requests.post(
        f"{url}/publish", data=b'{"topic": ', headers={"Content-Type": "application/json"}
    )
    body = assert_error(response, 400)
    assert "malformed JSON" in body["message"]


def test_invalid_utf8_is_400(url: str) -> None:
    response = requests.post(
        f"{url}/publish", data=b'{"topic": "\xff"}', headers={"Content-Type": "application/json"}
    )
    assert_error(response, 400)


def test_wrong_content_type_is_415(url: str) -> None:
    response = requests.post(
        f"{url}/publish", data=orjson.dumps(event()), headers={"Content-Type": "text/plain"}
    )
    assert_error(response, 415)


def test_body_too_large_is_413(url: str) -> None:
    big = b'{"payload": "' + b"x" * (9 * 1024 * 1024) + b'"}'
    response = requests.post(
        f"{url}/publish", data=big, headers={"Content-Type": "application/json"}, timeout=30
    )
    assert_error(response, 413)


def test_missing_and_wrong_fields_are_named(url: str) -> None:
    body = assert_error(post(url, {"topic": 5, "event_id": "x"}), 422)
    errors = body["errors"]
    assert errors["topic"] == ["Not a valid string."]
    assert set(errors) == {"topic", "timestamp", "source", "payload"}


def test_unknown_field_is_rejected(url: str) -> None:
    body = assert_error(post(url, event(colour="red")), 422)
    assert body["errors"] == {"colour": ["Unknown field."]}


def test_timestamp_without_offset_is_rejected(url: str) -> None:
    body = assert_error(post(url, event(timestamp="2026-01-01T12:00:00")), 422)
    assert list(body["errors"]) == ["timestamp"]


def test_payload_must_be_an_object(url: str) -> None:
    body = assert_error(post(url, event(payload=[1, 2])), 422)
    assert list(body["errors"]) == ["payload"]


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"topic": "a\x00b"}, "topic"),
        ({"event_id": "\x00"}, "event_id"),
        ({"source": "s\x00"}, "source"),
        ({"payload": {"deep": {"text": "a\x00"}}}, "payload"),
        ({"payload": {"k\x00": 1}}, "payload"),
    ],
)
def test_nul_characters_are_rejected_before_the_queue(
    url: str, overrides: dict[str, object], field: str
) -> None:
    body = assert_error(post(url, event(**overrides)), 422)
    assert field in body["errors"]
    assert "NUL" in body["errors"][field][0]


def test_too_long_strings_are_rejected(url: str) -> None:
    body = assert_error(post(url, event(topic="t" * 256)), 422)
    assert list(body["errors"]) == ["topic"]


def test_deep_payload_is_rejected(url: str) -> None:
    payload: dict[str, object] = {}
    for _ in range(40):
        payload = {"n": payload}
    body = assert_error(post(url, event(payload=payload)), 422)
    assert "nested" in body["errors"]["payload"][0]


def test_batch_errors_are_named_per_index_and_nothing_is_accepted(url: str) -> None:
    batch = [event("ok-1"), event("bad", timestamp="yesterday"), event("ok-2")]
    body = assert_error(post(url, batch), 422)
    assert list(body["errors"]) == ["1"]
    assert list(body["errors"]["1"]) == ["timestamp"]
    stats = requests.get(f"{url}/stats", timeout=10).json()
    assert stats["total_received_queued"] == 0


@pytest.mark.parametrize("size", [0, 1001])
def test_batch_size_is_bounded(url: str, size: int) -> None:
    body = assert_error(post(url, [event(f"e-{i}") for i in range(size)]), 422)
    assert "1 to 1000" in body["errors"]["_schema"][0]


def test_scalar_body_is_rejected(url: str) -> None:
    body = assert_error(post(url, 42), 422)
    assert "_schema" in body["errors"]


def test_unknown_route_and_method_are_json(url: str) -> None:
    assert_error(requests.get(f"{url}/nope", timeout=10), 404)
    assert_error(requests.get(f"{url}/publish", timeout=10), 405)


def test_events_query_is_validated(url: str) -> None:
    body = assert_error(requests.get(f"{url}/events", params={"limit": 5000}, timeout=10), 422)
    assert "limit" in body["errors"]
    body = assert_error(requests.get(f"{url}/events", params={"cursor": "zz"}, timeout=10), 422)
    assert "cursor" in body["errors"]
    body = assert_error(requests.get(f"{url}/events", params={"since": "today"}, timeout=10), 422)
    assert "since" in body["errors"]


def test_health_and_ready(url: str) -> None:
    assert requests.get(f"{url}/health", timeout=10).json() == {"status": "ok"}
    ready = requests.get(f"{url}/ready", timeout=10)
    assert ready.status_code == 200
    # The session's Redis runs as production does: AOF, fsync before every answer.
    assert ready.json()["checks"] == {
        "database": "ok",
        "broker": "ok",
        "broker_data_loss": "none",
        "broker_persistence": "always",
        "broker_eviction": "noeviction",
    }


def test_ready_refuses_a_redis_that_may_evict_any_key(url: str, redis_server: RedisServer) -> None:
    with redis.Redis.from_url(redis_server.url) as client:
        client.config_set("maxmemory-policy", "allkeys-lru")
        try:
            ready = requests.get(f"{url}/ready", timeout=10)
        finally:
            client.config_set("maxmemory-policy", "noeviction")
    assert ready.status_code == 503 and ready.headers["Retry-After"]
    assert "allkeys-lru" in ready.json()["checks"]["broker_eviction"]


def test_openapi_document_describes_the_api(url: str) -> None:
    spec = requests.get(f"{url}/openapi.json", timeout=10).json()
    assert spec["openapi"].startswith("3.")
    assert {"/publish", "/publish/batch", "/events", "/stats", "/health", "/ready"} <= set(
        spec["paths"]
    )
    publish = spec["paths"]["/publish"]["post"]
    assert {"202", "400", "413", "415", "422", "503"} <= set(publish["responses"])
    assert "Event" in spec["components"]["schemas"]


def test_slow_client_does_not_block_others(url: str) -> None:
    # A client that sends half a request and stalls holds one thread at most.
    host, port = url.removeprefix("http://").split(":")
    stalled = []
    for _ in range(4):
        sock = socket.create_connection((host, int(port)))
        sock.sendall(b"POST /publish HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        stalled.append(sock)
    try:
        # The request's own timeout fails the test if the server stopped serving.
        assert post(url, event("fast")).status_code == 202
    finally:
        for sock in stalled:
            sock.close()


def test_client_that_stalls_mid_body_is_cut_off(url: str) -> None:
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(
            b"POST /publish HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100\r\n\r\n{"
        )
        # BODY_READ_TIMEOUT is 2 s in tests; the answer must come without more bytes.
        sock.settimeout(20)
        answer = b""
        while b'"code"' not in answer:
            chunk = sock.recv(4096)
            if not chunk:
                break
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 408"), answer
        assert b'"code":408' in answer


def test_client_that_drips_its_body_is_cut_off_at_the_deadline(url: str) -> None:
    # One byte every 0.4 s never stalls a single read for BODY_READ_TIMEOUT (2 s in
    # tests), but the whole body has that long.
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(
            b"POST /publish HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100\r\n\r\n{"
        )
        sock.settimeout(0.4)
        started = time.monotonic()
        answer = b""
        while b'"code"' not in answer and time.monotonic() - started < 20:
            try:
                chunk = sock.recv(4096)
            except TimeoutError:
                sock.sendall(b" ")  # the next byte, just in time for a per-read timeout
                continue
            if not chunk:
                break
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 408"), answer
        assert time.monotonic() - started < 5


def test_interactive_docs_are_served_from_local_assets_without_a_token(url: str) -> None:
    page = requests.get(f"{url}/docs", timeout=10)
    assert page.status_code == 200
    assets = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert assets and all(asset.startswith("/docs/assets/") for asset in assets), assets
    for asset in assets:
        assert requests.get(f"{url}{asset}", timeout=10).status_code == 200, asset
    spec = requests.get(f"{url}/openapi.json", timeout=10).json()
    assert spec["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
    assert spec["security"] == [{"bearerAuth": []}]
    assert spec["paths"]["/health"]["get"]["security"] == []


def test_metrics_carry_the_build_and_the_lag(url: str) -> None:
    text = requests.get(f"{url}/metrics", timeout=10).text
    assert re.search(r'^aggregator_build_info\{version="[^"]+"\} 1\.0$', text, re.M), text
    lag = re.search(r"^aggregator_backlog_age_seconds (\S+)$", text, re.M)
    assert lag is not None and float(lag.group(1)) >= 0


def test_every_operation_has_a_unique_id_and_every_event_field_an_example(url: str) -> None:
    spec = requests.get(f"{url}/openapi.json", timeout=10).json()
    ids = [
        operation["operationId"]
        for operations in spec["paths"].values()
        for operation in operations.values()
        if isinstance(operation, dict)
    ]
    assert (
        len(ids)
        == len(set(ids))
        == sum(1 for ops in spec["paths"].values() for op in ops.values() if isinstance(op, dict))
    )
    event = spec["components"]["schemas"]["Event"]["properties"]
    assert all("example" in field for field in event.values()), event
