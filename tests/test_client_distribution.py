"""The client installs alone: a fresh venv, `pip install clients/python`, and nothing of the server.

pip resolves the client's dependencies from the package index as a user's
would (PyPI, or the machine's configured mirrors); the build runs on a copy of
the directory, so the checkout is left as it was.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from scripts.stack import ROOT

CLIENT = ROOT / "clients" / "python"
# Without the checkout on the path (scripts/test.sh sets PYTHONPATH to it).
ENV = {name: value for name, value in os.environ.items() if name != "PYTHONPATH"}
# The server's own dependencies: none may come with the client.
SERVER_ONLY = ("flask", "celery", "sqlalchemy", "gevent", "psycopg2", "flower", "redis", "kombu")


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("client-alone")
    source = shutil.copytree(CLIENT, root / "source", ignore=shutil.ignore_patterns("*.egg-info"))
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120, env=ENV)
    install = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", str(source)],
        capture_output=True,
        text=True,
        timeout=600,
        env=ENV,
    )
    assert install.returncode == 0, install.stderr
    return venv


def installed(venv: Path) -> dict[str, str]:
    listing = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "list", "--format=json"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
        env=ENV,
    )
    return {
        canonicalize_name(row["name"]): row["version"]
        for row in json.loads(listing.stdout)
        if canonicalize_name(row["name"]) not in ("pip", "setuptools", "wheel")
    }


def test_the_client_alone_brings_only_its_declared_dependencies(client_venv: Path) -> None:
    project = tomllib.loads((CLIENT / "pyproject.toml").read_text())["project"]
    declared = {canonicalize_name(Requirement(line).name) for line in project["dependencies"]}
    closure = installed(client_venv)
    print(f"client closure: {len(closure)} distributions: {sorted(closure.items())}")
    # The server's runtime lock pins 52; the client's dependencies have none of their own.
    assert set(closure) == declared | {"log-aggregator-client"}


def test_the_command_runs_and_the_server_is_not_there(client_venv: Path) -> None:
    python = str(client_venv / "bin" / "python")
    version = subprocess.run(
        [str(client_venv / "bin" / "aggregator"), "--version"],
        capture_output=True,
        text=True,
        timeout=60,
        env=ENV,
    )
    assert version.returncode == 0, version.stderr
    assert version.stdout.startswith("aggregator 0.1.0 (log-aggregator-client)")
    imports = "import aggregator_client.cli, aggregator_client.logging, aggregator_client.client"
    subprocess.run([python, "-c", imports], check=True, timeout=60, cwd=client_venv, env=ENV)
    for module in (*SERVER_ONLY, "app", "tasks", "publisher"):
        # Run outside the checkout, so its top-level packages are not importable by path.
        probe = subprocess.run(
            [python, "-c", f"import {module}"],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=client_venv,
            env=ENV,
        )
        assert probe.returncode == 1 and "ModuleNotFoundError" in probe.stderr, module
