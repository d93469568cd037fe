"""The operators' view of a running Loft: ``/ops/`` for people, and the figures ``/metrics``
(jobs/metrics.py) serves to Prometheus, computed by the same functions.

Every figure is read when asked, from PostgreSQL (the truth), the broker (queue depth) and the
workers' heartbeat rows (worker/presence.py), so any web process answers the same. The page's
live part is a fragment at ``/ops/live`` that static/loft/live.js swaps in every few seconds.
Staff only: a signed-in person who is not staff gets 403, an anonymous one the login form.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import timedelta

import redis
from django.conf import settings
from django.db.models import Count, Q, Sum
from django.utils import timezone

from engine import plan as planning
from jobs import preflight, tasks
from jobs.models import (
    Adapter,
    File,
    FineTuneJob,
    InferenceUsage,
    UsageRecord,
    WorkerHeartbeat,
    month_start,
)
from jobs.models.jobs import no_worker_sentence, routed_class
from loft.models import Organization

RECENT = timedelta(hours=24)
# A worker that has not reported for this long is dropped from the page (it is in the admin).
FORGOTTEN_AFTER = timedelta(hours=1)
LATEST_FAILURES = 10


def queues() -> list[str]:
    """Every queue Loft sends to: each known worker class's training queue, the queues online
    workers consume (an inference queue per base, say), and the shared ones; one name may
    serve several purposes."""
    names = {
        settings.CELERY_TASK_DEFAULT_QUEUE,
        settings.LOFT_INFERENCE_QUEUE,
        settings.LOFT_WEBHOOK_QUEUE,
        settings.LOFT_MAINTENANCE_QUEUE,
        *(tasks.training_queue(worker.name) for worker in preflight.known_classes()),
    }
    for consumed in WorkerHeartbeat.online().values_list("queues", flat=True):
        names.update(consumed)
    return sorted(names)


@dataclass
class ClassView:
    """One worker class as operators see it: what it declares, its queue, its workers online
    and the jobs waiting for it (with a sentence when none of its workers is online)."""

    spec: planning.WorkerClass
    queue: str
    workers_online: int
    jobs_queued: int
    jobs_running: int

    @property
    def waiting(self) -> str | None:
        if self.jobs_queued and not self.workers_online:
            return no_worker_sentence(self.spec.name)
        return None


def class_views() -> list[ClassView]:
    """Every known class (pre-flight's), with its workers and jobs."""
    online = WorkerHeartbeat.online_by_class()
    classes = preflight.known_classes()
    known = {worker.name for worker in classes}
    by_class: dict[tuple[str, str], int] = {}
    unfinished = FineTuneJob.objects.filter(
        status__in=(FineTuneJob.Status.QUEUED, FineTuneJob.Status.RUNNING)
    )
    for status, plan in unfinished.values_list("status", "plan"):
        name = routed_class(plan, known)
        by_class[name, status] = by_class.get((name, status), 0) + 1
    return [
        ClassView(
            spec=worker,
            queue=tasks.training_queue(worker.name),
            workers_online=online.get(worker.name, 0),
            jobs_queued=by_class.get((worker.name, FineTuneJob.Status.QUEUED), 0),
            jobs_running=by_class.get((worker.name, FineTuneJob.Status.RUNNING), 0),
        )
        for worker in classes
    ]


def queue_depths() -> dict[str, int | None]:
    """Messages waiting in each queue (a Redis list per queue); None if the broker is down."""
    connection = redis.Redis.from_url(settings.CELERY_BROKER_URL, socket_timeout=2)
    try:
        return {queue: connection.llen(queue) for queue in queues()}
    except redis.RedisError:
        return dict.fromkeys(queues())
    finally:
        connection.close()


def percentile(values: list[float], share: float) -> float | None:
    """The nearest-rank percentile (``share`` in 0..1); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(share * len(ordered)) - 1)]


def spread(values: list[float]) -> dict:
    return {
        "count": len(values),
        "p50": percentile(values, 0.5),
        "p90": percentile(values, 0.9),
        "p99": percentile(values, 0.99),
    }


def run_seconds(since) -> list[float]:
    """Run time (first start to end) of the jobs that finished since ``since``."""
    return [
        (finished - started).total_seconds()
        for started, finished in FineTuneJob.objects.filter(
            finished_at__gte=since, started_at__isnull=False
        ).values_list("started_at", "finished_at")
    ]


def phase_seconds(since) -> dict[str, list[float]]:
    """Each phase's seconds (the job's timings) over the jobs that finished since ``since``."""
    spent: dict[str, list[float]] = {phase: [] for phase in FineTuneJob.PHASES}
    finished = FineTuneJob.objects.filter(finished_at__gte=since).exclude(timings={})
    for timings in finished.values_list("timings", flat=True):
        for phase in FineTuneJob.PHASES:
            if timings.get(phase) is not None:
                spent[phase].append(timings[phase])
    return spent


def wait_seconds(since) -> list[float]:
    """Queue wait (created to first start) of the jobs that started since ``since``."""
    return [
        (started - created).total_seconds()
        for created, started in FineTuneJob.objects.filter(started_at__gte=since).values_list(
            "created_at", "started_at"
        )
    ]


@dataclass
class Tenant:
    org: Organization
    jobs_active: int
    trained_tokens_month: int
    storage_bytes: int
    inference_tokens_month: int = 0


def tenants() -> list[Tenant]:
    """Every organization's running work, tokens trained and inference tokens (prompt and
    completion) this month, and bytes stored; the largest users first. Five grouped queries,
    whatever the number of organizations."""
    active = dict(
        FineTuneJob.objects.filter(status__in=FineTuneJob.ACTIVE)
        .values("org")
        .annotate(n=Count("id"))
        .values_list("org", "n")
    )
    tokens = dict(
        UsageRecord.objects.filter(created_at__gte=month_start())
        .values("org")
        .annotate(n=Sum("trained_tokens"))
        .values_list("org", "n")
    )
    files = dict(
        File.objects.exclude(status=File.Status.ERROR)
        .values("org")
        .annotate(n=Sum("bytes"))
        .values_list("org", "n")
    )
    adapters = dict(
        Adapter.objects.values("org").annotate(n=Sum("size_bytes")).values_list("org", "n")
    )
    answered = dict(
        InferenceUsage.objects.filter(created_at__gte=month_start())
        .values("org")
        .annotate(n=Sum("prompt_tokens") + Sum("completion_tokens"))
        .values_list("org", "n")
    )
    rows = [
        Tenant(
            org,
            active.get(org.pk, 0),
            tokens.get(org.pk) or 0,
            (files.get(org.pk) or 0) + (adapters.get(org.pk) or 0),
            answered.get(org.pk) or 0,
        )
        for org in Organization.objects.order_by("slug")
    ]
    return sorted(
        rows,
        key=lambda t: (
            -t.trained_tokens_month,
            -t.inference_tokens_month,
            -t.storage_bytes,
            t.org.slug,
        ),
    )


def inference_totals() -> dict[str, int]:
    """Answered inference requests and their prompt and completion tokens since the ledger
    began: counters for /metrics, summed from the rows the inference workers write."""
    totals = InferenceUsage.objects.aggregate(
        requests=Count("id"), prompt=Sum("prompt_tokens"), completion=Sum("completion_tokens")
    )
    return {name: int(value or 0) for name, value in totals.items()}


# --- the jobs-over-time chart, drawn by the server as SVG (as the job page's loss chart) -----

CHART_WIDTH, CHART_HEIGHT, CHART_MARGIN = 640, 180, 30
CHART_SERIES = ("succeeded", "failed", "other")


def jobs_per_hour(now, hours: int = 24) -> list[dict]:
    """Jobs created in each of the last ``hours`` hours, by how they stand now."""
    start = now.replace(minute=0, second=0, microsecond=0) - timedelta(hours=hours - 1)
    buckets = [
        {"start": start + timedelta(hours=i), "succeeded": 0, "failed": 0, "other": 0}
        for i in range(hours)
    ]
    for created, status in FineTuneJob.objects.filter(created_at__gte=start).values_list(
        "created_at", "status"
    ):
        index = min(hours - 1, int((created - start).total_seconds() // 3600))
        series = status if status in ("succeeded", "failed") else "other"
        buckets[index][series] += 1
    return buckets


def jobs_chart(buckets: list[dict]) -> dict:
    """Stacked bars, one per hour; the tallest bar reaches the top."""
    tallest = max((sum(b[s] for s in CHART_SERIES) for b in buckets), default=0) or 1
    inner_w = CHART_WIDTH - 2 * CHART_MARGIN
    inner_h = CHART_HEIGHT - 2 * CHART_MARGIN
    slot = inner_w / max(1, len(buckets))
    bars = []
    for i, bucket in enumerate(buckets):
        bottom = CHART_HEIGHT - CHART_MARGIN
        for series in CHART_SERIES:
            height = bucket[series] / tallest * inner_h
            if height:
                bars.append(
                    {
                        "x": round(CHART_MARGIN + i * slot + 1, 1),
                        "y": round(bottom - height, 1),
                        "width": round(max(1.0, slot - 2), 1),
                        "height": round(height, 1),
                        "series": series,
                        "title": f"{bucket['start']:%H:00}: {bucket[series]} {series}",
                    }
                )
                bottom -= height
    labels = [
        {"x": round(CHART_MARGIN + i * slot, 1), "text": f"{bucket['start']:%H:00}"}
        for i, bucket in enumerate(buckets)
        if i % 6 == 0
    ]
    return {
        "width": CHART_WIDTH,
        "height": CHART_HEIGHT,
        "bars": bars,
        "labels": labels,
        "tallest": tallest,
        "top": CHART_MARGIN,
        "baseline": CHART_HEIGHT - CHART_MARGIN,
        "left": CHART_MARGIN,
        "right": CHART_WIDTH - CHART_MARGIN,
        "empty": not any(sum(b[s] for s in CHART_SERIES) for b in buckets),
    }


def snapshot() -> dict:
    """Everything the dashboard shows, as of now."""
    now = timezone.now()
    since = now - RECENT
    recent = FineTuneJob.objects.filter(created_at__gte=since)
    by_status = dict(recent.values("status").annotate(n=Count("id")).values_list("status", "n"))
    ended = FineTuneJob.objects.filter(finished_at__gte=since)
    outcomes = ended.aggregate(
        finished=Count("id"),
        failed=Count("id", filter=Q(status=FineTuneJob.Status.FAILED)),
    )
    failures = (
        ended.filter(status=FineTuneJob.Status.FAILED)
        .select_related("org")
        .order_by("-finished_at")[:LATEST_FAILURES]
    )
    online = set(WorkerHeartbeat.online().values_list("hostname", flat=True))
    workers = WorkerHeartbeat.objects.filter(last_seen__gte=now - FORGOTTEN_AFTER)
    return {
        "now": now,
        "queues": queue_depths(),
        "workers": [(worker, worker.hostname in online) for worker in workers],
        "workers_online": len(online),
        "classes": class_views(),
        "by_status": [(status, by_status.get(status, 0)) for status in FineTuneJob.Status.values],
        "running": FineTuneJob.objects.filter(status=FineTuneJob.Status.RUNNING).count(),
        "wait": spread(wait_seconds(since)),
        "run": spread(run_seconds(since)),
        "finished": outcomes["finished"],
        "failed": outcomes["failed"],
        "failure_rate": outcomes["failed"] / outcomes["finished"] if outcomes["finished"] else None,
        "failures": failures,
        "tenants": tenants(),
        "chart": jobs_chart(jobs_per_hour(now)),
    }
