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
# Install exactly what requirements-dev.lock pins (scripts/lock.sh writes it), every file
# checked against its hash, then the project itself without touching those pins. Skip
# both when the lock and pyproject.toml are what the last install used.
stamp="$(cat requirements-dev.lock pyproject.toml | sha256sum)"
if [ "$(cat .venv/.installed 2>/dev/null)" != "$stamp" ]; then
  pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
  "${pip[@]}" --require-hashes -r requirements-dev.lock
  "${pip[@]}" --no-deps -e .
  echo "$stamp" > .venv/.installed
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
