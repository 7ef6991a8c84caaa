"""docs/monitoring.md's Monitoring section against a real Docker engine: the `monitoring` profile.

Runs after test_compose_stack.py (pytest takes a directory's modules in name order), on
the stack it leaves running and empty; alone, it brings the stack up itself. The
section's `docker compose --profile monitoring up -d --wait` adds Prometheus: healthy,
published on 127.0.0.1 only, scraping /metrics through the proxy with PROMETHEUS_TOKEN
(target up; aggregator_build_info and aggregator_events_total scraped; the token neither
in its process's environment nor readable by anyone else), every rule of alerts.yml
loaded with its annotations and evaluated without error, none firing; events published
through the proxy reach Prometheus's sum(aggregator_events_total) exactly. Then
`--profile monitoring down` removes every container and keeps Prometheus's volume.

Grafana runs here only where its image can be had. Where no registry answers (the
machines this project is built on) it cannot: no package ships Grafana's server
(Debian, PyPI, npm), so its step is skipped, saying so on the terminal, the rest of
the profile runs without it, and tests/test_monitoring_files.py checks its
provisioning files statically.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from typing import Any

import pytest
import requests
import yaml

from scripts.stack import ROOT
from scripts.stack import wait_until
from tests.compose.harness import Stack
from tests.compose.harness import event
from tests.compose.harness import publish
from tests.compose.harness import readme_lines
from tests.compose.harness import record

pytestmark = pytest.mark.incremental

LINES = readme_lines("Monitoring", "docs/monitoring.md")
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
GRAFANA_IMAGE = COMPOSE["services"]["grafana"]["image"]
ALERTS = {
    rule["alert"]
    for group in yaml.safe_load((ROOT / "deploy/prometheus/alerts.yml").read_text())["groups"]
    for rule in group["rules"]
}
TOPIC = "compose-monitoring"


def line(command: str) -> str:
    (found,) = [text for text in LINES if text.startswith(command)]
    return found


def obtainable(stack: Stack, image: str) -> bool:
    """Tell whether the engine has the image or can pull it (30 s at most)."""
    argv = [["docker", "image", "inspect", image], ["docker", "pull", "-q", image]]
    for command in argv:
        try:
            done = subprocess.run(command, env=stack.env, capture_output=True, timeout=30)
        except subprocess.TimeoutExpired:
            return False
        if done.returncode == 0:
            return True
    return False


def prometheus(stack: Stack, path: str, **params: str) -> Any:
    response = requests.get(f"{stack.prometheus_url}{path}", params=params, timeout=10)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "success", body
    return body["data"]


def query(stack: Stack, expression: str) -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = prometheus(stack, "/api/v1/query", query=expression)["result"]
    return result


def events_by_outcome(text: str) -> dict[str, float]:
    """Map each outcome of aggregator_events_total in a /metrics text to its value."""
    found = {}
    for sample in text.splitlines():
        if sample.startswith('aggregator_events_total{outcome="'):
            labels, value = sample.rsplit(" ", 1)
            found[labels.split('"')[1]] = float(value)
    return found


@pytest.fixture(scope="module")
def grafana_here(stack: Stack, shout: Callable[[str], None]) -> bool:
    if obtainable(stack, GRAFANA_IMAGE):
        return True
    shout(
        f"GRAFANA WAS NOT RUN: {GRAFANA_IMAGE} cannot be pulled here (no registry answers) and "
        "no package ships Grafana's server (Debian, PyPI, npm); the monitoring profile runs "
        "without it, and tests/test_monitoring_files.py checks its provisioning statically"
    )
    return False


@pytest.fixture(scope="module")
def published(stack: Stack) -> dict[str, float]:
    """Publish 20 events and 5 duplicates through the proxy; return its totals by outcome."""
    metrics = requests.get(f"{stack.url}/metrics", headers=stack.auth(), timeout=30)
    assert metrics.status_code == 200, metrics.text
    before = events_by_outcome(metrics.text)
    received = stack.stats()["total_received_queued"]
    batch = [event(f"m-{n}", TOPIC) for n in range(20)]
    assert publish(stack, batch) == 202
    assert publish(stack, batch[:5]) == 202
    stack.settled(received + 25)
    return {**before, "stored": before["stored"] + 20, "duplicate": before["duplicate"] + 5}


def test_the_monitoring_profile_brings_up_prometheus_healthy_on_loopback(
    stack: Stack, grafana_here: bool
) -> None:
    if not (stack.directory / ".env").exists():  # this module alone
        stack.readme("cp .env.example .env && $EDITOR .env")
    # The Compose section left PROMETHEUS_TOKEN empty (plain `up` needs none): Prometheus's
    # container refuses to start without it, naming it, instead of scraping with no token.
    refused = stack.shell("docker compose --profile monitoring run --rm --no-deps prometheus")
    assert refused.returncode == 78, refused.stdout + refused.stderr
    assert "PROMETHEUS_TOKEN is empty" in refused.stdout + refused.stderr, refused.stderr
    stack.fill_monitoring_secrets()  # what the Monitoring section asks before its `up`
    command = line("docker compose --profile monitoring up -d --wait")
    if not grafana_here:
        # The documented line, less the one service whose image cannot be had here: every
        # other service of the profile named (compose pulls even for `--scale grafana=0`).
        services = stack.compose("--profile", "monitoring", "config", "--services").split()
        command = command.split(" #", 1)[0].rstrip()  # before the line's comment
        command += " " + " ".join(name for name in services if name != "grafana")
    started = time.monotonic()
    done = stack.shell(command, timeout=900)
    record("--profile monitoring up -d --wait: Prometheus healthy", started)
    assert done.returncode == 0, f"{command}\n{done.stdout}\n{done.stderr}"
    (row,) = stack.running("prometheus")
    assert row["Health"] == "healthy", row
    published = stack.compose("port", "prometheus", "9090").strip()
    assert published == stack.prometheus_url.removeprefix("http://"), published
    assert requests.get(f"{stack.prometheus_url}/-/ready", timeout=10).status_code == 200


def test_prometheus_scrapes_the_proxy_with_its_read_token(
    stack: Stack, published: dict[str, float]
) -> None:
    # The events are published first (the fixture): the scrape awaited here, Prometheus's
    # first, may count them already, so the wait for them below is often none.
    started = time.monotonic()
    target: dict[str, Any] = {}

    def scraped() -> bool:
        active = prometheus(stack, "/api/v1/targets", state="active")["activeTargets"]
        target.update(next((t for t in active if t["labels"]["job"] == "aggregator"), {}))
        return target.get("health") == "up"

    try:
        wait_until(scraped, timeout=60, interval=0.5)
    except TimeoutError:
        pytest.fail(f"the aggregator target is not up: {target}")
    record("Prometheus: 25 events published, first scrape of the proxy up", started)
    assert target["scrapeUrl"] == "http://proxy:8080/metrics", target
    (build,) = query(stack, 'aggregator_build_info{job="aggregator"}')
    assert build["metric"]["version"], build
    outcomes = {row["metric"]["outcome"] for row in query(stack, "aggregator_events_total")}
    assert outcomes == {"stored", "duplicate", "failed"}, outcomes
    # The token is in the file prometheus.yml names, for its user alone, and no longer
    # in the environment of the process that scrapes.
    mode = stack.compose("exec", "-T", "prometheus", "stat", "-c", "%a %u",
                         "/run/prometheus/aggregator-token")  # fmt: skip
    assert mode.split() == ["600", "65534"], mode
    environ = stack.compose("exec", "-T", "prometheus", "cat", "/proc/1/environ")
    assert stack.read_token not in environ and "PROMETHEUS_TOKEN" not in environ


def test_every_alert_rule_is_loaded_with_its_annotations_and_evaluates(stack: Stack) -> None:
    rules: list[dict[str, Any]] = []

    def evaluated() -> bool:
        groups = prometheus(stack, "/api/v1/rules")["groups"]
        rules[:] = [rule for group in groups for rule in group["rules"]]
        return bool(rules) and all(rule.get("health") == "ok" for rule in rules)

    try:
        wait_until(evaluated, timeout=60, interval=0.5)
    except TimeoutError:
        pytest.fail(f"rules not all evaluated without error: {rules}")
    assert {rule["name"] for rule in rules} == ALERTS
    for rule in rules:
        assert rule["annotations"].get("summary") and rule["annotations"].get("description")
    # A healthy stack fires nothing.
    firing = [rule["name"] for rule in rules if rule["state"] == "firing"]
    assert not firing, firing


def test_events_published_through_the_proxy_reach_prometheus(
    stack: Stack, published: dict[str, float]
) -> None:
    started = time.monotonic()
    seen: dict[str, float] = {}

    def counted() -> bool:
        rows = query(stack, "sum by (outcome) (aggregator_events_total)")
        seen.update({row["metric"]["outcome"]: float(row["value"][1]) for row in rows})
        return seen == published

    try:
        wait_until(counted, timeout=45, interval=0.5)
    except TimeoutError:
        pytest.fail(f"Prometheus has {seen}, expected {published}")
    record("Prometheus: the published events counted", started)
    ((_, total),) = [row["value"] for row in query(stack, "sum(aggregator_events_total)")]
    assert float(total) == sum(published.values())


def test_grafana_serves_the_provisioned_dashboard_from_prometheus(
    stack: Stack, grafana_here: bool
) -> None:
    if not grafana_here:
        pytest.skip(f"Grafana was not run: {GRAFANA_IMAGE} cannot be had here (see above)")
    # Not run on the machines this was written on (no registry): this step runs where the
    # image can be pulled.
    (row,) = stack.running("grafana")
    assert row["Health"] == "healthy", row
    auth = ("admin", stack.grafana_password)
    health = requests.get(
        f"{stack.grafana_url}/api/datasources/uid/prometheus/health", auth=auth, timeout=30
    )
    assert health.status_code == 200 and health.json()["status"] == "OK", health.text
    found = requests.get(
        f"{stack.grafana_url}/api/search", params={"query": "Log aggregator"}, auth=auth, timeout=30
    )
    assert found.status_code == 200, found.text
    assert [hit["uid"] for hit in found.json()] == ["log-aggregator"], found.text


def test_down_with_the_profile_removes_every_container_and_keeps_the_data(stack: Stack) -> None:
    started = time.monotonic()
    command = line("docker compose --profile monitoring down")
    done = stack.shell(command, timeout=300)
    assert done.returncode == 0, f"{command}\n{done.stdout}\n{done.stderr}"
    record("--profile monitoring down", started)
    assert not stack.containers()
    volumes = stack.shell("docker volume ls -q").stdout.split()
    assert f"{stack.env['COMPOSE_PROJECT_NAME']}_prometheusdata" in volumes, volumes
    assert set(LINES) == {
        line("docker compose --profile monitoring up -d --wait"),
        line("docker compose --profile monitoring down"),
    }, "docs/monitoring.md lines this test never ran"
