"""``GET /healthz``: is every part Loft depends on answering?

Anyone may ask, and hears only ``{"status": "ok"}`` (200) or ``{"status": "error"}`` (503),
enough for a load balancer or docker's healthcheck. Operators (a staff session, or
``Authorization: Bearer <LOFT_METRICS_TOKEN>`` as /metrics takes) also get each part's outcome
with its error, which may name internal hosts, and the number of live workers. That number
comes from a broadcast ping that waits ``WORKER_PING_SECONDS``, so it is kept for
``WORKER_COUNT_SECONDS`` rather than asked for on every call.
"""

from __future__ import annotations

import hmac
import logging
import threading
import time

from django.conf import settings
from django.db import connection
from django.http import JsonResponse
from django.views.decorators.http import require_GET

from loft import storage
from loft.celery import app as celery_app

logger = logging.getLogger(__name__)

BROKER_TIMEOUT_SECONDS = 2.0
WORKER_PING_SECONDS = 1.0
WORKER_COUNT_SECONDS = 5.0

_worker_count_lock = threading.Lock()
_worker_count: tuple[float, int] | None = None  # (when it was counted, monotonic; the count)


def check_database() -> None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")


def check_broker() -> None:
    with celery_app.connection_for_write() as conn:
        conn.ensure_connection(max_retries=1, interval_start=0, timeout=BROKER_TIMEOUT_SECONDS)


def check_storage() -> None:
    storage.check()


def count_live_workers() -> int:
    replies = celery_app.control.ping(timeout=WORKER_PING_SECONDS) or []
    return len(replies)


def recent_worker_count() -> int:
    """The live workers, counted at most every ``WORKER_COUNT_SECONDS`` by this process; one
    caller pings while the others wait for its answer."""
    global _worker_count
    with _worker_count_lock:
        if _worker_count is None or time.monotonic() - _worker_count[0] > WORKER_COUNT_SECONDS:
            _worker_count = (time.monotonic(), count_live_workers())
        return _worker_count[1]


def is_operator(request) -> bool:
    """A staff session, or the scraper's token (``LOFT_METRICS_TOKEN``) as a bearer token."""
    if request.user.is_authenticated and request.user.is_staff:
        return True
    token = settings.LOFT_METRICS_TOKEN
    given = request.headers.get("Authorization", "").removeprefix("Bearer ")
    return bool(token) and hmac.compare_digest(given.encode(), token.encode())


def _outcome(check) -> str:
    try:
        check()
    except Exception as error:  # noqa: BLE001 - any failure of a part is reported, not raised
        logger.warning("health check %s failed: %s", check.__name__, error)
        return f"error: {error.__class__.__name__}: {error}"[:300]
    return "ok"


@require_GET
def healthz(request):
    report: dict[str, object] = {
        "database": _outcome(check_database),
        "broker": _outcome(check_broker),
        "storage": _outcome(check_storage),
    }
    failing = [part for part in ("database", "broker", "storage") if report[part] != "ok"]
    status = {"status": "ok" if not failing else "error"}
    http_status = 503 if failing else 200
    if not is_operator(request):
        return JsonResponse(status, status=http_status)
    workers = 0
    if report["broker"] == "ok":
        try:
            workers = recent_worker_count()
        except Exception as error:  # noqa: BLE001
            logger.warning("worker ping failed: %s", error)
    report = {**status, **report, "workers": workers}
    if failing:
        report["failing"] = failing
    return JsonResponse(report, status=http_status)
