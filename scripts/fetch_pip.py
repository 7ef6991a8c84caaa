"""Install pip into a venv made without it (Debian without python3-venv), straight from PyPI."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tempfile
import urllib.parse
import urllib.request
from pathlib import Path


def main() -> int:
    """Download the newest pip wheel and let it install itself."""
    with urllib.request.urlopen("https://pypi.org/pypi/pip/json", timeout=60) as response:
        release = json.load(response)
        base = response.url
    wheel = next(f for f in release["urls"] if f["filename"].endswith(".whl"))
    target = Path(tempfile.mkdtemp()) / wheel["filename"]
    # Some PyPI front ends answer with file URLs relative to the JSON document.
    urllib.request.urlretrieve(urllib.parse.urljoin(base, wheel["url"]), target)
    if hashlib.sha256(target.read_bytes()).hexdigest() != wheel["digests"]["sha256"]:
        raise SystemExit(f"{wheel['filename']}: sha256 differs from PyPI's")
    # A wheel is a zip that Python can run from: pip installs itself from it.
    return subprocess.call([sys.executable, f"{target}/pip", "install", "--quiet", str(target)])


if __name__ == "__main__":
    raise SystemExit(main())
