"""A Docker engine, the stand-in base images, a copy of the repository and its stack.

The engine is the one already running, or Debian's docker.io started for the session and
stopped after it (deploy/standin/engine.sh); images the engine cannot pull are built from
Debian's packages (deploy/standin/build.sh) and kept for the next run. Where no engine can
be had (not root, not Debian) the tests are skipped with the reason on the terminal.
Each step's wall time is printed at the end of the run. The modules share one compose
project (`stack`): test_compose_stack.py leaves it running and empty, and the monitoring
profile's module adds Prometheus to it; the session's end removes it with its volumes.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from collections.abc import Iterator
from pathlib import Path

import pytest

from scripts.stack import ROOT
from tests.compose.harness import TIMINGS
from tests.compose.harness import Engine
from tests.compose.harness import Stack
from tests.compose.harness import record

STANDIN = ROOT / "deploy" / "standin"
# engine.sh's exit status when this machine cannot run an engine at all (as opposed to failing).
CANNOT_RUN_HERE = 3


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if TIMINGS:
        terminalreporter.section("compose: wall time per step")
        for step, seconds in TIMINGS.items():
            terminalreporter.write_line(f"{seconds:8.1f} s  {step}")


def say(config: pytest.Config, message: str) -> None:
    """Write to the terminal now, past pytest's capture (a skip must not go unnoticed)."""
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    capture = config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or capture is None:
        print(f"compose: {message}", file=sys.stderr)
        return
    with capture.global_and_fixture_disabled():
        for line in message.splitlines():
            reporter.write_line(f"compose: {line}", yellow=True, bold=True)


def run(argv: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def docker_engine(request: pytest.FixtureRequest) -> Iterator[Engine]:
    """A running engine with `docker compose`, the stand-ins and the wheel server for builds."""
    env = dict(os.environ)
    started = time.monotonic()
    done = run(["bash", str(STANDIN / "engine.sh"), "start"], env, timeout=900)
    if done.returncode == CANNOT_RUN_HERE:
        reason = f"no Docker engine can run here: {done.stderr.strip()}"
        say(request.config, f"SKIPPING the compose tests: {reason}")
        pytest.skip(reason)
    assert done.returncode == 0, f"engine.sh start failed:\n{done.stderr}"
    record("engine: found or installed, and started", started)
    wheels: subprocess.Popen[bytes] | None = None
    try:
        done = run(["bash", str(STANDIN / "engine.sh"), "env"], env, timeout=300)
        assert done.returncode == 0, f"engine.sh env failed:\n{done.stderr}"
        for line in done.stdout.splitlines():
            name, _, value = line.partition("=")
            env[name] = value
        started = time.monotonic()
        done = run(["bash", str(STANDIN / "build.sh"), "images"], env, timeout=1800)
        assert done.returncode == 0, f"build.sh images failed:\n{done.stderr}"
        say(request.config, done.stderr.strip())
        record("base images: pulled, built from Debian's packages, or cached", started)
        started = time.monotonic()
        done = run(["bash", str(STANDIN / "build.sh"), "wheels"], env, timeout=600)
        assert done.returncode == 0, f"build.sh wheels failed:\n{done.stderr}"
        record("wheels of requirements.lock for the image build", started)
        # Serves the wheels on the engine's bridge; a reused engine of another address
        # range does not need it (its python image has its own index).
        wheels = subprocess.Popen(
            ["bash", str(STANDIN / "build.sh"), "serve-wheels"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        yield Engine(env)
    finally:
        if wheels is not None:
            wheels.terminate()
            wheels.wait(timeout=10)
        started = time.monotonic()
        run(["bash", str(STANDIN / "engine.sh"), "stop"], env, timeout=300)
        record("engine: stopped (when this run started it)", started)


@pytest.fixture(scope="session")
def project_dir() -> Iterator[Path]:
    """A copy of the repository's files (tracked, or new and not ignored), as a clone has them."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    target = Path(tempfile.mkdtemp(prefix="agg-compose-"))
    for name in filter(None, listed.split("\0")):
        source = ROOT / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    try:
        yield target
    finally:
        shutil.rmtree(target, ignore_errors=True)


@pytest.fixture(scope="session")
def stack(docker_engine: Engine, project_dir: Path) -> Iterator[Stack]:
    """The compose project in the copy of the repository, removed with its data at the end."""
    stack = Stack(docker_engine, project_dir)
    yield stack
    stack.shell(
        "docker compose --profile publish --profile monitoring down -v --remove-orphans",
        timeout=300,
    )


@pytest.fixture(scope="session")
def shout(request: pytest.FixtureRequest) -> Callable[[str], None]:
    """Write a line to the terminal past pytest's capture, in yellow (what was not run, and why)."""
    return lambda message: say(request.config, message)


# The scenario is a sequence: once a step fails, the later ones are reported as not run
# instead of failing for the same reason (pytest's "incremental" recipe).
_failed_step: dict[str, str] = {}


def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> None:
    failed = call.excinfo is not None and not call.excinfo.errisinstance(pytest.skip.Exception)
    if "incremental" in item.keywords and failed and call.when != "teardown":
        _failed_step.setdefault(str(item.path), item.name)


def pytest_runtest_setup(item: pytest.Item) -> None:
    if "incremental" in item.keywords and str(item.path) in _failed_step:
        pytest.xfail(f"an earlier step failed: {_failed_step[str(item.path)]}")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "incremental: later tests of the module need earlier ones")
