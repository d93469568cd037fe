"""The jobs list and the live job page.

The job page is server-rendered; its live part (status, progress, loss chart, events,
checkpoints, and the evaluation once done) is a fragment at ``/jobs/<id>/live`` that
static/loft/live.js fetches every two seconds and swaps in, until the job has finished. Without
JavaScript the page is the same, a reload away.

A job logs an event per training step, so the fragment reads a bounded part of them whatever the
job's length: the newest SHOWN_EVENTS, and at most CHART_POINTS losses sampled evenly along the
run for the chart.
"""

from __future__ import annotations

import math

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.db.models import F, Window
from django.db.models.functions import RowNumber
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_POST

from jobs.models import FineTuneJob
from jobs.views.datasets import metric_columns
from loft.tenancy import org_or_404

CHART_WIDTH, CHART_HEIGHT, CHART_MARGIN = 640, 220, 36
SHOWN_EVENTS = 40
CHART_POINTS = 200  # a polyline this wide shows no more; a long run's curve keeps its shape


@login_required
def job_list(request):
    org = org_or_404(request)
    jobs = FineTuneJob.objects.for_org(org).select_related("base_model", "training_file")
    return render(request, "jobs/job_list.html", {"jobs": jobs.order_by("-created_at")[:100]})


def _job(request, job_id: str) -> FineTuneJob:
    queryset = FineTuneJob.objects.for_org(org_or_404(request)).select_related(
        "base_model", "training_file", "adapter"
    )
    return get_object_or_404(queryset, pk=job_id)


@login_required
def job_detail(request, job_id: str):
    job = _job(request, job_id)
    return render(request, "jobs/job_detail.html", _live_context(job))


@login_required
def job_live(request, job_id: str):
    return render(request, "jobs/_job_live.html", _live_context(_job(request, job_id)))


@login_required
@require_POST
def job_cancel(request, job_id: str):
    job = _job(request, job_id)
    if job.status in FineTuneJob.FINISHED:
        messages.error(request, f"The job has already {job.status}; there is nothing to cancel.")
    else:
        job.request_cancel()
        messages.success(request, "Cancel requested: the job stops at its next step.")
    return redirect("job-detail", job_id=job.id)


@login_required
@require_POST
def job_pause(request, job_id: str):
    job = _job(request, job_id)
    if job.request_pause():
        if job.status == FineTuneJob.Status.PAUSED:
            messages.success(request, "Paused before it started. Resume it to queue it again.")
        else:
            messages.success(request, "Pause requested: the job saves a checkpoint and waits.")
    else:
        messages.error(request, f"The job is {job.status}; only a queued or running job pauses.")
    return redirect("job-detail", job_id=job.id)


@login_required
@require_POST
def job_resume(request, job_id: str):
    job = _job(request, job_id)
    if job.request_resume():
        messages.success(request, "Resumed: the job is queued and goes on from its checkpoint.")
    else:
        messages.error(request, f"The job is {job.status}, not paused; there is nothing to resume.")
    return redirect("job-detail", job_id=job.id)


def _live_context(job: FineTuneJob) -> dict:
    events = list(job.events.order_by("-pk")[:SHOWN_EVENTS])
    losses = sampled_losses(job, CHART_POINTS)
    measured = sampled_losses(job, CHART_POINTS, "validation_loss")
    validation = (job.metrics or {}).get("validation_loss")
    progress = job.progress or {}
    evaluation = max(job.evaluations.all(), key=lambda e: e.created_at, default=None)
    models = evaluation.scores_by_model() if evaluation else []
    return {
        "job": job,
        "finished": job.status in FineTuneJob.FINISHED,
        "waiting": job.waiting_reason(),
        "events": events,
        "checkpoints": job.checkpoints.order_by("step"),
        "percent": _percent(progress),
        "progress": progress,
        "chart": loss_chart(losses, validation, progress.get("total_steps") or 0, measured),
        "evaluation": evaluation,
        "models": models,
        "retention": evaluation.retention() if evaluation else [],
        "metrics": metric_columns(models),
        "adapter": getattr(job, "adapter", None),
        "timings": time_spent(job.timings or {}),
    }


PHASE_LABELS = (  # FineTuneJob.PHASES, in words
    "Waiting in the queue",
    "Setup (data, base model)",
    "Training",
    "Evaluation (base and adapter)",
    "Saving and uploading the adapter",
)


def time_spent(timings: dict) -> list[dict]:
    """The job's phases (worker/training.py PhaseClock) as rows: label, seconds and share of
    the total; the phases a job did not reach are left out."""
    total = timings.get("total") or 0
    return [
        {
            "phase": phase,
            "label": label,
            "seconds": timings[phase],
            "percent": round(100 * timings[phase] / total) if total else None,
        }
        for phase, label in zip(FineTuneJob.PHASES, PHASE_LABELS, strict=True)
        if timings.get(phase) is not None
    ]


def sampled_losses(
    job: FineTuneJob, most: int, kind: str = "train_loss"
) -> list[tuple[int, float]]:
    """(step, loss) of the job's events that carry ``kind`` (the training loss of its steps,
    or the held-out loss measured during training), in order: all of them up to ``most``,
    else ``most`` taken at even intervals, the first and the latest among them. Picked by the
    database, which numbers the rows; only the chosen ones are read."""
    with_loss = job.events.filter(data__has_key=kind)
    count = with_loss.count()
    if count <= most:
        wanted = range(1, count + 1)
    else:
        stride = (count - 1) / (most - 1)
        wanted = sorted({1 + math.floor(i * stride) for i in range(most - 1)} | {count})
    numbered = with_loss.annotate(number=Window(RowNumber(), order_by=F("pk").asc()))
    rows = numbered.filter(number__in=list(wanted)).order_by("pk")
    return list(rows.values_list("data__step", f"data__{kind}"))


def _percent(progress: dict) -> int:
    total = progress.get("total_steps") or 0
    return int(100 * progress.get("step", 0) / total) if total else 0


def loss_chart(
    losses: list[tuple[int, float]],
    validation: float | None,
    steps: int,
    measured: list[tuple[int, float]] = (),
) -> dict:
    """Training loss per step as an SVG polyline, and the held-out loss dashed: as measured
    during training where it was, else as a line at its value after training.
    Coordinates for templates/jobs/_job_live.html (no charting library needed)."""
    if not losses:
        return {}
    values = [loss for _, loss in [*losses, *measured]]
    values += [validation] if validation is not None else []
    top, bottom = max(values), min(min(values), 0.0)
    span = (top - bottom) or 1.0
    last_step = max(steps, losses[-1][0], 1)
    inner_w, inner_h = CHART_WIDTH - 2 * CHART_MARGIN, CHART_HEIGHT - 2 * CHART_MARGIN

    def x(step: float) -> float:
        return round(CHART_MARGIN + inner_w * step / last_step, 1)

    def y(loss: float) -> float:
        return round(CHART_MARGIN + inner_h * (top - loss) / span, 1)

    return {
        "width": CHART_WIDTH,
        "height": CHART_HEIGHT,
        "points": " ".join(f"{x(step)},{y(loss)}" for step, loss in losses),
        "validation_y": y(validation) if validation is not None and not measured else None,
        "validation_points": " ".join(f"{x(step)},{y(loss)}" for step, loss in measured),
        "left": CHART_MARGIN,
        "right": CHART_WIDTH - CHART_MARGIN,
        "top": CHART_MARGIN,
        "bottom": CHART_HEIGHT - CHART_MARGIN,
        "top_label": f"{top:.3g}",
        "bottom_label": f"{bottom:.3g}",
        "last_step": last_step,
        "latest": f"{losses[-1][1]:.4f}",
        "validation": f"{validation:.4f}" if validation is not None else None,
    }
