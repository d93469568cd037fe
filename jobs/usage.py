"""An organization's usage against its quotas: what ``GET /v1/usage`` answers and what the
usage page (jobs/views/usage.py) shows, computed once here."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from django.db.models import Count, Sum
from django.db.models.functions import TruncMonth

from jobs.models import (
    FineTuneJob,
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
            },
            "limits": self.limits,
            "months": [
                {
                    "month": row["month"].strftime("%Y-%m"),
                    "trained_tokens": row["trained_tokens"],
                    "compute_seconds": round(row["compute_seconds"], 1),
                    "jobs": row["jobs"],
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
        }


def usage_of(org, start: datetime | None = None, max_records: int = 1000) -> Usage:
    """The organization's usage in the month that begins at ``start`` (this month if None):
    its ledger lines newest first, at most ``max_records`` of them."""
    start = start or month_start()
    end = (start.replace(day=28) + timedelta(days=4)).replace(day=1)
    ledger = UsageRecord.objects.for_org(org)
    months = (
        ledger.annotate(month=TruncMonth("created_at"))
        .values("month")
        .annotate(
            trained_tokens=Sum("trained_tokens"),
            compute_seconds=Sum("compute_seconds"),
            jobs=Count("id"),
        )
        .order_by("-month")
    )
    in_month = ledger.filter(created_at__gte=start, created_at__lt=end)
    totals = in_month.aggregate(
        trained_tokens=Sum("trained_tokens"), compute_seconds=Sum("compute_seconds")
    )
    return Usage(
        org_id=org.id,
        month=start,
        trained_tokens=int(totals["trained_tokens"] or 0),
        compute_seconds=totals["compute_seconds"] or 0,
        storage_bytes=storage_bytes(org),
        limits=Quota.for_org(org).limits(),
        months=[
            {
                "month": row["month"],
                "trained_tokens": int(row["trained_tokens"] or 0),
                "compute_seconds": row["compute_seconds"] or 0,
                "jobs": row["jobs"],
            }
            for row in months
        ],
        records=list(in_month.order_by("-created_at")[:max_records]),
    )


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
