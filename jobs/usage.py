"""An organization's usage against its quotas: what ``GET /v1/usage`` answers and what the
usage page (jobs/views/usage.py) shows, computed once here. Two ledgers: training
(UsageRecord, a line per finished job) and inference (InferenceUsage, a line per answered
request)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from django.db.models import Count, Sum
from django.db.models.functions import TruncMonth

from jobs.models import (
    FineTuneJob,
    InferenceUsage,
    Quota,
    UsageRecord,
    concurrent_work,
    month_start,
    storage_bytes,
    trained_tokens_this_month,
)


@dataclass(frozen=True)
class Usage:
    """One month of the usage ledger, every month's totals, storage in use and the limits."""

    org_id: str
    month: datetime
    trained_tokens: int
    compute_seconds: float
    storage_bytes: int
    limits: dict
    months: list[dict]
    records: list[UsageRecord]
    inference: list[dict]

    @property
    def inference_requests(self) -> int:
        return sum(line["requests"] for line in self.inference)

    @property
    def inference_prompt_tokens(self) -> int:
        return sum(line["prompt_tokens"] for line in self.inference)

    @property
    def inference_completion_tokens(self) -> int:
        return sum(line["completion_tokens"] for line in self.inference)

    def as_json(self) -> dict:
        """The body of ``GET /v1/usage``."""
        return {
            "object": "usage",
            "organization_id": self.org_id,
            "month": self.month.strftime("%Y-%m"),
            "totals": {
                "trained_tokens": self.trained_tokens,
                "compute_seconds": round(self.compute_seconds, 1),
                "storage_bytes": self.storage_bytes,
                "inference_requests": self.inference_requests,
                "inference_prompt_tokens": self.inference_prompt_tokens,
                "inference_completion_tokens": self.inference_completion_tokens,
            },
            "limits": self.limits,
            "months": [
                {
                    "month": row["month"].strftime("%Y-%m"),
                    "trained_tokens": row["trained_tokens"],
                    "compute_seconds": round(row["compute_seconds"], 1),
                    "jobs": row["jobs"],
                    "inference_requests": row["inference_requests"],
                    "inference_prompt_tokens": row["inference_prompt_tokens"],
                    "inference_completion_tokens": row["inference_completion_tokens"],
                }
                for row in self.months
            ],
            "jobs": [
                {
                    "job": record.job_id,
                    "trained_tokens": record.trained_tokens,
                    "compute_seconds": round(record.compute_seconds, 1),
                    "recorded_at": int(record.created_at.timestamp()),
                }
                for record in self.records
            ],
            "inference": [
                {
                    "model": line["model"],
                    "adapter": line["adapter_id"] or None,
                    "alias": line["alias"] or None,
                    "requests": line["requests"],
                    "prompt_tokens": line["prompt_tokens"],
                    "completion_tokens": line["completion_tokens"],
                }
                for line in self.inference
            ],
        }


def usage_of(org, start: datetime | None = None, max_records: int = 1000) -> Usage:
    """The organization's usage in the month that begins at ``start`` (this month if None):
    its training ledger's lines newest first, at most ``max_records`` of them, and its
    inference per model (and adapter and alias) named, most tokens first."""
    start = start or month_start()
    end = (start.replace(day=28) + timedelta(days=4)).replace(day=1)
    ledger = UsageRecord.objects.for_org(org)
    answered = InferenceUsage.objects.for_org(org)
    in_month = ledger.filter(created_at__gte=start, created_at__lt=end)
    totals = in_month.aggregate(
        trained_tokens=Sum("trained_tokens"), compute_seconds=Sum("compute_seconds")
    )
    inference = (
        answered.filter(created_at__gte=start, created_at__lt=end)
        .values("model", "adapter_id", "alias")
        .annotate(
            requests=Count("id"),
            prompt_tokens=Sum("prompt_tokens"),
            completion_tokens=Sum("completion_tokens"),
        )
        .order_by("model", "adapter_id", "alias")
    )
    return Usage(
        org_id=org.id,
        month=start,
        trained_tokens=int(totals["trained_tokens"] or 0),
        compute_seconds=totals["compute_seconds"] or 0,
        storage_bytes=storage_bytes(org),
        limits=Quota.for_org(org).limits(),
        months=_months(ledger, answered),
        records=list(in_month.order_by("-created_at")[:max_records]),
        inference=sorted(
            (
                {
                    **line,
                    "prompt_tokens": int(line["prompt_tokens"] or 0),
                    "completion_tokens": int(line["completion_tokens"] or 0),
                }
                for line in inference
            ),
            key=lambda line: -(line["prompt_tokens"] + line["completion_tokens"]),
        ),
    )


def _months(ledger, answered) -> list[dict]:
    """Every month with a line in either ledger, newest first."""
    months: dict[datetime, dict] = {}
    empty = {
        "trained_tokens": 0,
        "compute_seconds": 0,
        "jobs": 0,
        "inference_requests": 0,
        "inference_prompt_tokens": 0,
        "inference_completion_tokens": 0,
    }
    for row in (
        ledger.annotate(month=TruncMonth("created_at"))
        .values("month")
        .annotate(
            trained_tokens=Sum("trained_tokens"),
            compute_seconds=Sum("compute_seconds"),
            jobs=Count("id"),
        )
        .order_by()
    ):
        months.setdefault(row["month"], dict(empty)).update(
            trained_tokens=int(row["trained_tokens"] or 0),
            compute_seconds=row["compute_seconds"] or 0,
            jobs=row["jobs"],
        )
    for row in (
        answered.annotate(month=TruncMonth("created_at"))
        .values("month")
        .annotate(
            requests=Count("id"),
            prompt_tokens=Sum("prompt_tokens"),
            completion_tokens=Sum("completion_tokens"),
        )
        .order_by()
    ):
        months.setdefault(row["month"], dict(empty)).update(
            inference_requests=row["requests"],
            inference_prompt_tokens=int(row["prompt_tokens"] or 0),
            inference_completion_tokens=int(row["completion_tokens"] or 0),
        )
    return [{"month": month, **months[month]} for month in sorted(months, reverse=True)]


@dataclass(frozen=True)
class Meter:
    """One quota: how much is used of the limit (None: no limit; 0: nothing is allowed)."""

    used: int
    limit: int | None
    reserved: int = 0

    @property
    def percent(self) -> int | None:
        if self.limit is None:
            return None
        if self.limit == 0:
            return 100
        return min(100, round(100 * self.used / self.limit))

    @property
    def reached(self) -> bool:
        return self.limit is not None and self.used >= self.limit


@dataclass(frozen=True)
class QuotaMeters:
    monthly_trained_tokens: Meter
    storage_bytes: Meter
    concurrent_jobs: Meter


def quota_meters(org, usage: Usage) -> QuotaMeters:
    """Each quota as ``Quota.check_new_job`` and ``check_new_bytes`` count it, from ``usage``
    of this month: the month's trained tokens include what unfinished jobs have reserved."""
    active = FineTuneJob.objects.for_org(org).filter(status__in=FineTuneJob.ACTIVE)
    tokens = trained_tokens_this_month(org, active)
    return QuotaMeters(
        monthly_trained_tokens=Meter(
            tokens, usage.limits["monthly_trained_tokens"], reserved=tokens - usage.trained_tokens
        ),
        storage_bytes=Meter(usage.storage_bytes, usage.limits["storage_bytes"]),
        concurrent_jobs=Meter(concurrent_work(org), usage.limits["concurrent_jobs"]),
    )
