"""Celery tasks: thin wrappers that take ids, re-read rows and call the engine."""

from celery import shared_task

from loft.storage import StorageError


@shared_task(
    autoretry_for=(StorageError,),
    retry_backoff=True,
    retry_backoff_max=60,
    max_retries=5,
    acks_late=True,
)
def validate_file(file_id: str) -> None:
    from jobs.datasets import validate_stored_file
    from jobs.models import File

    file = File.objects.filter(pk=file_id, status=File.Status.UPLOADED).first()
    if file is None:
        return  # deleted, or already validated by an earlier delivery
    validate_stored_file(file)
