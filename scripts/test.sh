#!/usr/bin/env bash
# The whole test suite against real services; extra arguments go to pytest.
source "$(dirname "$0")/bootstrap.sh"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/python -m mypy
# Locate (or install) the PostgreSQL and Redis binaries the tests start privately.
eval "$(.venv/bin/python -m scripts.services binaries | sed 's/^/export /')"
if [ $# -gt 0 ]; then
  exec .venv/bin/python -m pytest "$@"
fi
# The whole suite: first tests/compose (images built, containers run; minutes on a fresh
# machine) as its own run with its own timings, then the rest, whose summary closes the output.
status=0
.venv/bin/python -m pytest -rs --durations=10 tests/compose || status=$?
.venv/bin/python -m pytest --durations=30 --ignore=tests/compose || status=$?
exit "$status"
