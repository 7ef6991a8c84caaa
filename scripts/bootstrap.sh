# Sourced by demo.sh and test.sh: create .venv and install the project into it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON="${PYTHON:-$(command -v python3.11 || command -v python3)}"
if [ ! -x .venv/bin/python ]; then
  if ! "$PYTHON" -m venv .venv 2>/dev/null; then
    # Debian without python3-venv has no ensurepip: make the venv bare and
    # fetch pip itself from PyPI.
    rm -rf .venv
    "$PYTHON" -m venv --without-pip .venv
    .venv/bin/python scripts/fetch_pip.py
  fi
fi
# Reinstall only when pyproject.toml changed since the last install.
if [ ! -f .venv/.installed ] || [ pyproject.toml -nt .venv/.installed ]; then
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
  touch .venv/.installed
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
