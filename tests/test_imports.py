"""Import rules (CONTRIBUTING.md): imports run one way; workers never load the web stack."""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

from scripts.stack import ROOT

WEB_STACK = ("flask", "flask_smorest", "werkzeug")
CLIENT_DIR = ROOT / "clients" / "python"
CLIENT = CLIENT_DIR / "src" / "aggregator_client"
# Where the repository's own Python code lives (the client's old name, publisher/, aside).
OWN_CODE = ("app", "tasks", "scripts", "bench", "tests", "migrations", "clients")


def imported_modules(path: str | Path) -> set[str]:
    """Return every module a source file imports, at any level of nesting."""
    tree = ast.parse((ROOT / path).read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
    return found


def top_level(names: set[str]) -> set[str]:
    return {name.split(".")[0] for name in names}


def test_only_app_api_imports_tasks() -> None:
    importers = sorted(
        str(path.relative_to(ROOT))
        for path in (ROOT / "app").rglob("*.py")
        if any(
            name == "tasks" or name.startswith("tasks.")
            for name in imported_modules(str(path.relative_to(ROOT)))
        )
    )
    assert importers == ["app/api.py"]


def test_the_client_imports_only_the_standard_library_and_what_it_declares() -> None:
    # Installed alone (its own distribution), it has nothing of the server: no app or
    # tasks, no Flask or Celery; only the dependencies its pyproject.toml names.
    project = tomllib.loads((CLIENT_DIR / "pyproject.toml").read_text())["project"]
    declared = {Requirement(line).name.replace("-", "_") for line in project["dependencies"]}
    allowed = declared | set(sys.stdlib_module_names) | {"__future__", "aggregator_client"}
    modules = sorted(CLIENT.rglob("*.py"))
    assert modules
    for path in modules:
        extra = top_level(imported_modules(path)) - allowed
        assert not extra, f"{path.relative_to(ROOT)} imports {sorted(extra)}"


def test_the_event_id_recipe_needs_only_the_standard_library() -> None:
    # Senders reimplement it, and the server imports it: no third-party module at all.
    names = top_level(imported_modules(CLIENT / "event_ids.py"))
    assert names <= set(sys.stdlib_module_names) | {"__future__"}


def test_only_the_old_name_itself_refers_to_publisher() -> None:
    # publisher/ is an alias of aggregator_client for code outside this repository; the
    # repository's own code uses the new name, so the alias can go without touching it.
    files = [path for part in OWN_CODE for path in (ROOT / part).rglob("*.py")]
    files += list(ROOT.glob("*.py"))
    users = sorted(
        str(path.relative_to(ROOT))
        for path in files
        if "publisher" in top_level(imported_modules(path))
    )
    assert users == ["tests/test_imports.py"]  # below: the alias is the same modules
    for path in (ROOT / "publisher").rglob("*.py"):
        assert top_level(imported_modules(path)) <= {"aggregator_client", "importlib", "sys"}


def test_the_old_name_is_the_same_modules() -> None:
    import aggregator_client.cli
    import aggregator_client.client
    import publisher.cli
    import publisher.client

    assert publisher.client is aggregator_client.client
    assert publisher.cli.main is aggregator_client.cli.main


def test_workers_and_settings_load_no_web_stack() -> None:
    probe = (
        "import sys, app.config, celery_config, tasks.ingest;"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {WEB_STACK!r}))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert loaded.stdout.strip() == "[]"
