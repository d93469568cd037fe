"""The domain's door to the worker side: each function sends one Celery task by name, so that
queueing work never imports the code that runs it (worker/tasks.py, with torch behind it).

Hints that belong to a row are sent after the transaction commits, so a worker always finds
what it is told; one that is lost all the same (a broker flushed) is sent again by the periodic
sweep (worker/maintenance.py, resend_lost_hints). A hint sent twice is harmless: every task
claims its row with a conditional UPDATE.
"""

from __future__ import annotations

from django.conf import settings
from django.db import transaction

from loft.celery import app

TASKS = "worker.tasks"


def send(name: str, *args, queue: str | None = None, **options) -> None:
    """Send ``worker.tasks.<name>`` now."""
    app.send_task(f"{TASKS}.{name}", args=list(args), queue=queue, **options)


def send_after_commit(name: str, *args, queue: str | None = None, **options) -> None:
    transaction.on_commit(lambda: send(name, *args, queue=queue, **options))


def validate_file(file_id: str) -> None:
    send_after_commit("validate_file", file_id, queue=settings.CELERY_TASK_DEFAULT_QUEUE)


def run_fine_tune(job_id: str, countdown: float | None = None) -> None:
    send_after_commit(
        "run_fine_tune", job_id, queue=settings.LOFT_TRAINING_QUEUE, countdown=countdown
    )


def run_evaluation(evaluation_id: str) -> None:
    send_after_commit("run_evaluation", evaluation_id, queue=settings.LOFT_TRAINING_QUEUE)


def merge_adapter(adapter_id: str) -> None:
    send_after_commit("merge_adapter", adapter_id, queue=settings.LOFT_TRAINING_QUEUE)


def generate(request_id: str, org_id: str, request: dict) -> None:
    """An inference request: sent at once (its client waits now), dropped when nobody took it
    in time, since its client has given up by then."""
    send(
        "generate",
        request_id,
        org_id,
        request,
        queue=settings.LOFT_INFERENCE_QUEUE,
        expires=settings.LOFT_INFERENCE_TIMEOUT_SECONDS,
    )
