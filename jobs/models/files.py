"""Uploaded files (datasets): where the bytes are and what validation measured."""

from __future__ import annotations

from django.db import models, transaction

from jobs.models.base_scores import BaseScores
from jobs.models.catalogue import BaseModel
from loft import storage
from loft.ids import make_id
from loft.models import Organization
from loft.tenancy import TenantOwnedModel


def new_file_id() -> str:
    return make_id("file")


class File(TenantOwnedModel):
    """An uploaded dataset: the bytes live in S3, the validation report here."""

    class Purpose(models.TextChoices):
        FINE_TUNE = "fine-tune", "Training data (fine-tune)"
        EVAL = "eval", "Evaluation set (eval)"
        # Written by Loft, never uploaded: a job's metrics by step (OpenAI's result_files).
        RESULTS = "fine-tune-results", "A job's results (fine-tune-results)"

    class Status(models.TextChoices):
        UPLOADED = "uploaded"  # stored, validation running in the background
        PROCESSED = "processed"
        ERROR = "error"

    id = models.CharField(primary_key=True, max_length=40, default=new_file_id, editable=False)
    filename = models.CharField(max_length=255)
    purpose = models.CharField(max_length=20, choices=Purpose.choices)
    bytes = models.BigIntegerField()
    sha256 = models.CharField(max_length=64)
    s3_key = models.CharField(max_length=500)
    status = models.CharField(max_length=20, choices=Status.choices, default=Status.UPLOADED)
    status_details = models.TextField(blank=True, help_text="Why validation failed, in a sentence.")
    requested_format = models.CharField(
        max_length=30, blank=True, help_text="Format forced at upload."
    )
    format = models.CharField(max_length=30, blank=True)
    file_type = models.CharField(max_length=10, blank=True)
    rows = models.PositiveIntegerField(null=True, blank=True)
    tokens = models.BigIntegerField(null=True, blank=True)
    report = models.JSONField(default=dict, blank=True)
    base_model = models.ForeignKey(
        BaseModel,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        help_text="Whose tokenizer counted the tokens.",
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at"]
        indexes = [models.Index(fields=["org", "-created_at"])]

    def __str__(self) -> str:
        return f"{self.id} ({self.filename})"

    UPLOADABLE = (Purpose.FINE_TUNE, Purpose.EVAL)

    @staticmethod
    def object_key(org_id: str, file_id: str) -> str:
        return f"orgs/{org_id}/files/{file_id}/data"

    @property
    def s3_prefix(self) -> str:
        """Its bytes (``data``) and what workers derive from them (``tokenized/``)."""
        return f"orgs/{self.org_id}/files/{self.id}/"

    @property
    def unusable_reason(self) -> str | None:
        """Why the file cannot be used yet, as a sentence naming it; None once it is processed."""
        if self.status == self.Status.PROCESSED:
            return None
        if self.status == self.Status.ERROR:
            return f"The file {self.id} failed validation: {self.status_details}."
        return f"The file {self.id} is still being validated; try again shortly."

    def mark_processed(self, report: dict) -> None:
        self.status = self.Status.PROCESSED
        self.status_details = ""
        self.format = report["format"]
        self.file_type = report["file_type"]
        self.rows = report["rows"]
        self.tokens = report["tokens"]
        self.report = report
        self.save()

    def delete_with_content(self) -> None:
        """Delete the row, then its bytes; refused (FileInUse) while an unfinished job needs it.
        Under the organization's lock, so no job can be created on it in between."""

        with transaction.atomic():
            Organization.lock(self.org_id)
            from jobs.models.jobs import FineTuneJob  # that module imports this one

            active = FineTuneJob.objects.filter(
                models.Q(training_file=self) | models.Q(validation_file=self),
                status__in=FineTuneJob.UNFINISHED,
            ).first()
            if active is not None:
                raise FileInUse(
                    f"The file {self.id} is used by the job {active.id}, which has not "
                    "finished; cancel the job or wait for it before deleting the file."
                )
            prefix = self.s3_prefix
            self.delete()
            BaseScores.forget_file(self.org_id, self.sha256)
        storage.delete_prefix(prefix)  # after the row: a file is never listed without its bytes

    def mark_error(self, message: str, report: dict | None = None) -> None:
        self.status = self.Status.ERROR
        self.status_details = message
        self.report = report or {}
        self.save()


class FileInUse(Exception):
    pass
