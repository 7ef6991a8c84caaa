"""Structured logs: one JSON object per line for every process, and the request id of HTTP requests.

Every line has `time` (ISO 8601, UTC), `level` (DEBUG ... CRITICAL), `logger` and `message`,
then whatever the context holds (`request_id` in the API, `task_id`, `task` and `batch_id` in
the worker) and the record's `extra` fields; `exception` holds the traceback as a string.
The API, gunicorn (GunicornLogger) and Celery (tasks/__init__.py) all use configure_logging.
"""

from __future__ import annotations

import logging
import re
import sys
import time
import uuid
from collections.abc import Callable
from collections.abc import Iterable
from datetime import timedelta
from typing import Any

import orjson
import structlog
from gunicorn import glogging
from structlog.contextvars import bind_contextvars
from structlog.contextvars import clear_contextvars
from structlog.contextvars import merge_contextvars
from structlog.stdlib import ExtraAdder
from structlog.stdlib import ProcessorFormatter
from structlog.typing import EventDict
from structlog.typing import WrappedLogger

from app.config import load_log_level

REQUEST_ID_HEADER = "X-Request-ID"
_REQUEST_ID_ENVIRON = "HTTP_X_REQUEST_ID"
# A client's id is kept only when it cannot mislead a reader of the logs: bounded,
# and made of characters that need no escaping (uuids, hex, base64, ULIDs fit).
_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")

WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


def request_id_from(header: str | None) -> str:
    """Return the client's request id when it is sane, else a new one (uuid4 hex)."""
    if header and _SANE_REQUEST_ID.fullmatch(header):
        return header
    return uuid.uuid4().hex


def _from_record(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    # Taken from the LogRecord, so a line tells when it was logged, not formatted.
    record: logging.LogRecord = event_dict["_record"]
    created = record.created
    event_dict["time"] = (
        time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))
        + f".{int(created % 1 * 1000):03d}Z"
    )
    event_dict["level"] = record.levelname
    event_dict["logger"] = record.name
    return event_dict


def _render(_: WrappedLogger, __: str, event_dict: EventDict) -> str:
    # The four fields every line has come first, so a line reads well by eye too.
    line = {
        "time": event_dict.pop("time"),
        "level": event_dict.pop("level"),
        "logger": event_dict.pop("logger"),
        "message": event_dict.pop("event"),
        **event_dict,
    }
    # repr() for anything JSON has no type for, rather than losing the line.
    return orjson.dumps(line, default=repr).decode()


def json_formatter() -> ProcessorFormatter:
    """Return the formatter that turns any LogRecord into one JSON line."""
    return ProcessorFormatter(
        # Records from the standard library's loggers (ours, gunicorn's, Celery's).
        foreign_pre_chain=[merge_contextvars, ExtraAdder()],
        processors=[
            _from_record,
            structlog.processors.format_exc_info,
            ProcessorFormatter.remove_processors_meta,
            _render,
        ],
    )


def configure_logging(level: str) -> None:
    """Send every log record of this process to stderr as JSON lines, from `level` up."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(json_formatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Python's warnings would otherwise be printed as text.
    logging.captureWarnings(True)
    # structlog's own loggers, should anyone use them, end in the same handler.
    structlog.configure(
        processors=[
            merge_contextvars,
            structlog.stdlib.filter_by_level,
            ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )


class RequestIds:
    """WSGI middleware: every request gets an id, on each of its log lines and in its answer."""

    def __init__(self, app: WsgiApp) -> None:
        self.app = app

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        request_id = request_id_from(environ.get(_REQUEST_ID_ENVIRON))
        # Context variables belong to the greenlet (or thread) serving the
        # request, and a keep-alive connection serves several requests in one.
        clear_contextvars()
        bind_contextvars(request_id=request_id)

        def start(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            headers.append((REQUEST_ID_HEADER, request_id))
            return start_response(status, headers, exc_info)

        return self.app(environ, start)


class GunicornLogger(glogging.Logger):
    """gunicorn's error and access logs as JSON lines; its handlers and files are kept."""

    def setup(self, cfg: Any) -> None:
        super().setup(cfg)
        level = load_log_level()
        configure_logging(level)
        self.error_log.setLevel(level)
        formatter = json_formatter()
        for log in (self.error_log, self.access_log):
            for handler in log.handlers:
                handler.setFormatter(formatter)

    def access(self, resp: Any, req: Any, environ: dict[str, Any], request_time: timedelta) -> None:
        """Log one line per request with the client's address; request_id (and batch_id) too."""
        # Called in the greenlet or thread that served the request, after the answer.
        # Read from environ and the status line: every worker class passes those
        # (gevent_pywsgi passes headers instead of a request object).
        if self.access_log_enabled:
            method = environ.get("REQUEST_METHOD", "-")
            path = environ.get("PATH_INFO", "-")
            status = resp.status
            if isinstance(status, str):
                status = int(status.split(None, 1)[0])
            # The client's address: the peer's, or the one a trusted proxy named
            # (app.proxies rewrites REMOTE_ADDR in this same environ and keeps
            # the peer's under werkzeug's key).
            client = environ.get("REMOTE_ADDR", "-")
            fields = {
                "method": method,
                "path": path,
                "status": status,
                "client": client,
                "duration_ms": round(request_time.total_seconds() * 1000, 3),
            }
            proxied = environ.get("werkzeug.proxy_fix.orig")
            if proxied and proxied.get("REMOTE_ADDR") not in (None, client):
                fields["peer"] = proxied["REMOTE_ADDR"]
            self.access_log.info("%s %s %s %s", client, method, path, status, extra=fields)
        clear_contextvars()
