"""Picked up by `gunicorn ...` run from the repository root; the settings live in app/."""

from app.gunicorn_conf import *  # noqa: F403
