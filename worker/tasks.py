"""Celery tasks: thin wrappers that take ids, re-read rows and call the worker-side code.

The domain sends them by name (jobs/tasks.py) and never imports this module."""

from celery import shared_task
from django.conf import settings

from jobs import continual
from jobs.datasets import validate_stored_file
from jobs.models import File, FineTuneJob, StoredCompletion
from loft import webhooks
from loft.models import WebhookDelivery
from loft.observability import log_fields
from loft.storage import StorageError
from worker import (
    maintenance,
    presence,  # noqa: F401 - connects the heartbeat to the worker's start and stop
    warm_start,  # noqa: F401 - connects the base model's preload to the worker's start
)
from worker.evaluations import run_evaluation as run_custom_evaluation
from worker.merging import run_merge
from worker.serving import submit_generation
from worker.training import run_job


@shared_task(
    autoretry_for=(StorageError,),
    retry_backoff=True,
    retry_backoff_max=60,
    max_retries=5,
    acks_late=True,
)
def validate_file(file_id: str) -> None:
    file = File.objects.filter(pk=file_id).first()
    if file is None:
        return  # deleted meanwhile
    if file.status == File.Status.UPLOADED:  # else an earlier delivery validated it
        validate_stored_file(file)
    # Always: an earlier delivery may have died between validating and waking the jobs.
    FineTuneJob.files_validated(file)


@shared_task(
    bind=True,
    acks_late=True,
    reject_on_worker_lost=True,
    # Loft's own limit (LOFT_JOB_SOFT_TIME_LIMIT_SECONDS) ends the loop at a step boundary with
    # a checkpoint (worker/training.py); Celery's limits are backstops for a step that hangs.
    soft_time_limit=settings.LOFT_JOB_SOFT_TIME_LIMIT_SECONDS + 600,
    time_limit=settings.LOFT_JOB_SOFT_TIME_LIMIT_SECONDS + 900,
)
def run_fine_tune(self, job_id: str) -> None:
    with log_fields(job_id=job_id):
        run_job(job_id, worker=self.request.hostname or "worker")


@shared_task(
    acks_late=True,
    reject_on_worker_lost=True,
    soft_time_limit=settings.LOFT_JOB_SOFT_TIME_LIMIT_SECONDS,
)
def run_evaluation(evaluation_id: str) -> None:
    with log_fields(evaluation_id=evaluation_id):
        run_custom_evaluation(evaluation_id)


# A playground request is answered once or not at all: its client is waiting now, and a retry
# after a worker died would answer nobody.
@shared_task(acks_late=False)
def generate(request_id: str, org_id: str, request: dict) -> None:
    with log_fields(request_id=request_id, org_id=org_id, adapter_id=request.get("adapter")):
        submit_generation(request_id, org_id, request)


@shared_task
def reap_stale_jobs() -> list[str]:
    """Periodic (beat): re-queue jobs whose worker stopped heartbeating; fail them after K tries."""
    return FineTuneJob.reap_stale(settings.LOFT_LEASE_SECONDS, settings.LOFT_MAX_ATTEMPTS)


@shared_task(
    acks_late=True,
    # Backstops: an attempt ends at its own deadline, and its lease outlasts these limits.
    soft_time_limit=settings.LOFT_WEBHOOK_TIMEOUT_SECONDS + webhooks.TASK_SOFT_LIMIT_MARGIN_SECONDS,
    time_limit=settings.LOFT_WEBHOOK_TIMEOUT_SECONDS + webhooks.TASK_HARD_LIMIT_MARGIN_SECONDS,
)
def deliver_webhook(delivery_id: str) -> None:
    """One attempt at a webhook delivery; schedules the next one if it must be retried."""
    delivery = WebhookDelivery.objects.filter(pk=delivery_id).first()
    if delivery is None:
        return  # its endpoint was deleted
    retry_in = webhooks.attempt_delivery(delivery)
    if retry_in is not None:
        webhooks.enqueue(delivery_id, countdown=retry_in)


@shared_task
def send_overdue_webhooks() -> int:
    """Periodic (beat): hint again the webhook deliveries whose message was lost."""
    return webhooks.send_overdue()


@shared_task(
    acks_late=True,
    reject_on_worker_lost=True,
    soft_time_limit=settings.LOFT_JOB_SOFT_TIME_LIMIT_SECONDS,
)
def merge_adapter(adapter_id: str) -> None:
    with log_fields(adapter_id=adapter_id):
        run_merge(adapter_id)


@shared_task
def abort_abandoned_uploads() -> int:
    """Periodic (beat): abort multipart uploads left open by requests that died."""
    return maintenance.abort_abandoned_uploads()


@shared_task
def sweep_orphan_objects() -> int:
    """Periodic (beat): delete old objects that no row owns."""
    return maintenance.sweep_orphan_objects()


@shared_task
def forget_unused_base_scores() -> int:
    """Periodic (beat): delete the base's kept evaluation results nobody reads any more."""
    return maintenance.forget_unused_base_scores()


@shared_task
def roll_up_usage() -> int:
    """Periodic (beat): the per-month usage lines operators bill from."""
    return maintenance.roll_up_usage()


@shared_task
def expire_stored_completions() -> int:
    """Periodic (beat): stored chat completions past their organization's retention go."""
    return StoredCompletion.expire()


@shared_task
def advance_continual_policies() -> dict:
    """Periodic (beat): start the continual policies' runs that are due, move the running ones
    on (jobs/continual.py)."""
    return continual.advance_all()


@shared_task
def resend_lost_hints() -> int:
    """Periodic (beat): re-send the message of every unfinished job, upload, evaluation or
    merge whose message the broker no longer holds (a broker restarted empty, or flushed)."""
    return maintenance.resend_lost_hints()
