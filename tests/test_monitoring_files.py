"""The compose `monitoring` profile's wiring, read from its files without running it.

Prometheus runs in tests/compose/test_monitoring_profile.py (a stand-in from Debian's
package where no registry answers). Grafana does not run anywhere in this project's
tests on such machines: its image cannot be pulled and no package ships its server
(Debian, PyPI, npm). So this module checks what Grafana would read — the data source
and dashboard provider YAML, the paths compose mounts them at, the dashboard JSON — and
how the token reaches Prometheus, against each other and against docker-compose.yml.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from scripts.stack import ROOT

COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, Any] = COMPOSE["services"]
PROMETHEUS_CONFIG = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())


def mounts(service: str) -> dict[str, Path]:
    """Map each container path a service binds from the repository to the repository path."""
    found = {}
    for volume in SERVICES[service].get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith("./"):
            found[target] = ROOT / source
    return found


def host_path(service: str, container_path: str) -> Path:
    """Return the repository file a container path of the service is (a mount, or inside one)."""
    for target, source in sorted(mounts(service).items(), key=lambda item: -len(item[0])):
        if container_path == target or container_path.startswith(target.rstrip("/") + "/"):
            return source / Path(container_path).relative_to(target)
    raise AssertionError(f"{service}: nothing of the repository is mounted at {container_path}")


def provisioning(kind: str) -> list[dict[str, Any]]:
    directory = host_path("grafana", f"/etc/grafana/provisioning/{kind}")
    files = sorted(directory.glob("*.yml")) + sorted(directory.glob("*.yaml"))
    assert files, f"no provisioning file in {directory}"
    return [yaml.safe_load(path.read_text()) for path in files]


@pytest.mark.parametrize("service", ["prometheus", "grafana"])
def test_each_is_in_the_monitoring_profile_on_loopback_healthchecked_and_restarted(
    service: str,
) -> None:
    spec = SERVICES[service]
    assert spec["profiles"] == ["monitoring"]
    assert spec["ports"] and all(port.startswith("127.0.0.1:") for port in spec["ports"])
    assert spec["healthcheck"]["test"][0] == "CMD"
    assert spec["restart"] == "unless-stopped"
    # A pinned release, not a moving tag.
    assert re.fullmatch(r"[\w./-]+:v?\d+\.\d+\.\d+", spec["image"]), spec["image"]
    # Only these two are in the profile: plain `up` starts what it started before.
    profiled = {
        name for name, other in SERVICES.items() if "monitoring" in other.get("profiles", [])
    }
    assert profiled == {"prometheus", "grafana"}


MONITORING_SECRETS = ("PROMETHEUS_TOKEN", "GRAFANA_ADMIN_PASSWORD")


def test_every_secret_has_an_empty_entry_in_env_example() -> None:
    text = (ROOT / "docker-compose.yml").read_text()
    required = set(re.findall(r"\$\{(\w+):\?", text))
    # The monitoring profile's secrets are not required by compose (plain `up` works without
    # them); their containers refuse an empty one (next tests).
    assert not set(MONITORING_SECRETS) & required
    for name in MONITORING_SECRETS:
        assert f"${{{name}:-}}" in text, name
    secrets = required | set(MONITORING_SECRETS)
    entries = dict(
        line.split("=", 1)
        for line in (ROOT / ".env.example").read_text().splitlines()
        if line and not line.startswith("#")
    )
    assert {name: entries.get(name) for name in secrets} == dict.fromkeys(secrets, "")


def entrypoint_script(service: str) -> str:
    """The service's `sh -c` entrypoint as the container's shell runs it (compose's $$ is $)."""
    shell, flag, script, _name = SERVICES[service]["entrypoint"]
    assert (shell, flag) == ("/bin/sh", "-c")
    return str(script).replace("$$", "$")


def run_entrypoint(
    script: str, env: dict[str, str], *args: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["/bin/sh", "-c", script, "entrypoint", *args],
        env={"PATH": os.environ["PATH"], **env},
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.mark.parametrize(
    ("service", "variable", "secret"),
    [
        ("prometheus", "PROMETHEUS_TOKEN", "PROMETHEUS_TOKEN"),
        ("grafana", "GF_SECURITY_ADMIN_PASSWORD", "GRAFANA_ADMIN_PASSWORD"),
    ],
)
def test_a_monitoring_container_refuses_to_start_without_its_secret_naming_it(
    service: str, variable: str, secret: str
) -> None:
    assert SERVICES[service]["environment"][variable] == f"${{{secret}:-}}"
    done = run_entrypoint(entrypoint_script(service), {variable: ""})
    # 78 (EX_CONFIG), before anything else runs: the image's program is never started.
    assert done.returncode == 78, done.stdout + done.stderr
    assert f"{secret} is empty" in done.stderr and ".env" in done.stderr, done.stderr
    assert done.stdout == ""


def test_grafanas_entrypoint_starts_the_images_own_once_the_password_is_set() -> None:
    script = entrypoint_script("grafana")
    assert script.rstrip().endswith('exec /run.sh "$@"')
    # /run.sh (the image's entrypoint) is not on this machine: stand in `echo` for it.
    done = run_entrypoint(
        script.replace("exec /run.sh", "exec echo run.sh"),
        {"GF_SECURITY_ADMIN_PASSWORD": "a-password"},
        "--some-arg",
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "run.sh --some-arg\n"


def test_prometheus_entrypoint_writes_the_token_to_its_file_once_it_is_set(
    tmp_path: Path,
) -> None:
    (job,) = PROMETHEUS_CONFIG["scrape_configs"]
    token_file = job["authorization"]["credentials_file"]
    script = entrypoint_script("prometheus")
    here = tmp_path / "aggregator-token"
    # The token goes to a temporary file instead, and `env` shows what prometheus would get.
    script = script.replace(token_file, str(here)).replace("exec /bin/prometheus", "exec env")
    done = run_entrypoint(script, {"PROMETHEUS_TOKEN": "t0ken"})
    assert done.returncode == 0, done.stderr
    assert here.read_text() == "t0ken"
    assert here.stat().st_mode & 0o077 == 0  # umask 077: its user alone reads it
    assert "PROMETHEUS_TOKEN" not in done.stdout  # dropped from prometheus's environment


def test_prometheus_runs_the_images_defaults_on_the_mounted_config_and_its_volume() -> None:
    spec = SERVICES["prometheus"]
    args = dict(arg.removeprefix("--").split("=", 1) for arg in spec["command"])
    assert host_path("prometheus", args["config.file"]) == ROOT / "deploy/prometheus/prometheus.yml"
    assert args["storage.tsdb.path"] == "/prometheus"
    assert "prometheusdata:/prometheus" in spec["volumes"]
    assert "prometheusdata" in COMPOSE["volumes"]
    # The rule files prometheus.yml names are in the mounted directory.
    for rule_file in PROMETHEUS_CONFIG["rule_files"]:
        assert (ROOT / "deploy/prometheus" / rule_file).is_file(), rule_file
    # The entrypoint hands over to the image's own, with the arguments above.
    assert spec["entrypoint"][-2].rstrip().endswith('exec /bin/prometheus "$$@"')
    (job,) = PROMETHEUS_CONFIG["scrape_configs"]
    assert job["static_configs"] == [{"targets": ["proxy:8080"]}]


def test_the_read_token_reaches_the_file_prometheus_reads_on_a_tmpfs_only() -> None:
    spec = SERVICES["prometheus"]
    (job,) = PROMETHEUS_CONFIG["scrape_configs"]
    token_file = job["authorization"]["credentials_file"]
    script = spec["entrypoint"][-2]
    assert f"printf '%s' \"$$PROMETHEUS_TOKEN\" >{token_file}" in script
    assert "umask 077" in script and "unset PROMETHEUS_TOKEN" in script
    tmpfs = [entry.split(":")[0] for entry in spec["tmpfs"]]
    assert str(Path(token_file).parent) in tmpfs
    assert spec["environment"]["PROMETHEUS_TOKEN"] == "${PROMETHEUS_TOKEN:-}"
    # Nothing of the repository is mounted where the token goes.
    assert not any(token_file.startswith(target) for target in mounts("prometheus"))


def test_grafanas_data_source_is_the_profiles_prometheus() -> None:
    (document,) = provisioning("datasources")
    assert document["apiVersion"] == 1
    (source,) = document["datasources"]
    assert source["type"] == "prometheus" and source["isDefault"] is True
    url = urlsplit(source["url"])
    assert url.hostname in SERVICES and url.hostname == "prometheus"
    assert SERVICES["prometheus"]["ports"][0].endswith(f":{url.port}")
    assert source["jsonData"]["timeInterval"] == PROMETHEUS_CONFIG["global"]["scrape_interval"]
    # The dashboard's data source variable picks a data source of this type.
    dashboard = json.loads((ROOT / "deploy/grafana/aggregator-dashboard.json").read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == source["type"]


def test_grafana_loads_deploy_grafanas_dashboard_and_opens_on_it() -> None:
    (document,) = provisioning("dashboards")
    assert document["apiVersion"] == 1
    (provider,) = document["providers"]
    assert provider["type"] == "file"
    folder = provider["options"]["path"]
    in_folder = {
        target: source
        for target, source in mounts("grafana").items()
        if target.startswith(folder.rstrip("/") + "/")
    }
    assert list(in_folder.values()) == [ROOT / "deploy/grafana/aggregator-dashboard.json"]
    (dashboard_path,) = in_folder
    dashboard = json.loads(in_folder[dashboard_path].read_text())
    assert dashboard["uid"] == "log-aggregator" and dashboard["panels"]
    environment = SERVICES["grafana"]["environment"]
    assert environment["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"] == dashboard_path
    # Admin's password only from the environment, never a default.
    assert environment["GF_SECURITY_ADMIN_PASSWORD"] == "${GRAFANA_ADMIN_PASSWORD:-}"
    assert environment["GF_USERS_ALLOW_SIGN_UP"] == "false"
