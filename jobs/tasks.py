"""The domain's door to the worker side: each function sends one Celery task by name, so that
queueing work never imports the code that runs it (worker/tasks.py, with torch behind it).

Hints that belong to a row are sent after the transaction commits, so a worker always finds
what it is told; one that is lost all the same (a broker flushed) is sent again by the periodic
sweep (worker/maintenance.py, resend_lost_hints). A hint sent twice is harmless: every task
claims its row with a conditional UPDATE.
"""

from __future__ import annotations

import re

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


def training_queue(class_name: str) -> str:
    """The queue a worker class's training workers consume (``train.<class>``)."""
    return f"{settings.LOFT_TRAINING_QUEUE}.{class_name}"


def run_fine_tune(job_id: str, class_name: str, countdown: float | None = None) -> None:
    send_after_commit(
        "run_fine_tune", job_id, queue=training_queue(class_name), countdown=countdown
    )


def run_evaluation(evaluation_id: str) -> None:
    from jobs.models import Evaluation  # noqa: PLC0415 - jobs.models imports this module

    candidates = Evaluation.objects.get(pk=evaluation_id).candidates
    adapters = [candidate["adapter"] for candidate in candidates if candidate["adapter"]]
    send_after_commit(
        "run_evaluation", evaluation_id, queue=training_queue(class_for_work(adapters))
    )


def merge_adapter(adapter_id: str) -> None:
    send_after_commit(
        "merge_adapter", adapter_id, queue=training_queue(class_for_work([adapter_id]))
    )


def class_for_work(adapter_ids: list[str] = ()) -> str:
    """Where a custom evaluation or a merge runs: on the class that trained its adapters (it
    held their base; of several, the one with the most memory), else on the cheapest known
    class, preferring one with a worker online."""
    from jobs.models import FineTuneJob, WorkerHeartbeat  # noqa: PLC0415
    from jobs.preflight import known_classes  # noqa: PLC0415

    classes = known_classes()
    trained_on = {
        routed
        for plan in FineTuneJob.objects.filter(adapter__in=adapter_ids).values_list(
            "plan", flat=True
        )
        if (routed := (plan or {}).get("worker_class"))
    }
    holding = [worker for worker in classes if worker.name in trained_on]
    if holding:
        return max(holding, key=lambda worker: worker.memory_bytes).name
    online = WorkerHeartbeat.online_by_class()
    cheapest = min(classes, key=lambda worker: (not online.get(worker.name), worker.cost_per_hour))
    return cheapest.name


def inference_queue(base_model: str, quantization: str) -> str:
    """Inference requests route by base model and precision: to ``inference.<base>.<nf4|none>``
    where a worker consumes that queue (one that keeps that base loaded), else to the shared
    inference queue, whose workers load any base."""
    from jobs.models.workers import WorkerHeartbeat  # noqa: PLC0415

    dedicated = f"{settings.LOFT_INFERENCE_QUEUE}.{slug(base_model)}.{quantization}"
    for queues in WorkerHeartbeat.online().values_list("queues", flat=True):
        if dedicated in queues:
            return dedicated
    return settings.LOFT_INFERENCE_QUEUE


def slug(name: str) -> str:
    """A base model's id as one queue-name word: HuggingFaceTB/SmolLM2 → huggingfacetb--smollm2."""
    return re.sub(r"[^a-z0-9._-]+", "--", name.lower())


def generate(request_id: str, org_id: str, request: dict, queue: str) -> None:
    """An inference request: sent at once (its client waits now), dropped when nobody took it
    in time, since its client has given up by then."""
    send(
        "generate",
        request_id,
        org_id,
        request,
        queue=queue,
        expires=settings.LOFT_INFERENCE_TIMEOUT_SECONDS,
    )
