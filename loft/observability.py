"""Logs and request metrics that web and worker share.

- **Structured logs**: every record is one JSON line (``JsonFormatter``) carrying the ids of
  what it is about, the job and the organization, wherever the code running knows them:
  ``log_fields(job_id=…)`` binds them for a block, and ``bind_log_fields`` for the rest of
  the current request or task; each record takes them when it is made.
  ``LOFT_LOG_FORMAT=plain`` gives classic lines for a terminal.
- **HTTP latency**: ``RequestMetricsMiddleware`` times each request into a histogram labelled
  by the matched route (not the raw path, whose ids would make a series per object) and the
  method (one of a fixed few, else "other"), and logs one line per request. Under gunicorn,
  ``PROMETHEUS_MULTIPROC_DIR`` lets ``/metrics`` add up every web process's figures
  (jobs/metrics.py).
"""

from __future__ import annotations

import json
import logging
import os
import time
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime

from prometheus_client import Histogram

# The ids a log line can name; anything else a caller binds is ignored.
CONTEXT_FIELDS = ("job_id", "org_id", "evaluation_id", "adapter_id", "request_id")

# Never mutated in place: each change sets a new dict, so a reset restores the old one.
_log_context: ContextVar[dict | None] = ContextVar("loft_log_context", default=None)


def current_log_fields() -> dict:
    return _log_context.get() or {}


def bind_log_fields(**fields) -> None:
    """Add ids to every later log line of the current request or task."""
    known = {k: v for k, v in fields.items() if k in CONTEXT_FIELDS and v}
    if known:
        _log_context.set({**current_log_fields(), **known})


@contextmanager
def log_fields(**fields):
    """Ids on every log line written inside the block, and not after it."""
    token = _log_context.set(current_log_fields())
    bind_log_fields(**fields)
    try:
        yield
    finally:
        _log_context.reset(token)


def install_log_record_factory() -> None:
    """Every log record made from now on carries the ids bound at that moment, as
    ``record.loft_context``; any handler, pytest's included, sees them. (Called once, from
    LoftConfig.ready.)"""
    previous = logging.getLogRecordFactory()
    if getattr(previous, "adds_loft_context", False):
        return

    def make_record(*args, **kwargs):
        record = previous(*args, **kwargs)
        record.loft_context = current_log_fields()
        return record

    make_record.adds_loft_context = True
    logging.setLogRecordFactory(make_record)


# Attributes every LogRecord has; anything else on a record came from ``extra`` or the context.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "loft_context",
}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, service, the bound ids and
    whatever the call passed as ``extra``; an exception as its traceback text."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "service": os.environ.get("LOFT_SERVICE", "loft"),
            "pid": record.process,
        }
        line.update(getattr(record, "loft_context", None) or {})
        for name, value in vars(record).items():
            if name not in _STANDARD and not name.startswith("_"):
                line[name] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


# --- HTTP ------------------------------------------------------------------------------------

HTTP_LATENCY = Histogram(
    "loft_http_request_duration_seconds",
    "Time to answer an HTTP request, by route, method and status class.",
    ["route", "method", "status"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
    registry=None,  # jobs/metrics.py registers it in the registry it serves
)

request_logger = logging.getLogger("loft.requests")

# The methods the histogram names; any other a client invents is counted as "other", so that
# made-up methods cannot add series without end.
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def method_label(method: str | None) -> str:
    return method if method in KNOWN_METHODS else "other"


def route_of(request) -> str:
    match = getattr(request, "resolver_match", None)
    if match is None:
        return "unmatched"
    return "/" + str(match.route).lstrip("^")


class RequestMetricsMiddleware:
    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        started = time.perf_counter()
        token = _log_context.set({})
        try:
            response = self.get_response(request)
            seconds = time.perf_counter() - started
            route = route_of(request)
            status = f"{response.status_code // 100}xx"
            HTTP_LATENCY.labels(route, method_label(request.method), status).observe(seconds)
            if route != "/metrics":  # a scraper every few seconds would drown the log
                request_logger.info(
                    "%s %s %s",
                    request.method,
                    request.path,
                    response.status_code,
                    extra={
                        "method": request.method,
                        "path": request.path,
                        "route": route,
                        "status": response.status_code,
                        "duration_ms": round(seconds * 1000, 1),
                    },
                )
            return response
        finally:
            _log_context.reset(token)
