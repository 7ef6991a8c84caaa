"""The lock files agree with pyproject.toml: every dependency pinned, in range, with hashes."""

import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]
# Distributions of this repository (tool.uv.sources paths, e.g. the client library): installed
# from their directory, so not pinned; their own dependencies are locked in their place.
LOCAL = {
    canonicalize_name(name): ROOT / source["path"]
    for name, source in PYPROJECT["tool"]["uv"]["sources"].items()
    if "path" in source
}


def requirements(lines: list[str]) -> list[Requirement]:
    """Parse requirements, replacing each local distribution by its own dependencies."""
    found: list[Requirement] = []
    for line in lines:
        requirement = Requirement(line)
        name = canonicalize_name(requirement.name)
        if name in LOCAL:
            local = tomllib.loads((LOCAL[name] / "pyproject.toml").read_text())["project"]
            found.extend(requirements(local["dependencies"]))
        else:
            found.append(requirement)
    return found


RUNTIME = requirements(PROJECT["dependencies"])
DEV = requirements(PROJECT["optional-dependencies"]["dev"])
# The locks are written for CPython 3.11 on Linux x86_64 (scripts/lock.sh).
TARGET = {
    "python_version": "3.11",
    "python_full_version": "3.11.0",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "os_name": "posix",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
    "extra": "",
}
RELOCK = "run scripts/lock.sh and commit both lock files"


def parse_lock(name: str) -> dict[str, tuple[Version, list[str], list[str]]]:
    """Map each package pinned in a lock file to its version, its hashes and its 'via' lines."""
    text = re.sub(r"\\\n", " ", (ROOT / name).read_text())
    pins: dict[str, tuple[Version, list[str], list[str]]] = {}
    current = ""
    for line in text.splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            # uv writes what asked for a package in comments under its pin.
            comment = line.strip().lstrip("#").strip()
            # Indented, under a pin; a trailer at the margin lists what was left out.
            if current and comment and line.startswith(" "):
                pins[current][2].append(comment)
            continue
        requirement, *options = line.split()
        assert "==" in requirement and ";" not in line, f"{name}: not an exact pin: {line}"
        package, _, version = requirement.partition("==")
        current = canonicalize_name(package)
        hashes = [option for option in options if option.startswith("--hash=sha256:")]
        assert len(hashes) == len(options), f"{name}: unexpected options: {line}"
        pins[current] = (Version(version), hashes, [])
    return pins


LOCKS = {"requirements.lock": RUNTIME, "requirements-dev.lock": RUNTIME + DEV}


def applies(requirement: Requirement) -> bool:
    return requirement.marker is None or requirement.marker.evaluate(TARGET)


@pytest.mark.parametrize("lock", sorted(LOCKS))
def test_every_dependency_is_pinned_within_its_range(lock: str) -> None:
    pins = parse_lock(lock)
    for requirement in filter(applies, LOCKS[lock]):
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirement} is not in {lock}: {RELOCK}"
        version = pins[name][0]
        assert requirement.specifier.contains(version, prereleases=True), (
            f"{lock} pins {name}=={version}, outside {requirement}: {RELOCK}"
        )


@pytest.mark.parametrize("lock", sorted(LOCKS))
def test_every_pin_carries_a_hash(lock: str) -> None:
    pins = parse_lock(lock)
    assert pins
    for name, (_, hashes, _) in pins.items():
        assert hashes, f"{lock}: {name} has no --hash: {RELOCK}"


@pytest.mark.parametrize("lock", sorted(LOCKS))
def test_nothing_is_locked_for_a_dependency_pyproject_dropped(lock: str) -> None:
    wanted = {canonicalize_name(requirement.name) for requirement in LOCKS[lock]}
    for name, (_, _, via) in parse_lock(lock).items():
        # uv writes "via NAME", or "via" and then one NAME per line.
        asked_by = {words[0] for line in via if (words := line.removeprefix("via").split())}
        if "log-aggregator" in asked_by or asked_by & set(LOCAL):
            assert name in wanted, f"{lock} pins {name} for pyproject, which dropped it: {RELOCK}"


@pytest.mark.parametrize("lock", sorted(LOCKS))
def test_the_repositorys_own_distributions_are_not_pinned(lock: str) -> None:
    # They are installed from their directories; a pin would ask an index for them.
    assert LOCAL and not set(LOCAL) & set(parse_lock(lock))


def test_the_image_runs_the_versions_the_tests_ran() -> None:
    runtime, dev = parse_lock("requirements.lock"), parse_lock("requirements-dev.lock")
    for name, (version, hashes, _) in runtime.items():
        assert name in dev, f"{name} is in requirements.lock only: {RELOCK}"
        assert (version, hashes) == dev[name][:2], f"{name} differs between the locks: {RELOCK}"
