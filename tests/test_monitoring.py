"""Monitoring: /metrics across hosts, and the dashboard and alerts in deploy/ that read it."""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import yaml
from prometheus_client import multiprocess

from scripts.services import RedisServer
from scripts.services import find_promtool
from scripts.services import find_redis_server
from scripts.services import free_port
from scripts.stack import Api
from scripts.stack import Flower
from scripts.stack import Worker
from scripts.stack import wait_until
from tests.helpers import make_event
from tests.helpers import publish
from tests.helpers import settled_stats

ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS = ROOT / "deploy" / "prometheus"
DASHBOARD = ROOT / "deploy" / "grafana" / "aggregator-dashboard.json"
# Series of Prometheus itself that the rules may use besides ours.
PROMETHEUS_OWN = {"up"}


def samples(text: str) -> dict[str, float]:
    """Map every sample line of a scrape, `name{labels}`, to its value."""
    return {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }


def sample_names(text: str) -> set[str]:
    return {re.split(r"[{ ]", line, maxsplit=1)[0] for line in samples(text)}


def dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]


def alert_queries() -> dict[str, str]:
    rules = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())
    return {rule["alert"]: rule["expr"] for group in rules["groups"] for rule in group["rules"]}


def series_in(expression: str) -> set[str]:
    """Return the metric names a PromQL expression reads (ours start aggregator_)."""
    names = set(re.findall(r"\baggregator_[a-z0-9_]+", expression))
    names |= {name for name in PROMETHEUS_OWN if re.search(rf"\b{name}\{{", expression)}
    return names


def promtool(*args: str, cwd: Path = PROMETHEUS) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(find_promtool()), *args], cwd=cwd, capture_output=True, text=True, timeout=60
    )


# --- the rules and the dashboard, checked by promtool -------------------------------------------


def test_alert_rules_pass_promtool_check_and_unit_tests() -> None:
    checked = promtool("check", "rules", "alerts.yml")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    # Every rule in the file was parsed.
    assert f"SUCCESS: {len(alert_queries())} rules found" in checked.stdout
    # alerts_test.yml: each alert fires on a synthetic series and stays quiet when healthy.
    tested = promtool("test", "rules", "alerts_test.yml")
    assert tested.returncode == 0, tested.stdout + tested.stderr
    tested_alerts = set(
        re.findall(r"alertname: (\w+)", (PROMETHEUS / "alerts_test.yml").read_text())
    )
    assert tested_alerts == set(alert_queries())
    config = promtool("check", "config", "--syntax-only", "prometheus.yml")
    assert config.returncode == 0, config.stdout + config.stderr


def test_every_dashboard_query_is_valid_promql(tmp_path: Path) -> None:
    # promtool parses a rule's expression fully: record each query as a rule.
    queries = dashboard_queries()
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:query_{n}", "expr": query}
                    for n, query in enumerate(queries)
                ],
            }
        ]
    }
    (tmp_path / "dashboard.yml").write_text(yaml.safe_dump(rules))
    checked = promtool("check", "rules", "dashboard.yml", cwd=tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    titles = {panel["title"] for panel in json.loads(DASHBOARD.read_text())["panels"]}
    assert {
        "Publish rate",
        "Events by outcome",
        "Lag: age of the oldest unstored batch",
        "Backlog depth",
        "5xx rate",
        "Latency p99",
        "Dependencies up",
        "Broker data loss",
    } <= titles


# --- the names they use are the names a live API exposes --------------------------------------


def test_every_series_of_the_dashboard_and_alerts_is_exposed_by_a_live_api(
    api: Api, worker: Worker, clean: None
) -> None:
    publish(api.url, [make_event(f"mon-{i}") for i in range(20)])
    publish(api.url, make_event("mon-0"))
    settled_stats(api.url, received=21)
    text = requests.get(f"{api.url}/metrics", timeout=10).text
    exposed = sample_names(text)
    used: dict[str, set[str]] = {}
    for where, query in [
        *(("dashboard", q) for q in dashboard_queries()),
        *(("alerts", q) for q in alert_queries().values()),
    ]:
        for name in series_in(query) - PROMETHEUS_OWN:
            used.setdefault(name, set()).add(where)
    missing = {name: where for name, where in used.items() if name not in exposed}
    assert not missing, f"used but not exposed: {missing}\nexposed: {sorted(exposed)}"
    # The label values they select exist too.
    assert re.search(r'aggregator_http_requests_total\{endpoint="events\.publish', text), text
    for outcome in ("stored", "duplicate", "failed"):
        assert f'aggregator_events_total{{outcome="{outcome}"}}' in text
    for dependency in ("database", "broker"):
        assert f'aggregator_dependency_up{{dependency="{dependency}"}} 1.0' in text


# --- several hosts, one directory ---------------------------------------------------------------


@pytest.fixture
def shared_metrics(
    stack_env: dict[str, str], scratch_dir: Path, logs: Path, clean: None
) -> Iterator[tuple[dict[str, str], Path]]:
    """A broker and a metrics directory of this test's own, for processes acting as hosts."""
    tag = uuid.uuid4().hex[:6]
    directory = scratch_dir / f"metrics-{tag}"
    directory.mkdir()
    broker = RedisServer(scratch_dir / f"redis-mon-{tag}", free_port(), find_redis_server())
    broker.start()
    yield (
        {**stack_env, "REDIS_URL": broker.url, "PROMETHEUS_MULTIPROC_DIR": str(directory)},
        (directory),
    )
    broker.stop()


def test_a_worker_on_another_host_reaches_the_apis_metrics(
    shared_metrics: tuple[dict[str, str], Path], logs: Path
) -> None:
    """API on "host-a", worker on "host-b", one directory: /metrics adds both up."""
    env, directory = shared_metrics
    api = Api({**env, "METRICS_INSTANCE": "host-a"}, logs / "mon-api.log", workers=2).start()
    worker = Worker({**env, "METRICS_INSTANCE": "host-b"}, logs / "mon-worker.log").start()
    try:
        publish(api.url, [make_event(f"host-{i}") for i in range(25)])
        settled_stats(api.url, received=25)
        files = sorted(path.name for path in directory.glob("*.db"))
        # Named after host and pid: two containers' pid 7 would be counter_host-a-7.db
        # and counter_host-b-7.db, never one file mapped by both.
        assert files and all(re.fullmatch(r"\w+_host-[ab]-\d+\.db", name) for name in files), files
        assert {name.split("_")[-1].rsplit("-", 1)[0] for name in files} == {"host-a", "host-b"}
        api_pids = {str(pid) for pid in api.worker_pids()}
        assert {name.rsplit("-", 1)[1][:-3] for name in files if "host-a" in name} <= api_pids

        def worker_counted() -> bool:
            figures = samples(requests.get(f"{api.url}/metrics", timeout=10).text)
            return figures.get('aggregator_worker_events_total{outcome="stored"}') == 25

        # Written by host-b's pool processes only (this directory is the test's own).
        wait_until(worker_counted, timeout=15)
        figures = samples(requests.get(f"{api.url}/metrics", timeout=10).text)
        assert figures["aggregator_task_duration_seconds_count"] >= 1
        labels = 'endpoint="events.publish_events",method="POST",status="202"'
        assert figures[f"aggregator_http_requests_total{{{labels}}}"] == 1
    finally:
        worker.stop()
        api.stop()


def test_the_api_exposes_only_the_aggregators_series_with_flower_running(
    shared_metrics: tuple[dict[str, str], Path], logs: Path
) -> None:
    """Flower beside API and worker leaves its flower_* series out of the API's /metrics."""
    env, directory = shared_metrics
    api = Api(env, logs / "mon-api.log", workers=2).start()
    worker = Worker(env, logs / "mon-worker.log").start()
    auth = f"admin:{uuid.uuid4().hex}"
    flower = Flower(env, logs / "mon-flower.log", auth=auth).start()
    try:
        headers = {"Authorization": "Basic " + base64.b64encode(auth.encode()).decode()}

        def flower_saw_a_task() -> bool:
            publish(api.url, make_event(f"fl-{uuid.uuid4().hex[:8]}"))
            text = requests.get(f"{flower.url}/metrics", headers=headers, timeout=10).text
            return "flower_events_total{" in text

        # Flower turns on the workers' events; then it counts them in its own series.
        wait_until(flower_saw_a_task, timeout=60, interval=0.5)
        shared = multiprocess.MultiProcessCollector(None, path=str(directory)).collect()
        assert not [family.name for family in shared if family.name.startswith("flower")]

        # Any other writer to the directory (here Flower's own metric definitions,
        # given the directory) stays out of the API's /metrics as well.
        foreign = subprocess.run(
            [
                sys.executable,
                "-c",
                "from flower.events import get_prometheus_metrics as m;"
                "m().events.labels('w1', 'task-received', 'tasks.ingest.store_batch').inc()",
            ],
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert foreign.returncode == 0, foreign.stderr
        shared = multiprocess.MultiProcessCollector(None, path=str(directory)).collect()
        assert "flower_events" in {family.name for family in shared}

        text = requests.get(f"{api.url}/metrics", timeout=10).text
        names = sample_names(text)
        assert names and all(name.startswith("aggregator_") for name in names), sorted(names)
        assert "aggregator_worker_events_total" in names
    finally:
        flower.stop()
        worker.stop()
        api.stop()


def test_every_dashboard_query_follows_the_job_and_env_variables() -> None:
    variables = {v["name"] for v in json.loads(DASHBOARD.read_text())["templating"]["list"]}
    assert {"job", "env"} <= variables
    for query in dashboard_queries():
        for selector in re.findall(r"\baggregator_[a-z0-9_]+(\{[^}]*\})?", query):
            assert 'job=~"$job"' in selector and 'env=~"$env"' in selector, query


def test_every_alert_says_what_it_means_and_what_to_do() -> None:
    rules = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            annotations = rule.get("annotations", {})
            assert annotations.get("summary") and annotations.get("description"), rule["alert"]
