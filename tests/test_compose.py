"""docker-compose.yml and the Dockerfile agree with the code: services, volumes, entry points."""

from __future__ import annotations

import os
import re
import secrets
import shlex
import subprocess
import time
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from scripts.services import find_docker_compose
from scripts.stack import Worker
from scripts.stack import wait_until

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
SHARED_ENV: dict[str, str] = COMPOSE["x-app-env"]
APP_SERVICES = ("migrate", "aggregator", "worker", "flower")


def command(name: str) -> list[str]:
    cmd = SERVICES[name]["command"]
    return shlex.split(cmd) if isinstance(cmd, str) else [str(word) for word in cmd]


def with_defaults(word: str) -> str:
    """Substitute each ${VAR:-default} with its default, as compose does when VAR is unset."""
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", word)


def healthcheck(name: str) -> str:
    test = SERVICES[name]["healthcheck"]["test"]
    return test if isinstance(test, str) else " ".join(test)


def mounts(name: str) -> dict[str, str]:
    """Map each mount target of a service to its source (short volume syntax)."""
    pairs = (entry.split(":")[:2] for entry in SERVICES[name].get("volumes", []))
    return {target: source for source, target in pairs}


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", path.read_text())
    found = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            found.append((keyword.upper(), rest.strip()))
    return found


def test_every_service_is_defined() -> None:
    expected = {
        "postgres",
        "redis",
        "migrate",
        "aggregator",
        "worker",
        "beat",
        "publisher",
        "flower",
        "proxy",
    }
    assert expected <= set(SERVICES)


def test_one_beat_sends_the_retention_runs_and_workers_read_the_same_policy() -> None:
    words = command("beat")
    assert words[:4] == ["celery", "-A", "tasks", "beat"]
    assert SERVICES["beat"]["deploy"]["replicas"] == 1
    assert "container_name" not in SERVICES["beat"] and "ports" not in SERVICES["beat"]
    from celery_config import beat_schedule

    assert beat_schedule["retention"]["task"] == "tasks.retention.run"
    for name in ("RETENTION_DAYS", "LEDGER_RETENTION_DAYS", "RETENTION_INTERVAL"):
        assert name in SHARED_ENV
        assert SERVICES["beat"]["environment"][name] == SERVICES["worker"]["environment"][name]


def test_postgres_has_pg_isready_healthcheck_and_named_volume() -> None:
    assert SERVICES["postgres"]["image"].split(":")[0] == "postgres"
    assert "pg_isready" in healthcheck("postgres")
    source = mounts("postgres")["/var/lib/postgresql/data"]
    assert source in COMPOSE["volumes"]


def test_secrets_are_required_from_the_environment_without_defaults() -> None:
    password = SERVICES["postgres"]["environment"]["POSTGRES_PASSWORD"]
    assert password.startswith("${POSTGRES_PASSWORD:?")
    assert "${POSTGRES_PASSWORD:?" in SHARED_ENV["DATABASE_URL"]
    assert SERVICES["aggregator"]["environment"]["API_TOKENS"].startswith("${API_TOKENS:?")
    assert SERVICES["publisher"]["environment"]["API_TOKEN"].startswith("${API_TOKEN:?")
    assert SERVICES["flower"]["environment"]["FLOWER_BASIC_AUTH"].startswith(
        "${FLOWER_BASIC_AUTH:?"
    )
    # The monitoring profile's secrets are optional for compose, so plain `up` needs neither;
    # their containers refuse to start while they are empty (tests/test_monitoring_files.py).
    assert SERVICES["prometheus"]["environment"]["PROMETHEUS_TOKEN"] == "${PROMETHEUS_TOKEN:-}"
    assert (
        SERVICES["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"]
        == "${GRAFANA_ADMIN_PASSWORD:-}"
    )
    text = (ROOT / "docker-compose.yml").read_text()
    assert "change-me" not in text and "demo-token" not in text
    example = (ROOT / ".env.example").read_text()
    for name in ("POSTGRES_PASSWORD", "API_TOKENS", "API_TOKEN", "FLOWER_BASIC_AUTH"):
        assert re.search(rf"^{name}=", example, re.M), name
    for name in ("PROMETHEUS_TOKEN", "GRAFANA_ADMIN_PASSWORD"):
        assert re.search(rf"^{name}=", example, re.M), name
    assert ".env" in (ROOT / ".gitignore").read_text().split()


def test_redis_fsyncs_every_acceptance_to_an_append_only_file_on_a_named_volume() -> None:
    words = command("redis")
    assert words[0] == "redis-server"
    assert words[words.index("--appendonly") + 1] == "yes"
    assert words[words.index("--appendfsync") + 1] == "always"
    assert words[words.index("--maxmemory-policy") + 1] == "noeviction"
    assert mounts("redis")["/data"] in COMPOSE["volumes"]
    assert healthcheck("redis").endswith("redis-cli ping")


@pytest.mark.parametrize("name", ["postgres", "redis", "aggregator", "worker", "flower"])
def test_only_the_proxy_publishes_a_host_port(name: str) -> None:
    assert "ports" not in SERVICES[name]


def test_the_proxy_listens_on_loopback_unless_told_otherwise() -> None:
    proxy = SERVICES["proxy"]
    assert proxy["image"].startswith("nginx:")
    assert proxy["ports"] == ["${PROXY_BIND:-127.0.0.1}:${PROXY_PORT:-8080}:8080"]
    template = "./deploy/nginx/aggregator.conf.template"
    assert mounts("proxy")["/etc/nginx/templates/aggregator.conf.template"] == template
    assert (ROOT / template).is_file()
    # Every variable the template uses is given to the container.
    used = set(re.findall(r"\$\{([A-Z_]+)\}", (ROOT / template).read_text()))
    assert used <= set(proxy["environment"])
    assert SERVICES["aggregator"]["environment"]["PROXY_HOPS"] == "1"


def test_aggregator_can_be_scaled() -> None:
    aggregator = SERVICES["aggregator"]
    assert "container_name" not in aggregator
    assert "/health" in healthcheck("aggregator")


def test_worker_can_be_scaled() -> None:
    worker = SERVICES["worker"]
    assert "container_name" not in worker
    assert "ports" not in worker


def test_migrate_runs_once_before_the_api_and_the_worker() -> None:
    assert command("migrate") == ["alembic", "upgrade", "head"]
    assert SERVICES["migrate"]["restart"] == "no"
    assert SERVICES["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in ("aggregator", "worker"):
        depends_on = SERVICES[name]["depends_on"]
        assert depends_on["migrate"]["condition"] == "service_completed_successfully"
        assert depends_on["postgres"]["condition"] == "service_healthy"
        assert depends_on["redis"]["condition"] == "service_healthy"


def test_publisher_is_one_shot_and_waits_for_a_healthy_proxy() -> None:
    publisher = SERVICES["publisher"]
    assert publisher["restart"] == "no"
    assert publisher["profiles"] == ["publish"]
    assert publisher["depends_on"]["proxy"]["condition"] == "service_healthy"
    assert SERVICES["proxy"]["depends_on"]["aggregator"]["condition"] == "service_healthy"
    assert "API_TOKEN" in publisher["environment"]


def test_flower_requires_basic_auth_from_the_environment_not_argv() -> None:
    words = command("flower")
    assert words == ["celery", "-A", "tasks", "flower"]
    environment = SERVICES["flower"]["environment"]
    assert environment["FLOWER_URL_PREFIX"] == "flower"
    assert "FLOWER_BASIC_AUTH" in environment


def test_shared_environment_names_are_read_by_app_config() -> None:
    config_source = (ROOT / "app" / "config.py").read_text()
    assert {"DATABASE_URL", "REDIS_URL"} <= set(SHARED_ENV)
    for name in SHARED_ENV:
        assert f'"{name}"' in config_source, f"app/config.py never reads {name}"
    assert '"API_TOKENS"' in config_source
    assert "API_TOKENS" in SERVICES["aggregator"]["environment"]


def test_shared_environment_points_at_the_compose_services() -> None:
    assert SHARED_ENV["DATABASE_URL"].startswith("postgresql+psycopg2://")
    assert "@postgres:5432/" in SHARED_ENV["DATABASE_URL"]
    assert SHARED_ENV["REDIS_URL"] == "redis://redis:6379/0"


@pytest.mark.parametrize("name", APP_SERVICES)
def test_app_services_get_the_shared_environment(name: str) -> None:
    environment = SERVICES[name]["environment"]
    for key, value in SHARED_ENV.items():
        assert environment[key] == value


def test_the_ha_overlay_points_every_process_of_the_image_at_the_replicas() -> None:
    """deploy/compose.ha.yml: each service that reaches the database and broker follows both."""
    overlay = yaml.safe_load((ROOT / "deploy" / "compose.ha.yml").read_text())["services"]
    reaching = [
        name
        for name, service in SERVICES.items()
        if str(service.get("image", "")).startswith("log-aggregator:")
        and "DATABASE_URL" in service.get("environment", {})
    ]
    assert {"migrate", "aggregator", "worker", "beat", "flower"} <= set(reaching)
    for name in reaching:
        environment = overlay.get(name, {}).get("environment", {})
        assert environment.get("BROKER_SENTINEL_MASTER") == "aggregator", name
        assert "sentinel-1:26379" in environment.get("BROKER_SENTINELS", ""), name
        url = with_defaults(environment.get("DATABASE_URL", ""))
        assert "host=172.30.240.248:5432&host=172.30.240.249:5432" in url, name
        assert url.endswith("&target_session_attrs=read-write"), name


def test_api_and_workers_share_one_metrics_volume_and_flower_keeps_out() -> None:
    for name in ("aggregator", "worker"):
        assert SERVICES[name]["environment"]["PROMETHEUS_MULTIPROC_DIR"] == "/metrics"
        assert mounts(name)["/metrics"] == "metrics"
    # Flower's flower_* series would land among the aggregator's.
    assert "PROMETHEUS_MULTIPROC_DIR" not in SERVICES["flower"]["environment"]
    assert "/metrics" not in mounts("flower")
    options = COMPOSE["volumes"]["metrics"]["driver_opts"]
    assert options["type"] == "tmpfs"
    # Writable by the user the image runs as (a fresh volume belongs to root).
    uid = re.search(r"--uid (\d+)", (ROOT / "Dockerfile").read_text())
    assert uid is not None
    assert f"uid={uid.group(1)}" in options["o"].split(",")


def test_gunicorn_serves_the_app_factory(monkeypatch: pytest.MonkeyPatch) -> None:
    words = command("aggregator")
    assert words[0] == "gunicorn"
    assert words[words.index("--bind") + 1] == "0.0.0.0:8080"
    assert words[-1] == "app:create_app()"
    # Resolve the target the way gunicorn does; the factory connects to nothing.
    from gunicorn.util import import_app

    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.setenv("API_TOKENS", secrets.token_hex(32))
    application = import_app(words[-1])
    routes = {rule.rule for rule in application.url_map.iter_rules()}
    assert {"/health", "/ready", "/publish", "/stats", "/events"} <= routes


@pytest.mark.parametrize("name", ["worker", "beat", "flower"])
def test_celery_commands_find_the_tasks_app(name: str) -> None:
    words = command(name)
    assert words[:3] == ["celery", "-A", "tasks"]
    from celery.app.utils import find_app

    import tasks

    assert find_app(words[2]) is tasks.celery_app


def test_worker_concurrency_is_configurable() -> None:
    words = command("worker")
    assert words[3] == "worker"
    assert words[words.index("--concurrency") + 1] == "${WORKER_CONCURRENCY:-2}"


def test_publisher_command_runs_the_aggregator_console_script() -> None:
    words = command("publisher")
    assert words[:2] == ["aggregator", "publish"]
    assert words[words.index("--url") + 1] == "http://proxy:8080"
    assert "--verify" in words
    assert "--json" in words  # `logs publisher` is one JSON document
    # The client's own distribution (clients/python/) installs the script; the server depends on it.
    client = tomllib.loads((ROOT / "clients/python/pyproject.toml").read_text())
    assert client["project"]["scripts"]["aggregator"] == "aggregator_client.cli:main"
    server = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert client["project"]["name"] in server["project"]["dependencies"]
    assert "scripts" not in server["project"]
    # The options the service passes are ones the CLI accepts, with valid values.
    from aggregator_client.cli import parse_args

    args = parse_args([with_defaults(word) for word in words[1:]], {}).args
    assert args.url == "http://proxy:8080"
    assert args.generate == 20000
    assert args.verify is True


def test_alembic_finds_its_configuration() -> None:
    assert (ROOT / "migrations" / "env.py").is_file()
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["tool"]["alembic"]["script_location"].endswith("migrations")


def test_every_app_service_builds_the_one_image_instead_of_pulling_it() -> None:
    # A service that names the image without `build:` makes `up --build` try to pull it.
    services = (*APP_SERVICES, "publisher")
    assert {SERVICES[name]["image"] for name in services} == {COMPOSE["x-app"]["image"]}
    assert all(SERVICES[name]["build"] == "." for name in services)
    assert (ROOT / "Dockerfile").is_file()


def test_dockerfile_runs_the_app_factory_as_a_non_root_user() -> None:
    instructions = dockerfile_instructions(ROOT / "Dockerfile")
    assert instructions[0] == ("FROM", "python:3.11-slim")
    starts = [rest for keyword, rest in instructions if keyword in {"CMD", "ENTRYPOINT"}]
    assert starts and "create_app" in starts[-1]
    assert "0.0.0.0:8080" in starts[-1]
    users = [rest for keyword, rest in instructions if keyword == "USER"]
    assert users and users[-1] not in {"root", "0"}


def test_dockerignore_keeps_local_state_out_of_the_image() -> None:
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".venv", ".git", ".local", ".env"} <= ignored


def test_the_image_gets_what_runs_and_no_tests_benchmarks_or_docs() -> None:
    copied = {
        word.rstrip("/")
        for keyword, rest in dockerfile_instructions(ROOT / "Dockerfile")
        if keyword == "COPY"
        for word in rest.split()[:-1]
    }
    assert {
        "app",
        "tasks",
        "publisher",
        "clients/python",
        "migrations",
        "gunicorn.conf.py",
        "pyproject.toml",
    } <= copied
    assert "." not in copied and not {"tests", "bench", "docs", "deploy", "scripts"} & copied


def compose_config(env_file: Path, *options: str) -> subprocess.CompletedProcess[str]:
    """`docker-compose config`: the file as compose reads it, validated without an engine."""
    return subprocess.run(
        [str(find_docker_compose()), "--env-file", str(env_file), "-f", "docker-compose.yml"]
        + [*options, "config"],
        cwd=ROOT,
        env={"PATH": os.environ["PATH"]},  # no secrets from this process's environment
        capture_output=True,
        text=True,
        timeout=60,
    )


def filled_env(path: Path, monitoring: bool = True) -> Path:
    """.env.example with a secret in each empty value, as README asks.

    Without `monitoring`, the monitoring profile's two secrets stay empty.
    """
    token = secrets.token_hex(32)
    values = {
        "POSTGRES_PASSWORD": secrets.token_hex(16),
        "API_TOKENS": f"{token}:publish+read+admin",
        "API_TOKEN": token,
        "FLOWER_BASIC_AUTH": f"admin:{secrets.token_hex(16)}",
    }
    if monitoring:
        values |= {"PROMETHEUS_TOKEN": token, "GRAFANA_ADMIN_PASSWORD": secrets.token_hex(16)}
    text = (ROOT / ".env.example").read_text()
    for name, value in values.items():
        text, found = re.subn(rf"^{name}=$", f"{name}={value}", text, flags=re.M)
        assert found == 1, f".env.example has no empty {name}="
    path.write_text(text)
    return path


def test_compose_validates_with_the_secrets_filled_in(tmp_path: Path) -> None:
    done = compose_config(filled_env(tmp_path / ".env"))
    assert done.returncode == 0, done.stderr
    resolved = yaml.safe_load(done.stdout)["services"]
    assert str(resolved["proxy"]["ports"][0]).startswith("127.0.0.1:")
    assert all("build" in resolved[name] for name in APP_SERVICES)
    images = {resolved[name]["image"] for name in APP_SERVICES}
    assert len(images) == 1  # one image for every app service
    for name in ("aggregator", "worker"):
        assert resolved[name]["environment"]["PROMETHEUS_MULTIPROC_DIR"] == "/metrics"
    assert yaml.safe_load(done.stdout)["volumes"]["metrics"]["driver_opts"]["type"] == "tmpfs"


@pytest.mark.parametrize("profile", [[], ["--profile", "monitoring"]])
def test_compose_needs_no_monitoring_secrets(tmp_path: Path, profile: list[str]) -> None:
    # Plain `up` (and even the profile's config) with PROMETHEUS_TOKEN and
    # GRAFANA_ADMIN_PASSWORD empty: compose accepts it; the two containers refuse at start.
    done = compose_config(filled_env(tmp_path / ".env", monitoring=False), *profile)
    assert done.returncode == 0, done.stderr
    resolved = yaml.safe_load(done.stdout)["services"]
    assert "proxy" in resolved
    if profile:
        assert resolved["prometheus"]["environment"]["PROMETHEUS_TOKEN"] == ""


def test_an_unedited_copy_of_env_example_is_refused_naming_the_secret() -> None:
    # Its secrets are empty: compose refuses them (`:?`), so no known value ever deploys.
    done = compose_config(ROOT / ".env.example")
    assert done.returncode != 0
    # Compose names the first empty secret it meets (its order varies).
    secrets_named = (
        "POSTGRES_PASSWORD",
        "API_TOKENS",
        "API_TOKEN",
        "FLOWER_BASIC_AUTH",
    )
    assert any(f"{name} " in done.stderr for name in secrets_named), done.stderr


def test_compose_refuses_to_start_without_secrets(tmp_path: Path) -> None:
    empty = tmp_path / "empty.env"
    empty.write_text("")
    done = compose_config(empty)
    assert done.returncode != 0
    assert "POSTGRES_PASSWORD" in done.stderr


@pytest.mark.parametrize(
    "name",
    [
        "aggregator",
        "worker",
        "beat",
        "flower",
        "postgres",
        "redis",
        "proxy",
        "prometheus",
        "grafana",
    ],
)
def test_every_long_running_service_has_a_healthcheck_and_rotated_logs(name: str) -> None:
    assert SERVICES[name]["healthcheck"]["test"]
    options = SERVICES[name]["logging"]["options"]
    assert options["max-size"] and options["max-file"]


def test_whatever_waits_for_a_service_waits_for_it_to_be_healthy() -> None:
    # `up` (and `up --wait`) then returns only once the stack answers.
    for name, service in SERVICES.items():
        for dependency, condition in service.get("depends_on", {}).items():
            expected = (
                "service_completed_successfully" if dependency == "migrate" else ("service_healthy")
            )
            assert condition["condition"] == expected, f"{name} -> {dependency}"
    assert "proxy" in SERVICES["publisher"]["depends_on"]


def test_the_proxy_is_healthy_only_when_it_reaches_an_api_replica() -> None:
    assert "127.0.0.1:8080/health" in healthcheck("proxy")
    assert SERVICES["proxy"]["environment"]["PROXY_LISTEN"] == "8080"


def test_the_proxy_runs_the_shipped_nginx_conf_with_descriptors_for_its_connections() -> None:
    conf = mounts("proxy")["/etc/nginx/nginx.conf"]
    text = (ROOT / conf).read_text()
    rlimit = re.search(r"^worker_rlimit_nofile\s+(\d+);", text, re.M)
    assert rlimit is not None
    assert SERVICES["proxy"]["ulimits"]["nofile"] == int(rlimit.group(1))
    # Docker's DNS, asked per request: replicas added by --scale are found.
    assert SERVICES["proxy"]["environment"]["PROXY_RESOLVER"] == "127.0.0.11"


def worker_healthcheck(liveness_file: Path) -> int:
    """Run the worker's compose healthcheck here, as the container's shell would."""
    test = SERVICES["worker"]["healthcheck"]["test"]
    assert test[0] == "CMD-SHELL"
    command = test[1].replace("$$", "$")  # compose's escape for a literal $
    env = {"PATH": os.environ["PATH"], "WORKER_LIVENESS_FILE": str(liveness_file)}
    return subprocess.run(["sh", "-c", command], env=env, timeout=10).returncode


def test_the_worker_healthcheck_passes_while_the_consumer_touches_its_file(
    stack_env: dict[str, str], logs: Path, tmp_path: Path
) -> None:
    # A file check, not `celery inspect ping`: that started a Celery client per check
    # (8-13 s, ~1.9 s of CPU) and timed out on busy workers.
    assert "celery" not in healthcheck("worker")
    assert SERVICES["worker"]["environment"]["WORKER_LIVENESS_FILE"]
    liveness = tmp_path / "worker.alive"
    assert worker_healthcheck(liveness) != 0  # no file yet
    worker = Worker({**stack_env, "WORKER_LIVENESS_FILE": str(liveness)}, logs / "liveness.log")
    worker.start()
    try:
        wait_until(liveness.exists, timeout=10)
        first = liveness.stat().st_mtime
        wait_until(lambda: liveness.stat().st_mtime > first, timeout=15, interval=0.2)
        assert worker_healthcheck(liveness) == 0
    finally:
        worker.stop()
    # A file nobody touched for a minute: the consumer is stuck or gone.
    stale = time.time() - 60
    os.utime(liveness, (stale, stale))
    assert worker_healthcheck(liveness) != 0
