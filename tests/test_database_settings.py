"""The network limits every PostgreSQL connection gets (DB_CONNECT_TIMEOUT, keepalives,
DB_TCP_USER_TIMEOUT) and multi-host DATABASE_URLs, read from settings and seen on a real
connection's libpq parameters."""

from __future__ import annotations

import pytest
from sqlalchemy import Engine

from app.config import DbNetwork
from app.config import SettingsError
from app.config import load_settings
from app.db import make_engine
from scripts.services import alembic_config
from scripts.services import plain_dsn
from scripts.services import with_database

MULTI_HOST = (
    "postgresql+psycopg2://agg:pw@/aggregator"
    "?host=10.0.0.5:5432&host=10.0.0.6:5433&target_session_attrs=read-write"
)


def test_defaults_bound_a_silent_peer_to_seconds() -> None:
    network = load_settings({}).db_network
    assert network == DbNetwork(5, 5, 2, 3, 8000)
    assert network.connect_args()["tcp_user_timeout"] == 8000


def test_network_limits_come_from_the_environment() -> None:
    env = {
        "DB_CONNECT_TIMEOUT": "3",
        "DB_KEEPALIVES_IDLE": "0",
        "DB_KEEPALIVES_INTERVAL": "1",
        "DB_KEEPALIVES_COUNT": "4",
        "DB_TCP_USER_TIMEOUT": "0",
    }
    network = load_settings(env).db_network
    assert network == DbNetwork(3, 0, 1, 4, 0)
    # 0 leaves the system's default: the parameter is not passed at all (libpq would
    # hand TCP_KEEPIDLE 0 to setsockopt, which Linux refuses).
    assert "keepalives_idle" not in network.connect_args()
    assert "tcp_user_timeout" not in network.connect_args()


def test_zero_limits_still_connect(database_url: str) -> None:
    engine = make_engine(database_url, network=DbNetwork(5, 0, 0, 0, 0))
    try:
        parameters = dsn_parameters(engine)
    finally:
        engine.dispose()
    assert parameters.get("keepalives_idle", "") == ""


@pytest.mark.parametrize(
    "env",
    [
        {"DB_CONNECT_TIMEOUT": "1"},
        {"DB_CONNECT_TIMEOUT": "0"},
        {"DB_TCP_USER_TIMEOUT": "-5"},
        {"DB_KEEPALIVES_IDLE": "soon"},
    ],
)
def test_malformed_network_limits_fail_loudly(env: dict[str, str]) -> None:
    with pytest.raises(SettingsError):
        load_settings(env)


def test_every_connection_carries_the_limits(database_url: str) -> None:
    engine = make_engine(database_url, network=DbNetwork(4, 6, 3, 2, 7000))
    try:
        parameters = dsn_parameters(engine)
    finally:
        engine.dispose()
    assert parameters["connect_timeout"] == "4"
    assert parameters["keepalives"] == "1"
    assert parameters["keepalives_idle"] == "6"
    assert parameters["keepalives_interval"] == "3"
    assert parameters["keepalives_count"] == "2"
    assert parameters["tcp_user_timeout"] == "7000"


def test_a_limit_the_url_names_wins(database_url: str) -> None:
    separator = "&" if "?" in database_url else "?"
    engine = make_engine(f"{database_url}{separator}tcp_user_timeout=1234")
    try:
        parameters = dsn_parameters(engine)
    finally:
        engine.dispose()
    assert parameters["tcp_user_timeout"] == "1234"
    assert parameters["keepalives_idle"] == "5"


def test_a_multi_host_url_is_read_and_translated_for_libpq() -> None:
    settings = load_settings({"DATABASE_URL": MULTI_HOST.replace("+psycopg2", "")})
    assert settings.database_url == MULTI_HOST
    dsn = plain_dsn(with_database(MULTI_HOST, "postgres"))
    assert "host=10.0.0.5,10.0.0.6" in dsn and "port=5432,5433" in dsn
    assert "dbname=postgres" in dsn and "target_session_attrs=read-write" in dsn
    assert "password=pw" in dsn


def test_migrations_take_a_multi_host_url() -> None:
    # The ini layer under Alembic's config interpolates "%" (host=10.0.0.5%3A5432).
    url = with_database(MULTI_HOST, "aggregator")
    assert alembic_config(url).get_main_option("sqlalchemy.url") == url


def dsn_parameters(engine: Engine) -> dict[str, str]:
    """Return the libpq parameters of a real connection of the engine."""
    with engine.connect() as conn:
        dbapi = conn.connection.dbapi_connection
        assert dbapi is not None
        return dict(dbapi.info.dsn_parameters)  # type: ignore[attr-defined]
