"""CONTRIBUTING.md's module map lists every module of the tree, and nothing that is gone."""

from __future__ import annotations

import re

from scripts.stack import ROOT

PACKAGES = ("app", "tasks", "publisher", "clients/python/src/aggregator_client", "scripts", "bench")
TOP_LEVEL = ("celery_config.py", "gunicorn.conf.py", "locustfile.py", "migrations/env.py")


def mapped_paths() -> set[str]:
    text = (ROOT / "CONTRIBUTING.md").read_text()
    table = text[text.index("## Module map") :]
    return set(re.findall(r"^\| `([^`]+\.py)` \|", table, re.M))


def tree_paths() -> set[str]:
    found = {str(path.relative_to(ROOT)) for pkg in PACKAGES for path in (ROOT / pkg).rglob("*.py")}
    # Test modules say what they prove in their docstrings; the map lists the shared ones.
    found |= {
        str(path.relative_to(ROOT))
        for path in (ROOT / "tests").rglob("*.py")
        if not path.name.startswith("test_") and path.name != "__init__.py"
    }
    return found | {path for path in TOP_LEVEL if (ROOT / path).exists()}


def test_the_module_map_matches_the_tree() -> None:
    mapped, tree = mapped_paths(), tree_paths()
    assert sorted(tree - mapped) == [], "modules missing from CONTRIBUTING.md"
    assert sorted(mapped - tree) == [], "CONTRIBUTING.md lists modules that are gone"
