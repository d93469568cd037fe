"""A fine-tuning job and its whole lifecycle (FineTuneJob's methods), with its events, attempts
and checkpoints. worker/training.py runs a claimed job."""

from __future__ import annotations

import json
import re
from dataclasses import asdict
from datetime import timedelta

from django.db import models, transaction
from django.db.models.functions import Coalesce
from django.utils import timezone

from engine import artifacts
from engine.hyperparameters import ConfigError, TrainConfig, as_stored
from engine.plan import Plan
from jobs import preflight, tasks
from jobs.models.adapters import Adapter
from jobs.models.catalogue import BaseModel
from jobs.models.files import File
from jobs.models.usage import Quota, QuotaExceeded, UsageRecord
from jobs.models.workers import WorkerHeartbeat
from loft import storage, webhooks
from loft.ids import make_id
from loft.models import Organization
from loft.tenancy import TenantOwnedModel


def new_job_id() -> str:
    return make_id("ftjob")


def no_worker_sentence(class_name: str) -> str:
    """What a queued job whose worker class has no worker online waits for."""
    return f"No {class_name} worker is running: the job waits in the queue until one starts."


def routed_class(plan: dict | None, known: set[str] | None = None) -> str:
    """The worker class a job runs on: the one its plan routed it to while that class is known
    (``known``: the names of preflight.known_classes(), read when not given); else — a job
    planned before classes on one no worker declares any more, or a class forgotten — the
    cheapest class with a worker online, so that it never waits on a queue nobody consumes."""
    named = Plan.class_name_of(plan)
    if known is None:
        known = {worker.name for worker in preflight.known_classes()}
    return named if named in known else tasks.class_for_work()


def waiting_sentence(plan: dict | None, online: dict[str, int], known: set[str]) -> str | None:
    """For a queued job: what it waits for when its class has no worker online, else None.
    ``online``: WorkerHeartbeat.online_by_class()."""
    class_name = routed_class(plan, known)
    return None if online.get(class_name) else no_worker_sentence(class_name)


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
        PAUSED = "paused"  # OpenAI's jobs.pause: a checkpoint, then waiting for jobs.resume

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
    result_file = models.ForeignKey(
        File,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
        help_text="Its metrics by step, as a CSV (OpenAI's result_files); written as it succeeds.",
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
    pause_requested = models.BooleanField(default=False)
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
        default=dict, blank=True, help_text="Pre-flight figures (engine/plan.py) at submission."
    )
    timings = models.JSONField(
        default=dict,
        blank=True,
        help_text="Where the time went, in seconds: queue, setup, training, evaluation, upload "
        "and total (worker/training.py, PhaseClock).",
    )
    idempotency_key = models.CharField(max_length=255, blank=True)
    request_fingerprint = models.CharField(
        max_length=64, blank=True, help_text="sha256 of the create request the key was used with."
    )
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    # Waiting for a worker or on one: they count against the organization's concurrent jobs.
    ACTIVE = (Status.VALIDATING_FILES, Status.QUEUED, Status.RUNNING)
    # Not finished: their files must stay.
    UNFINISHED = (*ACTIVE, Status.PAUSED)
    # The phases of ``timings``, in order (worker/training.py PhaseClock measures them).
    PHASES = ("queue", "setup", "training", "evaluation", "upload")

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
        ConfigError naming the field, preflight.JobTooLarge, QuotaExceeded).

        Under a lock on the organization's row, so that quotas and idempotency keys hold when
        many requests arrive at once: the same ``idempotency_key`` returns the job it made
        (``job.replayed`` is then True). A job whose files are still being validated waits in
        ``validating_files``; files_validated moves it on.
        """
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
            plan = preflight.plan(
                config, base_model, training_file, validation_file, parent_adapter
            )
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
                self.parent_adapter,
            )
            config = TrainConfig(**{**resolved, "seed": self.seed})
        except ConfigError as error:
            self._fail_before_start("invalid_hyperparameters", str(error), "hyperparameters")
            return
        plan = preflight.plan(
            config,
            self.base_model,
            self.training_file,
            self.validation_file,
            self.parent_adapter,
        )
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
                status=self.Status.QUEUED,
                plan=plan.as_dict(),
                hyperparameters=asdict(config),
                method=config.method,
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
        """Send the hint to the queue of the job's worker class after the row is committed, so
        a worker always finds what it is told. A hint that is lost all the same (a broker
        flushed) is sent again by the periodic sweep (worker/maintenance.py,
        resend_lost_hints). With no worker of its class online it waits there, and its
        ``status_details`` and its page say so (``waiting_sentence``) until one starts."""
        tasks.run_fine_tune(self.id, self.class_name, countdown=countdown)

    @property
    def class_name(self) -> str:
        """The worker class pre-flight routed the job to (``routed_class``)."""
        return routed_class(self.plan)

    def waiting_reason(self) -> str | None:
        """For a queued job whose class has no worker online: a sentence saying what it waits
        for. It stays queued, never fails for that, and runs when one starts."""
        if self.status != self.Status.QUEUED:
            return None
        known = {worker.name for worker in preflight.known_classes()}
        return waiting_sentence(self.plan, WorkerHeartbeat.online_by_class(), known)

    def request_cancel(self) -> None:
        """Not started yet: cancelled at once. Running: the training loop stops at its next
        step (train.py reads should_stop), and the worker ends the job.

        The row is locked first, so that a cancel and a worker's move of the job (give_way
        re-queueing it, the reaper) happen one after the other: a cancel is never lost
        between a running job's re-queueing and its next claim."""
        waiting = (self.Status.VALIDATING_FILES, self.Status.QUEUED, self.Status.PAUSED)
        with transaction.atomic():
            row = FineTuneJob.objects.select_for_update().filter(pk=self.pk)
            status = row.values_list("status", flat=True).first()
            if status in waiting:
                row.update(
                    status=self.Status.CANCELLED, cancel_requested=True, finished_at=timezone.now()
                )
                self.refresh_from_db()
                self._ended("info", "Job cancelled before it started.")
            elif status == self.Status.RUNNING:
                row.update(cancel_requested=True)
        self.refresh_from_db()

    def request_pause(self) -> bool:
        """Queued: paused at once. Running: the training loop writes a checkpoint at its next
        step and the worker parks the job (``pause``). False for a job in another state."""
        with transaction.atomic():
            row = FineTuneJob.objects.select_for_update().filter(pk=self.pk)
            status = row.values_list("status", flat=True).first()
            if status == self.Status.QUEUED:
                row.update(status=self.Status.PAUSED, worker="")
                self.add_event("info", "Job paused before it started; resume it to queue it.")
            elif status == self.Status.RUNNING:
                row.update(pause_requested=True)
            else:
                return False
        self.refresh_from_db()
        return True

    def request_resume(self) -> bool:
        """Paused → queued again: a worker resumes it from its last checkpoint. False for a
        job that is not paused (a running job asked to pause is not paused yet)."""
        with transaction.atomic():
            resumed = FineTuneJob.objects.filter(pk=self.pk, status=self.Status.PAUSED).update(
                status=self.Status.QUEUED, pause_requested=False
            )
            if resumed:
                latest = self.checkpoints.first()
                where = f"the checkpoint at step {latest.step}" if latest else "the start"
                self.add_event("info", f"Job resumed; it goes on from {where}.")
                self.enqueue()
        self.refresh_from_db()
        return bool(resumed)

    def pause(self, attempt: int, step: int, **fields) -> bool:
        """The worker's side of a pause: this attempt ends with the job parked, its checkpoint
        at ``step`` written. False if the attempt was fenced off meanwhile."""
        with transaction.atomic():
            if not self.fenced(attempt).update(
                status=self.Status.PAUSED, pause_requested=False, worker="", **fields
            ):
                return False
            self.refresh_from_db()
            JobAttempt.close(self, attempt, self.Status.PAUSED)
            self.add_event("info", f"Job paused after step {step}; resume it to go on from there.")
        return True

    def retry(self, by: str) -> bool:
        """An operator's second chance for a failed job that ran: queued again, it resumes
        from its last checkpoint (worker/training.py) with a fresh allowance of attempts. A job
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

    def should_pause(self, attempt: int) -> bool:
        row = self.fenced(attempt).values("pause_requested").first()
        return row is not None and row["pause_requested"]

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
        ``max_attempts`` attempts, fail it with the reason. A job whose cancel was asked for
        meanwhile ends cancelled instead: a re-queued job that asked to stop would never be
        claimed again. False if the attempt was fenced off."""
        with transaction.atomic():
            if not self.fenced(attempt).select_for_update().exists():
                return False
            self.refresh_from_db()
            JobAttempt.close(self, attempt, JobAttempt.STORAGE)
            if self.cancel_requested:
                self.fenced(attempt).update(
                    status=self.Status.CANCELLED, finished_at=timezone.now()
                )
                self.refresh_from_db()
                self._ended("info", "Job cancelled.")
                return True
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

    def record_checkpoint(
        self, attempt: int, step: int, s3_prefix: str, manifest: dict, metrics: dict, keep: int
    ) -> list[str] | None:
        """Record a checkpoint whose files and manifest are in storage under ``s3_prefix``,
        only while ``attempt`` still holds the job (its row locked, so the reaper cannot take
        it in between); None, and nothing recorded, if it was fenced off.

        A job keeps its newest ``keep`` checkpoints, by step, the order resume tries them in.
        Returns the prefixes let go (older checkpoints, and an earlier attempt's at this
        step): the caller deletes them from storage once this has committed."""
        with transaction.atomic():
            if not self.fenced(attempt).select_for_update().exists():
                return None
            replaced = list(self.checkpoints.filter(step=step).values_list("s3_prefix", flat=True))
            Checkpoint.objects.update_or_create(
                job=self,
                step=step,
                defaults={
                    "attempt": attempt,
                    "s3_prefix": s3_prefix,
                    "size_bytes": manifest["total_bytes"],
                    "metrics": metrics,
                },
            )
            older = list(self.checkpoints.order_by("-step")[keep:])
            Checkpoint.objects.filter(pk__in=[c.pk for c in older]).delete()
        return [p for p in replaced + [c.s3_prefix for c in older] if p != s3_prefix]

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
        help_text="succeeded, failed, cancelled, paused, lost or storage_unavailable; empty: "
        "running",
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


# A checkpoint's model name: ft:<base>:<org>:<suffix>:<job id>:ckpt-step-<step>.
CHECKPOINT_NAME = re.compile(r"ft:.+:(ftjob-[^:]+):ckpt-step-(\d+)")


class Checkpoint(models.Model):
    """A complete checkpoint in S3: recorded only after its manifest.json was written, under
    a prefix of its own attempt (``checkpoints/attempt-<n>/step-<step>/``), so that an attempt
    fenced off meanwhile never writes over the current attempt's files."""

    job = models.ForeignKey(FineTuneJob, on_delete=models.CASCADE, related_name="checkpoints")
    step = models.PositiveIntegerField()
    attempt = models.PositiveIntegerField()
    s3_prefix = models.CharField(max_length=500)
    size_bytes = models.BigIntegerField(
        default=0, help_text="Its files' bytes in storage: they count toward the storage quota."
    )
    metrics = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-step"]
        constraints = [
            models.UniqueConstraint(fields=["job", "step"], name="one_checkpoint_per_step")
        ]

    def __str__(self) -> str:
        return f"{self.job_id} step {self.step}"

    @property
    def model_name(self) -> str:
        """OpenAI's fine_tuned_model_checkpoint: the job's model name and the step."""
        return f"{self.job.fine_tuned_model_name}:ckpt-step-{self.step}"

    @classmethod
    def named(cls, org, name: str) -> Checkpoint | None:
        """The organization's checkpoint of that model name, if it is one."""
        match = CHECKPOINT_NAME.fullmatch(name)
        if match is None:
            return None
        job_id, step = match.groups()
        found = cls.objects.filter(job__org=org, job_id=job_id, step=int(step)).first()
        return found if found is not None and found.model_name == name else None

    def as_adapter(self) -> Adapter:
        """The checkpoint as a model of its own, to continue training from (or to serve): its
        adapter files copied by the storage under an adapter's prefix, manifest last, so that
        it outlives the job's pruning of its checkpoints. Made once; named again, the same.
        Raises StorageError."""
        job = self.job
        made = Adapter.objects.filter(org_id=job.org_id, name=self.model_name).first()
        if made is not None:
            return made
        theirs = json.loads(storage.get_bytes(f"{self.s3_prefix}{artifacts.MANIFEST}"))
        files = {name: theirs["files"][name] for name in artifacts.ADAPTER_FILES}
        config = TrainConfig(**as_stored(job.hyperparameters))
        manifest = {
            "files": files,
            "total_bytes": sum(entry["bytes"] for entry in files.values()),
            "base": artifacts.base_record(
                job.base_model.name, job.base_model.revision, config.quantization
            ),
        }
        adapter = Adapter(
            org_id=job.org_id,
            name=self.model_name,
            base_model=job.base_model,
            parent=job.parent_adapter,
            manifest=manifest,
            size_bytes=manifest["total_bytes"],
            metrics={**self.metrics, "checkpoint_of": job.id, "step": self.step},
        )
        adapter.s3_prefix = f"orgs/{job.org_id}/adapters/{adapter.id}/"
        for name in files:
            storage.copy_object(f"{self.s3_prefix}{name}", f"{adapter.s3_prefix}{name}")
        storage.put_bytes(
            f"{adapter.s3_prefix}{artifacts.MANIFEST}",
            json.dumps(manifest, indent=2).encode(),
            "application/json",
        )
        adapter.save()
        return adapter


class IdempotencyKeyReused(Exception):
    def __init__(self, key: str):
        super().__init__(
            f"The Idempotency-Key {key!r} was already used with a different request body; "
            "use a new key for a new job."
        )
