"""Prometheus ``/metrics``: what operators graph and alert on, computed when scraped.

Every figure but one comes from the database (the truth), the broker (queue depth) or the
workers' heartbeat rows, through the functions the ops page uses (jobs/ops.py), so any web
process answers the same. The exception is HTTP latency, timed in each web process
(loft/observability.py) and added up across processes under gunicorn. Access: a staff
session, or ``Authorization: Bearer <LOFT_METRICS_TOKEN>`` for a scraper; anyone else gets 403.
"""

from __future__ import annotations

import os

from django.db.models import Count, Sum
from django.http import HttpResponse
from django.utils import timezone
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest, multiprocess
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from jobs import ops
from jobs.models import File, FineTuneJob, WorkerHeartbeat
from loft.health import is_operator
from loft.observability import HTTP_LATENCY
from loft.views import permission_denied

DURATION_BUCKETS = (60, 300, 900, 3600, 4 * 3600, 12 * 3600)
PHASE_BUCKETS = (1, 5, 15, 30, 60, 300, 900, 3600, 4 * 3600)


class LoftCollector:
    def collect(self):
        by_status = GaugeMetricFamily("loft_jobs", "Fine-tuning jobs by status.", labels=["status"])
        counts = dict(
            FineTuneJob.objects.values("status").annotate(n=Count("id")).values_list("status", "n")
        )
        for status in FineTuneJob.Status.values:
            by_status.add_metric([status], counts.get(status, 0))
        yield by_status

        depth = GaugeMetricFamily(
            "loft_queue_depth", "Messages waiting in each Celery queue.", labels=["queue"]
        )
        for queue, waiting in ops.queue_depths().items():
            if waiting is not None:  # broker down: no figure rather than a false 0
                depth.add_metric([queue], waiting)
        yield depth

        workers = GaugeMetricFamily(
            "loft_workers_online", "Worker processes whose heartbeat is recent."
        )
        workers.add_metric([], WorkerHeartbeat.online().count())
        yield workers

        # By worker class: its training workers online, and its jobs waiting and running.
        classes = ops.class_views()
        class_workers = GaugeMetricFamily(
            "loft_class_workers_online", "Training workers online, by class.", labels=["class"]
        )
        class_jobs = GaugeMetricFamily(
            "loft_class_jobs",
            "Queued and running jobs, by the worker class they are routed to.",
            labels=["class", "status"],
        )
        for view in classes:
            class_workers.add_metric([view.spec.name], view.workers_online)
            class_jobs.add_metric([view.spec.name, "queued"], view.jobs_queued)
            class_jobs.add_metric([view.spec.name, "running"], view.jobs_running)
        yield class_workers
        yield class_jobs

        durations = ops.run_seconds(timezone.now() - ops.RECENT)
        buckets = [
            (str(bound), sum(1 for d in durations if d <= bound)) for bound in DURATION_BUCKETS
        ] + [("+Inf", len(durations))]
        yield HistogramMetricFamily(
            "loft_job_duration_seconds",
            "Run time of the jobs that finished in the last 24 hours.",
            buckets=buckets,
            sum_value=sum(durations),
        )

        phases = HistogramMetricFamily(
            "loft_job_phase_seconds",
            "Where the time of the jobs that finished in the last 24 hours went: queue, setup, "
            "training, evaluation, upload (the job's timings).",
            labels=["phase"],
        )
        for phase, seconds in ops.phase_seconds(timezone.now() - ops.RECENT).items():
            buckets = [
                (str(bound), sum(1 for s in seconds if s <= bound)) for bound in PHASE_BUCKETS
            ] + [("+Inf", len(seconds))]
            phases.add_metric([phase], buckets, sum(seconds))
        yield phases

        rate = GaugeMetricFamily(
            "loft_training_tokens_per_second", "Tokens per second of the running jobs, summed."
        )
        running = FineTuneJob.objects.filter(status=FineTuneJob.Status.RUNNING)
        rate.add_metric(
            [], sum((job.progress or {}).get("tokens_per_second", 0) for job in running)
        )
        yield rate

        uploaded = GaugeMetricFamily(
            "loft_uploaded_bytes", "Bytes of the uploaded files that are kept."
        )
        uploaded.add_metric([], File.objects.aggregate(total=Sum("bytes"))["total"] or 0)
        yield uploaded

        # From the ledger the inference workers write (another process), so any web process
        # answers the same; per organization only on /ops/, as trained tokens are.
        answered = ops.inference_totals()
        requests = CounterMetricFamily(
            "loft_inference_requests", "Inference requests answered (finished or cut off)."
        )
        requests.add_metric([], answered["requests"])
        yield requests
        tokens = CounterMetricFamily(
            "loft_inference_tokens",
            "Tokens of the answered inference requests: their prompts and their completions.",
            labels=["kind"],
        )
        tokens.add_metric(["prompt"], answered["prompt"])
        tokens.add_metric(["completion"], answered["completion"])
        yield tokens


def metrics(request):
    if not is_operator(request):
        return permission_denied(request)
    registry = CollectorRegistry()
    registry.register(LoftCollector())
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # Under gunicorn each web process times its own requests; add them all up.
        multiprocess.MultiProcessCollector(registry)
    else:
        registry.register(HTTP_LATENCY)
    return HttpResponse(generate_latest(registry), content_type=CONTENT_TYPE_LATEST)
