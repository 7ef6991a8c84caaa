"""Import rules (CONTRIBUTING.md): imports run one way; workers never load the web stack."""

from __future__ import annotations

import ast
import subprocess
import sys

from scripts.stack import ROOT

WEB_STACK = ("flask", "flask_smorest", "werkzeug")


def imported_modules(path: str) -> set[str]:
    """Return every module a source file imports, at any level of nesting."""
    tree = ast.parse((ROOT / path).read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
    return found


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


def test_the_publisher_talks_http_only() -> None:
    for path in (ROOT / "publisher").rglob("*.py"):
        names = imported_modules(str(path.relative_to(ROOT)))
        assert not any(name.split(".")[0] in ("app", "tasks") for name in names), path


def test_the_event_id_recipe_needs_only_the_standard_library() -> None:
    # Senders reimplement it, and the client distribution ships it without dependencies.
    names = imported_modules("publisher/event_ids.py")
    assert {name.split(".")[0] for name in names} <= set(sys.stdlib_module_names) | {"__future__"}


def test_workers_and_settings_load_no_web_stack() -> None:
    probe = (
        "import sys, app.config, celery_config, tasks.ingest;"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {WEB_STACK!r}))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert loaded.stdout.strip() == "[]"
