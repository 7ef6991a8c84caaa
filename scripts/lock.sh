#!/usr/bin/env bash
# Regenerate requirements-dev.lock and requirements.lock from pyproject.toml, with hashes.
#
#   scripts/lock.sh                          keep every pin that still fits, add what is new
#   scripts/lock.sh --upgrade                move everything to the newest versions
#   scripts/lock.sh --upgrade-package NAME   move one package (repeatable)
#
# Extra arguments go to both `uv pip compile` runs. The locks are for CPython 3.11 on Linux
# x86_64 (glibc, as in python:3.11-slim), whatever machine runs this script.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

UV_VERSION=0.13.9
PYTHON="${PYTHON:-$(command -v python3.11 || command -v python3)}"

# uv is only needed to write the locks, not to install from them, so it lives in its own
# venv outside the project and is not a dependency of the project.
TOOLS="${XDG_CACHE_HOME:-$HOME/.cache}/log-aggregator/uv-$UV_VERSION"
if [ ! -x "$TOOLS/bin/uv" ]; then
  rm -rf "$TOOLS"
  if ! "$PYTHON" -m venv "$TOOLS" 2>/dev/null; then
    rm -rf "$TOOLS"
    "$PYTHON" -m venv --without-pip "$TOOLS"
    "$TOOLS/bin/python" scripts/fetch_pip.py
  fi
  "$TOOLS/bin/python" -m pip install --quiet --disable-pip-version-check "uv==$UV_VERSION"
fi

# The client library (clients/python/, tool.uv.sources in pyproject.toml) is part of this
# repository: it is resolved from there, its dependencies are pinned, and it is itself left
# out of the locks (bootstrap.sh and the Dockerfile install it from its directory).
compile=(
  "$TOOLS/bin/uv" pip compile pyproject.toml
  --generate-hashes
  --python-version 3.11
  --python-platform x86_64-manylinux_2_28
  --custom-compile-command scripts/lock.sh
  --no-emit-package log-aggregator-client
  --quiet
)
# The dev lock is resolved first; the runtime lock is then held to the same versions
# (-c), so the image runs exactly what the tests ran.
"${compile[@]}" --extra dev -o requirements-dev.lock "$@"
"${compile[@]}" -c requirements-dev.lock -o requirements.lock "$@"
echo "wrote requirements-dev.lock and requirements.lock"
