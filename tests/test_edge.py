"""Unit tests of the HTTP edge's pure logic (no services): token rules, trusted proxies,
bounded error lists, cheap refusals before the schema, and the workers' fast twin of the schema."""

from __future__ import annotations

import base64
import random
import re
import secrets
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from marshmallow import ValidationError

from app import create_app
from app.config import PLACEHOLDER_WORDS
from app.config import Settings
from app.config import SettingsError
from app.config import load_settings
from app.config import weak_token_reason
from app.proxies import TrustedProxyFix
from app.schemas import EVENT_FIELDS
from app.schemas import MAX_LISTED_PROBLEMS
from app.schemas import MAX_STRING
from app.schemas import _plainly_valid
from app.schemas import load_events
from app.schemas import queued_problems
from tests.helpers import fixed_hex


def event(**overrides: Any) -> dict[str, Any]:
    body = {
        "topic": "t",
        "event_id": "1",
        "timestamp": "2026-01-01T00:00:00+00:00",
        "source": "s",
        "payload": {"a": [1, {"b": None}]},
    }
    body.update(overrides)
    return body


@pytest.mark.parametrize(
    ("token", "complaint"),
    [
        ("replace-with-openssl-rand-hex-32", "contains 'replace'"),
        ("change-me-change-me-change-me-now", "contains 'change'"),
        (f"EXAMPLE-{fixed_hex('example', 32)}", "contains 'example'"),
        (f"{fixed_hex('placeholder', 24)}-placeholder", "contains 'placeholder'"),
        ("t" * 32, "only 1 different characters"),
        ("abcdefghijkl" * 3, "repeats 'abcdefgh'"),
        ("Kx7Qm2Vp9Lw4-0123456789-0123456789", "repeats '-0123456'"),
    ],
)
def test_placeholders_and_guessable_tokens_are_refused_at_start(token: str, complaint: str) -> None:
    with pytest.raises(SettingsError, match=re.escape(complaint)) as refused:
        load_settings({"API_TOKENS": f"{secrets.token_hex(32)},{token}:admin"})
    assert "entry 2" in str(refused.value)
    assert "openssl rand -hex 32" in str(refused.value)  # says how to make a good one


def test_random_tokens_pass() -> None:
    # Seeded, so the run is repeatable: of 100,000 url-safe tokens a few hold
    # "todo", "your" and the like inside their letters, as random tokens do.
    chance = random.Random(20261205)
    urlsafe = [
        base64.urlsafe_b64encode(chance.randbytes(32)).decode().rstrip("=") for _ in range(100_000)
    ]
    with_words = [t for t in urlsafe if any(word in t.lower() for word in PLACEHOLDER_WORDS)]
    assert with_words
    for token in [*with_words, *urlsafe[:200], *(secrets.token_hex(32) for _ in range(200))]:
        assert load_settings({"API_TOKENS": token}).api_tokens[0].secret == token


def test_placeholder_words_count_where_placeholders_put_them() -> None:
    assert weak_token_reason("k3Xtodo9Qm2Vp9Lw4Rz8Tn5Yb1Hc6Jd0F") is None
    assert (
        weak_token_reason("todo-k3X9Qm2Vp9Lw4Rz8Tn5Yb1Hc6Jd0F")
        == "contains 'todo', as placeholders do"
    )
    assert (
        weak_token_reason("k3X9Qm2Vp9Lw4Rz8Tn5Yb1Hc6Jd0F_YOUR")
        == "contains 'your', as placeholders do"
    )


def test_proxy_hops_need_the_proxies_named() -> None:
    with pytest.raises(SettingsError, match="TRUSTED_PROXIES"):
        load_settings({"PROXY_HOPS": "1"})
    with pytest.raises(SettingsError, match="not an address or network"):
        load_settings({"PROXY_HOPS": "1", "TRUSTED_PROXIES": "proxy"})
    settings = load_settings({"PROXY_HOPS": "1", "TRUSTED_PROXIES": "10.0.0.5, 172.18.0.0/16"})
    assert [str(n) for n in settings.trusted_proxies] == ["10.0.0.5/32", "172.18.0.0/16"]


def client_address(peer: str, forwarded: str) -> str:
    settings = load_settings({"PROXY_HOPS": "1", "TRUSTED_PROXIES": "10.0.0.0/24"})
    seen: dict[str, str] = {}

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        seen["address"] = environ["REMOTE_ADDR"]
        return []

    middleware = TrustedProxyFix(app, settings.proxy_hops, settings.trusted_proxies)
    middleware({"REMOTE_ADDR": peer, "HTTP_X_FORWARDED_FOR": forwarded}, lambda *a: None)
    return seen["address"]


def test_x_forwarded_for_is_believed_only_from_a_trusted_proxy() -> None:
    assert client_address("10.0.0.7", "203.0.113.9") == "203.0.113.9"
    assert client_address("127.0.0.1", "203.0.113.9") == "127.0.0.1"  # around the proxy
    assert client_address("10.0.1.7", "203.0.113.9") == "10.0.1.7"


def test_an_error_answer_lists_the_first_problems_and_counts_the_rest() -> None:
    app = create_app(Settings(auth_disabled=True, rate_limit=""))
    with app.test_request_context():
        from app.errors import handle_validation_error

        messages = {index: {"topic": ["bad"], "source": ["bad"]} for index in range(1000)}
        answer = handle_validation_error(ValidationError(messages))
    body = answer.get_json()
    listed = sum(len(fields) for fields in body["errors"].values())
    assert listed == MAX_LISTED_PROBLEMS
    assert (
        body["message"] == f"invalid input: 2000 problems, the first {MAX_LISTED_PROBLEMS} listed"
    )
    assert len(answer.get_data()) < 2000


def test_unknown_fields_are_refused_before_the_schema_runs_naming_a_few() -> None:
    many = event() | {f"k{n}": 1 for n in range(100_000)}
    with pytest.raises(ValidationError) as refused:
        load_events(many)
    messages = refused.value.messages
    assert isinstance(messages, dict)
    assert len(messages) == MAX_LISTED_PROBLEMS + 1
    assert messages["k0"] == ["Unknown field."]
    assert messages["_schema"] == [f"100000 unknown fields, {MAX_LISTED_PROBLEMS} named"]
    with pytest.raises(ValidationError) as refused:
        load_events([event(), event(colour="red")])
    assert refused.value.messages == {1: {"colour": ["Unknown field."]}}


def test_the_fast_twin_passes_what_the_api_queues() -> None:
    queued = load_events([event(payload={"n": n, "deep": [[[n]]]}) for n in range(50)])
    assert all(_plainly_valid(item) for item in queued)
    assert queued_problems(queued, 100) == {}


@pytest.mark.parametrize(
    "bad",
    [
        event(topic="x" * (MAX_STRING + 1)),
        event(topic=""),
        event(source="a\x00b"),
        event(event_id=7),
        event(timestamp="2026-01-01T00:00:00"),  # no offset
        event(timestamp="yesterday"),
        event(payload=[]),
        event(payload={"k": "\x00"}),
        event(payload={"x": "y" * 70_000}),
        event(extra=1),
        {key: value for key, value in event().items() if key != "payload"},
        "not an event",
    ],
)
def test_the_workers_second_layer_refuses_what_the_api_would(bad: Any) -> None:
    assert not _plainly_valid(bad)
    problems = queued_problems([event(), bad], 10)
    assert set(problems) == {1}
    assert queued_problems(bad, 10) == {"_schema": ["a task holds a list of 1 to 10 events"]}


def test_a_task_of_too_many_events_is_refused() -> None:
    assert "_schema" in queued_problems([event()] * 11, 10)


_text = st.one_of(st.text(max_size=300), st.integers(), st.none())
_stamp = st.one_of(
    st.datetimes(timezones=st.timezones()).map(lambda moment: moment.isoformat()),
    st.datetimes().map(lambda moment: moment.isoformat()),
    st.text(max_size=30),
)
_json = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text()),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=40,
)


@settings(max_examples=300, deadline=None)
@given(
    topic=_text,
    event_id=_text,
    stamp=_stamp,
    source=_text,
    payload=st.one_of(st.dictionaries(st.text(), _json, max_size=5), _json),
    drop=st.sampled_from([None, *sorted(EVENT_FIELDS)]),
)
def test_the_fast_twin_never_passes_what_the_schema_refuses(
    topic: Any, event_id: Any, stamp: Any, source: Any, payload: Any, drop: str | None
) -> None:
    candidate = {
        "topic": topic,
        "event_id": event_id,
        "timestamp": stamp,
        "source": source,
        "payload": payload,
    }
    if drop:
        del candidate[drop]
    if _plainly_valid(candidate):
        load_events(candidate)  # raises if the schema disagrees


def test_the_worker_says_why_it_refuses_a_task() -> None:
    from tasks.ingest import refusal

    assert refusal("b-1", [event()]) is None
    reason = refusal("b-1", [event(), event(topic="x" * 1000)])
    assert reason is not None and '"1":{"topic":["Length must be between 1 and 255."]}' in reason
    assert refusal(7, [event()]) == "batch id must be 1 to 200 characters"


def test_the_proxy_takes_the_bodies_the_api_takes() -> None:
    template = (Path(__file__).parents[1] / "deploy/nginx/aggregator.conf.template").read_text()
    found = re.search(r"client_max_body_size (\d+)m;", template)
    assert found, "the proxy's template sets no client_max_body_size in MiB"
    assert int(found.group(1)) * 1024 * 1024 == Settings().max_body_bytes


def test_every_error_speaks_in_our_words_and_docs_show_each_code() -> None:
    app = create_app(Settings(auth_disabled=True, rate_limit=""))
    client = app.test_client()
    missing = client.get("/nowhere").get_json()
    assert missing["message"] == "no such endpoint: GET /nowhere (the API is described at /docs)"
    wrong = client.delete("/publish").get_json()
    assert wrong["code"] == 405 and wrong["message"].startswith("DELETE is not allowed on /publish")
    assert "POST" in wrong["message"]
    spec = client.get("/openapi.json").get_json()
    examples = {
        code: answer["content"]["application/json"]["example"]
        for path in spec["paths"].values()
        for operation in path.values()
        if isinstance(operation, dict)
        for code, answer in operation.get("responses", {}).items()
        if answer.get("content", {})
        .get("application/json", {})
        .get("schema", {})
        .get("$ref", "")
        .endswith("/ErrorBody")
    }
    assert examples and all(int(code) == body["code"] for code, body in examples.items())
