"""/docs in a real headless browser (Debian's Chromium): Swagger UI renders every operation
from local assets, without a token."""

from __future__ import annotations

import re
import subprocess

import requests

from scripts.services import find_chromium
from scripts.stack import Api


def test_swagger_ui_renders_every_documented_operation(api: Api) -> None:
    spec = requests.get(f"{api.url}/openapi.json", timeout=10).json()
    documented = set(spec["paths"])
    page = subprocess.run(
        [
            str(find_chromium()),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            # Let the page fetch /openapi.json and render before the DOM is dumped.
            "--virtual-time-budget=10000",
            "--dump-dom",
            f"{api.url}/docs",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    rendered = set(re.findall(r'class="opblock-summary-path" data-path="([^"]+)"', page))
    assert rendered == documented, (documented - rendered, rendered - documented)
    assert "swagger-ui" in page
