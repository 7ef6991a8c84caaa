"""Unit tests of request validation (pure logic, no services)."""

from __future__ import annotations

import re
import secrets
from datetime import datetime
from datetime import timedelta
from datetime import timezone
from decimal import Decimal
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st
from marshmallow import ValidationError

from app.config import ServerSettings
from app.config import SettingsError
from app.config import load_server_settings
from app.config import load_settings
from app.config import metrics_directory
from app.schemas import MAX_PAYLOAD_BYTES
from app.schemas import inexact_numbers
from app.schemas import load_events
from app.schemas import refuse_inexact_numbers
from tests.helpers import fixed_hex


def event(**overrides: Any) -> dict[str, Any]:
    body = {
        "topic": "t",
        "event_id": "1",
        "timestamp": "2026-01-01T00:00:00Z",
        "source": "s",
        "payload": {"a": [1, {"b": None}]},
    }
    body.update(overrides)
    return body


def errors_of(body: Any) -> dict[Any, Any]:
    with pytest.raises(ValidationError) as caught:
        load_events(body)
    return caught.value.messages  # type: ignore[return-value]


def test_single_event_is_normalised() -> None:
    [loaded] = load_events(event(timestamp="2026-01-01T01:00:00+01:00"))
    assert loaded["timestamp"] == "2026-01-01T00:00:00+00:00"
    assert loaded["payload"] == {"a": [1, {"b": None}]}


def test_offsets_postgresql_cannot_store_are_converted_to_utc() -> None:
    [loaded] = load_events(event(timestamp="2026-01-01T00:00:00-17:35"))
    assert loaded["timestamp"] == "2026-01-01T17:35:00+00:00"


def test_timestamps_that_leave_the_calendar_in_utc_are_refused() -> None:
    assert "timestamp" in errors_of(event(timestamp="0001-01-01T00:00:00+05:00"))


def test_batch_errors_are_keyed_by_index() -> None:
    assert set(errors_of([event(), event(topic=""), event(source=None)])) == {1, 2}


def test_payload_size_is_bounded() -> None:
    assert "payload" in errors_of(event(payload={"x": "y" * MAX_PAYLOAD_BYTES}))


def test_nul_inside_a_list_in_the_payload_is_found() -> None:
    assert "payload" in errors_of(event(payload={"list": ["ok", ["\x00"]]}))


@pytest.mark.parametrize("timestamp", ["2026-01-01", "2026-01-01T00:00:00", "soon", 1700000000])
def test_timestamps_need_a_date_time_with_offset(timestamp: Any) -> None:
    assert "timestamp" in errors_of(event(timestamp=timestamp))


def test_settings_come_from_the_environment() -> None:
    a, b = secrets.token_hex(16), secrets.token_hex(20)
    settings = load_settings(
        {"DATABASE_URL": "postgresql://u@h/db", "API_TOKENS": f"{a}, {b}:admin", "RETRY_AFTER": "5"}
    )
    assert settings.database_url == "postgresql+psycopg2://u@h/db"
    assert [(t.secret, sorted(t.scopes)) for t in settings.api_tokens] == [
        (a, ["publish", "read"]),
        (b, ["admin"]),
    ]
    assert settings.retry_after == 5
    assert not settings.auth_disabled


GOOD = fixed_hex("good", 32)
OTHER = fixed_hex("other", 32)


@pytest.mark.parametrize(
    ("raw", "complaint"),
    [
        (",", "entry 1 is blank"),
        (f"{GOOD},", "entry 2 is blank"),
        (f"{GOOD}, ,{OTHER}", "entry 2 is blank"),
        ("short-token", "at least 32"),
        (GOOD[:31], "at least 32"),
        (f"{GOOD}:publish+root", "unknown scope(s) root"),
        (f"{GOOD}:", "unknown scope(s) "),
        (f"{GOOD[:30]} é", "printable ASCII"),
        (f"{GOOD},{GOOD}:admin", "repeats an earlier token"),
    ],
)
def test_bad_token_lists_are_refused_naming_the_entry(raw: str, complaint: str) -> None:
    with pytest.raises(SettingsError, match=re.escape(complaint)):
        load_settings({"API_TOKENS": raw})


def test_task_time_limits_default_to_a_hard_limit_above_the_soft_one() -> None:
    settings = load_settings({})
    assert (settings.task_soft_time_limit, settings.task_time_limit) == (120, 150)
    tuned = load_settings({"TASK_SOFT_TIME_LIMIT": "10", "TASK_TIME_LIMIT": "20"})
    assert (tuned.task_soft_time_limit, tuned.task_time_limit) == (10, 20)


@pytest.mark.parametrize(("soft", "hard"), [("30", "30"), ("60", "30"), ("0", "30")])
def test_task_time_limits_that_leave_no_soft_limit_are_refused(soft: str, hard: str) -> None:
    with pytest.raises(SettingsError, match="TASK_"):
        load_settings({"TASK_SOFT_TIME_LIMIT": soft, "TASK_TIME_LIMIT": hard})


def test_auth_disabled_is_an_explicit_flag() -> None:
    assert load_settings({"AUTH_DISABLED": "1"}).auth_disabled
    with pytest.raises(SettingsError):
        load_settings({"AUTH_DISABLED": "maybe"})


@pytest.mark.parametrize(
    "environ",
    [{"RETRY_AFTER": "soon"}, {"BROKER_TIMEOUT": "-1"}, {"DATABASE_URL": "mysql://x"}],
)
def test_malformed_settings_fail_loudly(environ: dict[str, str]) -> None:
    with pytest.raises(SettingsError):
        load_settings(environ)


# Property tests: any event inside the documented limits is accepted unchanged
# (timestamps as the same instant in UTC), and a NUL anywhere is always refused.
texts = st.text(min_size=1, max_size=255).filter(lambda s: "\x00" not in s)
json_leaves = st.none() | st.booleans() | st.integers(-(2**53), 2**53) | texts
payloads = st.dictionaries(
    texts,
    st.recursive(json_leaves, lambda inner: st.lists(inner, max_size=4), max_leaves=10),
    max_size=5,
)
moments = st.datetimes(
    min_value=datetime(1000, 1, 1),
    max_value=datetime(9000, 1, 1),
    # ISO 8601 offsets are whole minutes.
    timezones=st.integers(-23 * 60, 23 * 60).map(lambda m: timezone(timedelta(minutes=m))),
)


@given(topic=texts, event_id=texts, source=texts, moment=moments, payload=payloads)
def test_any_event_within_limits_is_accepted(
    topic: str, event_id: str, source: str, moment: datetime, payload: dict[str, Any]
) -> None:
    body = event(topic=topic, event_id=event_id, source=source, payload=payload)
    body["timestamp"] = moment.isoformat()
    [loaded] = load_events(body)
    assert (loaded["topic"], loaded["event_id"], loaded["source"]) == (topic, event_id, source)
    assert loaded["payload"] == payload
    stored = datetime.fromisoformat(loaded["timestamp"])
    assert stored == moment
    assert stored.utcoffset() == timedelta(0)


@given(
    field=st.sampled_from(["topic", "event_id", "source", "payload"]),
    prefix=st.text(max_size=5),
    suffix=st.text(max_size=5),
)
def test_nul_anywhere_is_refused(field: str, prefix: str, suffix: str) -> None:
    value = f"{prefix}\x00{suffix}"
    body = event(payload={"nested": [value]}) if field == "payload" else event(**{field: value})
    assert field in errors_of(body)


def test_gunicorn_options_come_from_the_environment_with_the_documented_defaults() -> None:
    assert load_server_settings({}) == ServerSettings(
        bind="127.0.0.1:8080",
        workers=2,
        worker_class="gevent",
        worker_connections=1000,
        threads=16,
        access_log="-",
    )
    given = load_server_settings(
        {
            "GUNICORN_BIND": "0.0.0.0:9000",
            "WEB_CONCURRENCY": "4",
            "GUNICORN_WORKER_CLASS": "gthread",
            "GUNICORN_THREADS": "8",
            "GUNICORN_ACCESS_LOG": "",
        }
    )
    assert (given.bind, given.workers, given.worker_class) == ("0.0.0.0:9000", 4, "gthread")
    assert (given.threads, given.access_log) == (8, None)
    with pytest.raises(SettingsError, match="WEB_CONCURRENCY"):
        load_server_settings({"WEB_CONCURRENCY": "many"})
    assert metrics_directory({}) is None
    assert metrics_directory({"PROMETHEUS_MULTIPROC_DIR": "/tmp/m"}) == "/tmp/m"


# --- numbers: stored exactly, or refused naming them -------------------------------------------

number_texts = st.builds(
    lambda sign, whole, fraction, exponent: f"{sign}{whole}{fraction}{exponent}",
    st.sampled_from(["", "-"]),
    st.one_of(st.just("0"), st.from_regex(r"[1-9][0-9]{0,30}", fullmatch=True)),
    st.one_of(st.just(""), st.from_regex(r"\.[0-9]{1,30}", fullmatch=True)),
    st.one_of(
        st.just(""),
        st.builds(lambda e, n: f"{e}{n:+d}", st.sampled_from(["e", "E"]), st.integers(-400, 400)),
    ),
)


def orjson_keeps(text: str) -> bool:
    """What actually happens: orjson's reading, written back as the worker writes it."""
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        return False  # Beyond a double's range.
    return Decimal(orjson.dumps(value).decode()) == Decimal(text)


@given(text=number_texts)
def test_the_exact_check_agrees_with_what_orjson_does_to_a_number(text: str) -> None:
    problems = inexact_numbers(f'{{"payload":{{"n":{text}}}}}'.encode())
    assert (problems == []) == orjson_keeps(text), (text, problems)


@given(value=st.floats(allow_nan=False, allow_infinity=False))
def test_every_double_as_json_writes_it_is_kept(value: float) -> None:
    assert inexact_numbers(orjson.dumps({"payload": {"n": value}})) == []


@pytest.mark.parametrize(
    ("body", "errors"),
    [
        (b'{"payload":{"a":{"b":[1,18446744073709551616]}}}', ["payload.a.b[1]"]),
        (b'[{"payload":{}},{"payload":{"x":0.1000000000000000055511151231257827}}]', [1]),
    ],
)
def test_numbers_that_would_change_are_refused_naming_them(body: bytes, errors: list[Any]) -> None:
    with pytest.raises(ValidationError) as refused:
        refuse_inexact_numbers(body)
    assert list(refused.value.messages) == errors
