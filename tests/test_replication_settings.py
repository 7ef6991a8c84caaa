"""Unit tests of the replicated broker's settings (no services): BROKER_SENTINELS and friends,
what the Celery config makes of them (our transport, Sentinel-aware, no alternate URLs), the
broker's name across failovers, and the TCP options every broker connection gets."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest
from kombu import Connection

from app.config import SettingsError
from app.config import load_settings
from app.redis_client import keepalive_options
from scripts.stack import ROOT
from tasks import broker
from tasks.broker_state import broker_name

SENTINELS = {"BROKER_SENTINELS": "10.0.0.5:26379, 10.0.0.6:26380", "BROKER_SENTINEL_MASTER": "agg"}


def test_one_redis_by_default_and_no_wait() -> None:
    settings = load_settings({})
    assert settings.broker_sentinels == ()
    assert settings.broker_min_replicas == 0


def test_sentinels_make_one_replica_required_by_default() -> None:
    settings = load_settings(SENTINELS)
    assert settings.broker_sentinels == (("10.0.0.5", 26379), ("10.0.0.6", 26380))
    assert settings.broker_sentinel_master == "agg"
    assert settings.broker_min_replicas == 1
    assert settings.broker_wait_timeout_ms == 250
    assert load_settings({**SENTINELS, "BROKER_MIN_REPLICAS": "0"}).broker_min_replicas == 0
    assert load_settings({**SENTINELS, "BROKER_MIN_REPLICAS": "2"}).broker_min_replicas == 2


@pytest.mark.parametrize(
    ("environ", "complaint"),
    [
        ({"BROKER_SENTINELS": "10.0.0.5:26379"}, "go together"),
        ({"BROKER_SENTINEL_MASTER": "agg"}, "go together"),
        ({**SENTINELS, "BROKER_SENTINELS": "10.0.0.5"}, "not host:port"),
        ({**SENTINELS, "BROKER_SENTINELS": "10.0.0.5:http"}, "not host:port"),
        ({**SENTINELS, "BROKER_MIN_REPLICAS": "-1"}, "0 or a positive integer"),
        ({**SENTINELS, "BROKER_WAIT_TIMEOUT": "500"}, "below BROKER_TIMEOUT"),
    ],
)
def test_malformed_replication_settings_are_refused(
    environ: dict[str, str], complaint: str
) -> None:
    with pytest.raises(SettingsError, match=complaint):
        load_settings(environ)


def test_the_sentinel_password_is_not_shown() -> None:
    settings = load_settings({**SENTINELS, "BROKER_SENTINEL_PASSWORD": "s3cr3t-sentinel"})
    assert settings.broker_sentinel_password == "s3cr3t-sentinel"
    assert "s3cr3t" not in repr(settings)


def test_a_broker_found_through_sentinel_keeps_its_name_across_failovers() -> None:
    assert broker_name("redis://:pw@ignored:6379/0", "agg") == "sentinel://agg/0"
    assert broker_name("redis://127.0.0.1:1/3", "agg") == "sentinel://agg/3"
    assert broker_name("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"


def test_every_broker_connection_notices_a_silent_peer() -> None:
    options = keepalive_options()
    if sys.platform == "linux":
        assert options[socket.TCP_KEEPIDLE] == 5
        assert options[socket.TCP_USER_TIMEOUT] == 8000


def celery_settings(environ: dict[str, str]) -> dict[str, object]:
    """Load celery_config in a fresh interpreter (it reads the environment at import)."""
    probe = (
        "import json, celery_config as c;"
        "o = dict(c.broker_transport_options);"
        "o.pop('socket_keepalive_options');"
        "o.get('sentinel_kwargs', {}).pop('socket_keepalive_options', None);"
        "r = o.get('sentinel_kwargs', {}).pop('retry', None);"
        "o['sentinel_retries'] = None if r is None else r._retries;"
        "print(json.dumps({'url': c.broker_url, 'transport': c.broker_transport, 'options': o}))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        env={"PATH": "/usr/bin:/bin", **environ},
    )
    return json.loads(done.stdout)


def test_workers_use_our_transport_through_the_sentinels() -> None:
    found = celery_settings({**SENTINELS, "REDIS_URL": "redis://:pw@ignored:6379/2"})
    # One URL, no alternates: kombu would switch to an alternate by its scheme and
    # replace our transport with its stock one.
    assert found["url"] == "sentinel://:pw@10.0.0.5:26379/2"
    assert ";" not in str(found["url"])
    assert found["transport"] == "tasks.broker:SentinelTransport"
    options = found["options"]
    assert isinstance(options, dict)
    assert options["master_name"] == "agg"
    assert options["sentinels"] == [["10.0.0.5", 26379], ["10.0.0.6", 26380]]
    assert options["sentinel_kwargs"]["socket_timeout"] == 0.5
    # One try per Sentinel: a silent one (its host gone) costs one timeout, not four.
    assert options["sentinel_retries"] == 0


def test_without_sentinels_the_workers_config_is_unchanged() -> None:
    found = celery_settings({"REDIS_URL": "redis://127.0.0.1:6390/0"})
    assert found["url"] == "redis://127.0.0.1:6390/0"
    assert found["transport"] == "tasks.broker:Transport"
    assert "master_name" not in found["options"]  # type: ignore[operator]


def test_the_sentinel_channel_keeps_every_fix_of_ours() -> None:
    connection = Connection(
        "sentinel://127.0.0.1:26379/0",
        transport="tasks.broker:SentinelTransport",
        transport_options={"master_name": "agg", "sentinels": [("127.0.0.1", 26379)]},
    )
    assert connection.get_transport_cls() is broker.SentinelTransport
    channel_class = broker.SentinelChannel
    for fix in ("_create_client", "_size", "_queue_bind", "_connparams"):
        assert getattr(channel_class, fix) is getattr(broker.Channel, fix), fix
    assert channel_class.QoS is broker.QoS
    assert "sentinels" in channel_class.from_transport_options
