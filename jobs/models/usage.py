"""Quotas and the usage ledger."""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import TYPE_CHECKING

from django.conf import settings
from django.db import models, transaction
from django.utils import timezone

from jobs.models.files import File
from loft.tenancy import TenantOwnedModel

if TYPE_CHECKING:
    from jobs.models.jobs import FineTuneJob

logger = logging.getLogger(__name__)


class QuotaExceeded(Exception):
    """Creating this would pass one of the organization's quotas; the message names it."""

    def __init__(self, quota: str, message: str):
        super().__init__(message)
        self.quota = quota


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
        null=True,
        blank=True,
        help_text="Jobs validating, queued or running, custom evaluations and merges at once.",
    )
    max_storage_bytes = models.BigIntegerField(
        null=True,
        blank=True,
        help_text="Datasets, adapters, merged weights and checkpoints together.",
    )
    max_monthly_trained_tokens = models.BigIntegerField(
        null=True, blank=True, help_text="Tokens trained per calendar month (UTC)."
    )
    max_concurrent_inference = models.PositiveIntegerField(
        null=True, blank=True, help_text="Chat completion requests running at once."
    )
    max_inference_tokens_per_minute = models.BigIntegerField(
        null=True,
        blank=True,
        help_text="Prompt and completion tokens (max_tokens, reserved) per minute.",
    )
    stored_completion_days = models.PositiveIntegerField(
        null=True,
        blank=True,
        help_text="Days a stored chat completion (store: true) is kept; 0 stores none.",
    )

    def __str__(self) -> str:
        return f"quota of {self.org_id}"

    @classmethod
    def for_org(cls, org) -> Quota:
        return cls.objects.filter(org=org).first() or cls(org=org)

    def limits(self) -> dict:
        """Each limit, or None for none. This row's own value wins (0 allows nothing); an empty
        field takes the operator's default, where 0 means no limit."""
        defaults = {
            "concurrent_jobs": settings.LOFT_QUOTA_CONCURRENT_JOBS,
            "storage_bytes": settings.LOFT_QUOTA_STORAGE_BYTES,
            "monthly_trained_tokens": settings.LOFT_QUOTA_MONTHLY_TRAINED_TOKENS,
            "concurrent_inference": settings.LOFT_INFERENCE_CONCURRENT_PER_ORG,
            "inference_tokens_per_minute": settings.LOFT_INFERENCE_TOKENS_PER_MINUTE_PER_ORG,
        }
        own = {
            "concurrent_jobs": self.max_concurrent_jobs,
            "storage_bytes": self.max_storage_bytes,
            "monthly_trained_tokens": self.max_monthly_trained_tokens,
            "concurrent_inference": self.max_concurrent_inference,
            "inference_tokens_per_minute": self.max_inference_tokens_per_minute,
        }
        return {
            name: own[name] if own[name] is not None else (defaults[name] or None)
            for name in defaults
        }

    def completion_retention_days(self) -> int:
        """Days this organization's stored completions are kept (0: none is stored)."""
        if self.stored_completion_days is not None:
            return self.stored_completion_days
        return settings.LOFT_STORED_COMPLETION_DAYS

    def check_new_job(self, plan, starting: FineTuneJob | None = None) -> None:
        """Raise QuotaExceeded if a new job (or ``starting``, a job leaving validating_files)
        would pass a limit. The caller holds the organization's lock."""
        limits = self.limits()
        from jobs.models.jobs import FineTuneJob  # that module imports this one

        active = FineTuneJob.objects.filter(org=self.org, status__in=FineTuneJob.ACTIVE)
        if starting is None:
            self.check_concurrent_work()
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

    def check_concurrent_work(self) -> None:
        """Raise QuotaExceeded if one more job, custom evaluation or merge would pass the
        concurrent_jobs limit: each holds a worker alike. The caller holds the organization's
        lock."""
        limit = self.limits()["concurrent_jobs"]
        if limit is None:
            return
        count = concurrent_work(self.org)
        if count >= limit:
            raise QuotaExceeded(
                "concurrent_jobs",
                f"Quota concurrent_jobs reached: {count} of {limit} jobs, evaluations and "
                "merges are waiting or running. Wait for one to finish, or cancel a job.",
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


def concurrent_work(org) -> int:
    """What holds a worker, or waits for one, for the organization: unfinished jobs, custom
    evaluations queued or running, merges queued or running."""
    from jobs.models.adapters import Adapter, Evaluation  # that module imports this one
    from jobs.models.jobs import FineTuneJob

    waiting_or_running = (Evaluation.Status.QUEUED, Evaluation.Status.RUNNING)
    merging = (Adapter.MergedStatus.QUEUED, Adapter.MergedStatus.RUNNING)
    return (
        FineTuneJob.objects.filter(org=org, status__in=FineTuneJob.ACTIVE).count()
        + Evaluation.objects.filter(org=org, status__in=waiting_or_running).count()
        + Adapter.objects.filter(org=org, merged_status__in=merging).count()
    )


def storage_bytes(org) -> int:
    """What the organization keeps, all of which counts against its quota: in object storage
    its files, adapters, their merged weights and the checkpoints jobs keep (a few per job); in
    the database its stored chat completions."""
    from jobs.models.adapters import Adapter  # that module imports this one
    from jobs.models.completions import StoredCompletion
    from jobs.models.jobs import Checkpoint

    def total(queryset, *fields: str) -> int:
        sums = queryset.aggregate(**{field: models.Sum(field) for field in fields})
        return sum(int(value or 0) for value in sums.values())

    return (
        total(File.objects.filter(org=org).exclude(status=File.Status.ERROR), "bytes")
        + total(Adapter.objects.filter(org=org), "size_bytes", "merged_size_bytes")
        + total(Checkpoint.objects.filter(job__org=org), "size_bytes")
        + total(StoredCompletion.objects.filter(org=org), "size_bytes")
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
        "FineTuneJob", null=True, blank=True, on_delete=models.SET_NULL, related_name="usage"
    )
    trained_tokens = models.BigIntegerField(default=0)
    compute_seconds = models.FloatField(default=0)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)

    class Meta:
        ordering = ["-created_at"]
        constraints = [models.UniqueConstraint(fields=["job"], name="one_usage_record_per_job")]

    def __str__(self) -> str:
        return f"{self.org_id} {self.job_id}: {self.trained_tokens} tokens"


class InferenceUsage(TenantOwnedModel):
    """The usage ledger's inference lines: one per answered chat completion request, written by
    the inference worker when the answer ends (finished, stopped or cut off)."""

    model = models.CharField(max_length=300, help_text="The model the request named.")
    adapter_id = models.CharField(max_length=40, blank=True, help_text="Empty: the base alone.")
    alias = models.CharField(max_length=64, blank=True)
    prompt_tokens = models.BigIntegerField(default=0)
    completion_tokens = models.BigIntegerField(default=0)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.org_id} {self.model}: {self.prompt_tokens}+{self.completion_tokens}"

    @classmethod
    def record(
        cls,
        org_id: str,
        model: str,
        adapter_id: str | None,
        alias: str | None,
        prompt_tokens: int,
        completion_tokens: int,
    ) -> InferenceUsage | None:
        """The line of one answered request, or None if it could not be written: an answer
        already given is never failed for its bill, so a failure here is logged, not raised.
        In a savepoint, so that a caller's transaction outlives a failed INSERT."""
        try:
            with transaction.atomic():
                return cls.objects.create(
                    org_id=org_id,
                    model=model[: cls._meta.get_field("model").max_length],
                    adapter_id=adapter_id or "",
                    alias=alias or "",
                    prompt_tokens=prompt_tokens,
                    completion_tokens=completion_tokens,
                )
        except Exception:
            logger.exception(
                "The inference usage of a request was not recorded",
                extra={
                    "org_id": org_id,
                    "model": model,
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion_tokens,
                },
            )
            return None


class MonthlyUsage(TenantOwnedModel):
    """The usage ledger rolled up per organization and calendar month (UTC), by the periodic
    task ``roll_up_usage``: what an operator bills from, without summing every job's line."""

    month = models.DateField(help_text="The first day of the month.")
    jobs = models.PositiveIntegerField(default=0)
    trained_tokens = models.BigIntegerField(default=0)
    compute_seconds = models.FloatField(default=0)
    inference_prompt_tokens = models.BigIntegerField(default=0)
    inference_completion_tokens = models.BigIntegerField(default=0)
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
        datetime at a month's start): its finished jobs and its answered inference requests.
        Safe to run again. Returns how many lines it wrote."""
        next_month = (month + timedelta(days=32)).replace(day=1)
        in_month = {"created_at__gte": month, "created_at__lt": next_month}
        lines: dict[str, dict] = {}
        for line in (
            UsageRecord.objects.filter(**in_month)
            .values("org")
            .annotate(
                jobs=models.Count("id"),
                trained_tokens=models.Sum("trained_tokens"),
                compute_seconds=models.Sum("compute_seconds"),
            )
        ):
            lines[line["org"]] = {
                "jobs": line["jobs"],
                "trained_tokens": line["trained_tokens"] or 0,
                "compute_seconds": line["compute_seconds"] or 0,
            }
        for line in (
            InferenceUsage.objects.filter(**in_month)
            .values("org")
            .annotate(
                prompt_tokens=models.Sum("prompt_tokens"),
                completion_tokens=models.Sum("completion_tokens"),
            )
        ):
            lines.setdefault(line["org"], {}).update(
                inference_prompt_tokens=line["prompt_tokens"] or 0,
                inference_completion_tokens=line["completion_tokens"] or 0,
            )
        empty = {
            "jobs": 0,
            "trained_tokens": 0,
            "compute_seconds": 0,
            "inference_prompt_tokens": 0,
            "inference_completion_tokens": 0,
        }
        for org_id, figures in lines.items():
            cls.objects.update_or_create(
                org_id=org_id, month=month.date(), defaults={**empty, **figures}
            )
        return len(lines)
