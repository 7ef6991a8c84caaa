"""Install pip into a venv made without it (Debian without python3-venv), straight from PyPI."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path


def main() -> int:
    """Download the newest pip wheel and let it install itself."""
    with urllib.request.urlopen("https://pypi.org/pypi/pip/json", timeout=60) as response:
        release = json.load(response)
    wheel = next(f for f in release["urls"] if f["filename"].endswith(".whl"))
    target = Path(tempfile.mkdtemp()) / wheel["filename"]
    urllib.request.urlretrieve(wheel["url"], target)
    # A wheel is a zip that Python can run from: pip installs itself from it.
    return subprocess.call([sys.executable, f"{target}/pip", "install", "--quiet", str(target)])


if __name__ == "__main__":
    raise SystemExit(main())
