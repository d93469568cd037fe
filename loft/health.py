"""``GET /healthz``: is every part Loft depends on answering? No authentication."""

from __future__ import annotations

import logging

from django.db import connection
from django.http import JsonResponse
from django.views.decorators.http import require_GET

from loft import storage
from loft.celery import app as celery_app

logger = logging.getLogger(__name__)

BROKER_TIMEOUT_SECONDS = 2.0
WORKER_PING_SECONDS = 1.0


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
        "workers": 0,
    }
    if report["broker"] == "ok":
        try:
            report["workers"] = count_live_workers()
        except Exception as error:  # noqa: BLE001
            logger.warning("worker ping failed: %s", error)
    failing = [part for part in ("database", "broker", "storage") if report[part] != "ok"]
    report = {"status": "ok" if not failing else "error", **report}
    if failing:
        report["failing"] = failing
    return JsonResponse(report, status=503 if failing else 200)
