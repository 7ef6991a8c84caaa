"""The Flask application factory; importing this package starts nothing.

It does not even import Flask: every import of app.config, app.db or app.store
(the workers' too) runs this file first, so the factory imports the web stack,
and the modules that need it, inside the function (as it imports the
blueprints). What it does import (settings, engine, Redis client, logs) the
workers load anyway.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING

from app.config import Settings
from app.config import load_settings
from app.db import make_engine
from app.logs import RequestIds
from app.redis_client import make_redis

if TYPE_CHECKING:
    from flask import Flask
    from flask import Response

DOCS_ASSETS = "/docs/assets"


def _docs_asset(filename: str) -> Response:
    from flask import send_from_directory
    from swagger_ui_bundle import swagger_ui_path

    return send_from_directory(swagger_ui_path, filename, max_age=3600)


def create_app(settings: Settings | None = None) -> Flask:
    """Create the API application, with its own engine and Redis client."""
    from flask import Flask
    from flask_smorest import Api

    from app.api import BLUEPRINTS
    from app.api import attach_queue
    from app.api import reject_unknown_query_parameters
    from app.auth import init_auth
    from app.bodies import LargeBodies
    from app.bodies import refuse_unread_bodies
    from app.derived_ids import derived_ids
    from app.errors import register_error_handlers
    from app.followers import LogHead
    from app.headers import add_security_headers
    from app.metrics import init_metrics
    from app.proxies import TrustedProxyFix
    from app.schemas import EventSchema

    settings = settings or load_settings()
    app = Flask(__name__)
    app.config.update(
        API_TITLE="log-aggregator",
        API_VERSION="1.0",
        OPENAPI_VERSION="3.0.3",
        OPENAPI_URL_PREFIX="/",
        OPENAPI_JSON_PATH="openapi.json",
        # Interactive docs from the installed swagger-ui-bundle, never a CDN.
        OPENAPI_SWAGGER_UI_PATH="/docs",
        OPENAPI_SWAGGER_UI_URL=f"{DOCS_ASSETS}/",
        API_SPEC_OPTIONS={
            "security": [{"bearerAuth": []}],
            "components": {
                "securitySchemes": {
                    "bearerAuth": {
                        "type": "http",
                        "scheme": "bearer",
                        "description": "A token from API_TOKENS; its scopes decide what it"
                        " may do (docs/api.md, Who may do what).",
                    }
                }
            },
        },
        MAX_CONTENT_LENGTH=settings.max_body_bytes,
        RETRY_AFTER=settings.retry_after,
        BODY_READ_TIMEOUT=settings.body_read_timeout,
        EVENTS_PAGE_MAX_BYTES=settings.events_page_max_bytes,
    )
    # Gunicorn runs this factory in each worker after the fork, so every
    # process gets its own pools; nothing connects until the first request.
    timeouts = settings.db_timeouts("api")
    app.extensions["engine"] = make_engine(
        settings.database_url,
        pool_size=settings.pool_size,
        timeouts=timeouts,
        network=settings.db_network,
    )
    # Exports and waiting followers read on a few connections of their own, so
    # however many there are, pages, /stats and publishes keep theirs.
    app.extensions["stream_engine"] = make_engine(
        settings.database_url,
        pool_size=settings.stream_pool_size,
        max_overflow=0,
        timeouts=timeouts,
        network=settings.db_network,
    )
    # /ready, /metrics and the followers' LogHead: one more, so a process whose
    # pools are busy reading still answers that the database is up.
    app.extensions["probe_engine"] = make_engine(
        settings.database_url,
        pool_size=1,
        max_overflow=1,
        timeouts=timeouts,
        network=settings.db_network,
    )
    # No quiet retries: redis-py's default would stretch a stall into seconds;
    # the client retries instead, with its idempotency key.
    app.extensions["redis"] = make_redis(settings)
    # The rate limiter's background sync has its own connections, so it never
    # holds one that an acceptance is waiting for.
    app.extensions["redis_limits"] = make_redis(settings)
    app.extensions["started_at"] = time.monotonic()
    attach_queue(app, settings)

    if settings.proxy_hops:
        # Behind a proxy the peer is the proxy: take the client's address from
        # the X-Forwarded-For entries the trusted proxies added, when the peer
        # is one of them (app.proxies).
        app.wsgi_app = TrustedProxyFix(  # type: ignore[method-assign]
            app.wsgi_app, settings.proxy_hops, settings.trusted_proxies
        )
    # Outermost, so every answer (errors and 404s included) carries the request id.
    app.wsgi_app = RequestIds(app.wsgi_app)  # type: ignore[method-assign]
    app.extensions["followers"] = threading.BoundedSemaphore(settings.max_followers)
    app.extensions["log_head"] = LogHead(app.extensions["probe_engine"])
    app.extensions["exports"] = threading.BoundedSemaphore(settings.max_exports)
    app.extensions["large_bodies"] = LargeBodies(
        settings.max_large_bodies, settings.large_body_wait
    )
    app.extensions["derived_ids"] = derived_ids(settings.derive_event_id_topics)
    api = Api(app)
    app.add_url_rule(f"{DOCS_ASSETS}/<path:filename>", "docs_assets", _docs_asset)
    init_auth(app, app.extensions["redis_limits"], settings)
    app.before_request(refuse_unread_bodies)
    app.before_request(reject_unknown_query_parameters)
    app.after_request(add_security_headers)
    init_metrics(app)
    api.spec.components.schema("Event", schema=EventSchema)
    for blueprint in BLUEPRINTS:
        api.register_blueprint(blueprint)
    # Registered after Api(), which installs its own HTTPException handler.
    register_error_handlers(app)
    return app
