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
# checked against its hash, then the client library (clients/python/, its own
# distribution) and the server, both editable, without touching those pins. Skip all
# when the lock and both pyproject.toml files are what the last install used.
stamp="$(cat requirements-dev.lock pyproject.toml clients/python/pyproject.toml | sha256sum)"
if [ "$(cat .venv/.installed 2>/dev/null)" != "$stamp" ]; then
  pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
  "${pip[@]}" --require-hashes -r requirements-dev.lock
  # The client last: it owns the `aggregator` script, which a venv from before the split
  # has under the server's name, and reinstalling the server removes it.
  "${pip[@]}" --no-deps -e .
  "${pip[@]}" --no-deps -e ./clients/python
  echo "$stamp" > .venv/.installed
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
