"""Picked up by `gunicorn ...` run from the repository root; the settings live in app/."""

import os

# gevent must patch the standard library before anything imports it (importing
# app/ below brings in redis, ssl and threading); with another worker class
# nothing is patched. The default matches ServerSettings in app/config.py.
# Empty counts as unset, as load_server_settings reads it.
if (os.environ.get("GUNICORN_WORKER_CLASS") or "gevent") == "gevent":
    from gevent import monkey

    monkey.patch_all()

from app.gunicorn_conf import *  # noqa: F403
