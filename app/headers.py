"""Headers every answer carries so browsers never treat it as something else: nosniff and a CSP."""

from __future__ import annotations

import base64
import hashlib
import re

from flask import Response

NOSNIFF = ("X-Content-Type-Options", "nosniff")
# JSON and NDJSON answers: nothing to load, run or frame.
API_POLICY = "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
# The /docs page (Swagger UI): its scripts and styles from this server, its one
# inline script by hash (no 'unsafe-inline' for scripts), and the API document.
DOCS_POLICY = (
    "default-src 'none'; script-src 'self' {hashes}; style-src 'self' 'unsafe-inline';"
    " img-src 'self' data:; connect-src 'self'; font-src 'self'; frame-ancestors 'none';"
    " base-uri 'none'; form-action 'none'"
)
_INLINE_SCRIPT = re.compile(rb"<script>(.*?)</script>", re.S)


def _script_hashes(page: bytes) -> str:
    digests = (hashlib.sha256(script).digest() for script in _INLINE_SCRIPT.findall(page))
    return " ".join(f"'sha256-{base64.b64encode(digest).decode()}'" for digest in digests)


def add_security_headers(response: Response) -> Response:
    """Add nosniff and a Content-Security-Policy fitting the answer (after_request)."""
    response.headers.setdefault(*NOSNIFF)
    if "Content-Security-Policy" not in response.headers:
        if response.mimetype == "text/html" and not response.is_streamed:
            policy = DOCS_POLICY.format(hashes=_script_hashes(response.get_data()))
        else:
            policy = API_POLICY
        response.headers["Content-Security-Policy"] = policy
    return response
