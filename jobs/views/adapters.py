"""Browser pages of adapters: the list, one adapter, and its merged weights.

The adapter zip itself is the API's route (``/v1/adapters/<id>/download`` accepts the browser
session); merged weights are made on request by a worker (worker/merging.py) and streamed from
here as a zip.
"""

from __future__ import annotations

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.db.models import Prefetch
from django.http import StreamingHttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_POST

from jobs import lineage
from jobs.api.fine_tuning import zip_folder
from jobs.models import Adapter, AliasMove, Evaluation, QuotaExceeded
from loft.tenancy import org_or_404

# The headline score of an evaluation, the first that both models have: (label, key, percent).
HEADLINE_METRICS = [
    ("preference accuracy", "preference_accuracy", True),  # a DPO adapter's held-out pairs
    ("exact match", "exact_match", True),
    ("ROUGE-L", "rouge_l", True),
    ("loss", "loss", False),
]


def _adapters(request):
    latest_job_evaluation = Prefetch(
        "evaluations",
        queryset=Evaluation.objects.filter(kind=Evaluation.Kind.JOB).order_by("-created_at"),
        to_attr="job_evaluations",
    )
    return (
        Adapter.objects.for_org(org_or_404(request))
        .select_related("base_model", "parent")
        .prefetch_related(latest_job_evaluation)
    )


def headline(evaluation: Evaluation | None) -> str:
    """Base → adapter on held-out rows, e.g. "exact match 0% → 90%": preference accuracy on
    preference pairs, else exact match where either model matched a reference at all, else
    ROUGE-L, else the loss."""
    if evaluation is None:
        return ""
    base, adapter = evaluation.results.get("base") or {}, evaluation.results.get("adapter") or {}
    for label, key, percent in HEADLINE_METRICS:
        before, after = base.get(key), adapter.get(key)
        if before is None or after is None or (key == "exact_match" and not before + after):
            continue
        if percent:
            return f"{label} {before:.0%} → {after:.0%}"
        return f"{label} {before:.3g} → {after:.3g}"
    return ""


def _with_headline(adapter: Adapter) -> Adapter:
    adapter.evaluation = next(iter(adapter.job_evaluations), None)
    adapter.headline = headline(adapter.evaluation)
    adapter.worse_than_base = (adapter.metrics or {}).get("verdict", {}).get("better") is False
    return adapter


@login_required
def adapter_list(request):
    adapters = _adapters(request).defer("manifest", "merged_manifest").order_by("-created_at")
    return render(
        request, "jobs/adapter_list.html", {"adapters": [_with_headline(a) for a in adapters[:200]]}
    )


@login_required
def adapter_detail(request, adapter_id: str):
    adapter = _with_headline(get_object_or_404(_adapters(request), pk=adapter_id))
    files = sorted(adapter.manifest.get("files", {}).items())
    # A candidate an alias's gate refused (a continual policy's child, most often) is flagged
    # with the gate's reasons; a later promotion to it lifts the flag.
    moves = AliasMove.objects.for_org(adapter.org_id).filter(to_adapter=adapter.id)
    refusals = [
        move
        for move in moves.filter(kind=AliasMove.Kind.REFUSED).select_related("alias")
        if not moves.filter(
            alias=move.alias, kind__in=PROMOTIONS, created_at__gt=move.created_at
        ).exists()
    ]
    return render(
        request,
        "jobs/adapter_detail.html",
        {"adapter": adapter, "files": files, "refusals": refusals},
    )


PROMOTIONS = (AliasMove.Kind.PROMOTED, AliasMove.Kind.FORCED)


@login_required
def adapter_lineage(request, adapter_id: str):
    """The versions the adapter was trained along, with each one's score on every task of the
    chain: a table and a chart (jobs/lineage.py)."""
    adapter = get_object_or_404(_adapters(request), pk=adapter_id)
    report = lineage.lineage(adapter)
    versions = report["versions"]
    names = {version["id"]: version["name"] for version in versions}
    tasks = []
    for number, task in enumerate(report["tasks"], start=1):
        scores = [version["scores"][task] for version in versions]
        metric = lineage.task_metric(scores)
        values = [(s or {}).get(metric) for s in scores]
        tasks.append(
            {
                "number": number,
                "adapter": task,
                "name": names[task],
                "label": "exact match" if metric == "normalized_exact_match" else "ROUGE-L",
                "values": values,
            }
        )
    for index, version in enumerate(versions):
        version["cells"] = [task["values"][index] for task in tasks]
    return render(
        request,
        "jobs/adapter_lineage.html",
        {
            "adapter": adapter,
            "versions": versions,
            "tasks": tasks,
            "chart": lineage_chart(tasks, len(versions)),
            "children": report["children"],
        },
    )


LINEAGE_CHART = {"width": 480, "height": 180, "margin": 24}


def lineage_chart(tasks: list[dict], versions: int) -> dict:
    """Each task's score (0 to 1) across the versions, as SVG polylines."""
    width, height, margin = (LINEAGE_CHART[k] for k in ("width", "height", "margin"))

    def x(index: int) -> float:
        return round(margin + (width - 2 * margin) * index / max(versions - 1, 1), 1)

    def y(value: float) -> float:
        return round(margin + (height - 2 * margin) * (1 - value), 1)

    lines = [
        {
            "number": task["number"],
            "points": " ".join(
                f"{x(i)},{y(v)}" for i, v in enumerate(task["values"]) if v is not None
            ),
        }
        for task in tasks
    ]
    return {
        **LINEAGE_CHART,
        "lines": lines,
        "xs": [x(i) for i in range(versions)],
        "top": y(1),
        "bottom": y(0),
        "right": width - margin,
    }


@login_required
@require_POST
def adapter_merge(request, adapter_id: str):
    adapter = get_object_or_404(Adapter.objects.for_org(org_or_404(request)), pk=adapter_id)
    try:
        queued = adapter.request_merge()
    except QuotaExceeded as error:
        messages.error(request, str(error))
    else:
        if queued:
            messages.success(request, "Preparing merged weights; this takes a few minutes.")
        else:
            messages.info(request, f"Merged weights are already {adapter.merged_status}.")
    return redirect("adapter-detail", adapter_id=adapter.id)


@login_required
def adapter_merged_download(request, adapter_id: str):
    adapter = get_object_or_404(
        Adapter.objects.for_org(org_or_404(request)),
        pk=adapter_id,
        merged_status=Adapter.MergedStatus.READY,
    )
    archive = zip_folder(adapter.merged_prefix, adapter.merged_manifest, adapter.created_at)
    response = StreamingHttpResponse(archive, content_type="application/zip")
    filename = adapter.name.replace(":", "_").replace("/", "_") + "-merged.zip"
    response["Content-Disposition"] = f'attachment; filename="{filename}"'
    return response
