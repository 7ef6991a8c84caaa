#!/usr/bin/env bash
# The whole test suite against real services; extra arguments go to pytest.
source "$(dirname "$0")/bootstrap.sh"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/python -m mypy
# Locate (or install) the PostgreSQL and Redis binaries the tests start privately.
eval "$(.venv/bin/python -m scripts.services binaries | sed 's/^/export /')"
exec .venv/bin/python -m pytest "$@"
