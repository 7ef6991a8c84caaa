"""Unit tests of request validation (pure logic, no services)."""

from __future__ import annotations

from typing import Any

import pytest
from marshmallow import ValidationError

from app.config import SettingsError
from app.config import load_settings
from app.schemas import MAX_PAYLOAD_BYTES
from app.schemas import load_events


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
    assert loaded["timestamp"] == "2026-01-01T01:00:00+01:00"
    assert loaded["payload"] == {"a": [1, {"b": None}]}


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
    settings = load_settings(
        {"DATABASE_URL": "postgresql://u@h/db", "API_TOKENS": "a, b,", "RETRY_AFTER": "5"}
    )
    assert settings.database_url == "postgresql+psycopg2://u@h/db"
    assert settings.api_tokens == ("a", "b")
    assert settings.retry_after == 5


@pytest.mark.parametrize(
    "environ",
    [{"RETRY_AFTER": "soon"}, {"BROKER_TIMEOUT": "-1"}, {"DATABASE_URL": "mysql://x"}],
)
def test_malformed_settings_fail_loudly(environ: dict[str, str]) -> None:
    with pytest.raises(SettingsError):
        load_settings(environ)
