"""Browser pages of the fine-tuning domain: datasets, evaluations and leaderboards, the
playground."""

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_POST

from jobs import inference
from jobs.api.evaluations import GenerateSerializer
from jobs.models import Adapter, Evaluation, File, FileInUse
from jobs.playground import (
    GenerationFailed,
    answer_deadline,
    collect,
    read_events,
    start_generation,
)
from loft.tenancy import org_or_404

# The scores shown for each model, in this order: (label, key, higher is better).
METRIC_COLUMNS = [
    ("Exact match", "exact_match", True),
    ("Normalized exact match", "normalized_exact_match", True),
    ("ROUGE-L", "rouge_l", True),
    ("Loss", "loss", False),
    ("Perplexity", "perplexity", False),
    ("Token accuracy", "token_accuracy", True),
]


@login_required
def dataset_list(request):
    org = org_or_404(request)
    # The list shows no report, which can hold 100 row errors and a preview per file.
    files = File.objects.for_org(org).defer("report").order_by("-created_at")[:200]
    return render(
        request, "jobs/dataset_list.html", {"files": files, "purposes": File.Purpose.choices}
    )


@login_required
def dataset_detail(request, file_id: str):
    file = get_object_or_404(File.objects.for_org(org_or_404(request)), pk=file_id)
    return render(request, "jobs/dataset_detail.html", {"file": file, "report": file.report})


@login_required
@require_POST
def dataset_delete(request, file_id: str):
    file = get_object_or_404(File.objects.for_org(org_or_404(request)), pk=file_id)
    try:
        file.delete_with_content()
    except FileInUse as error:
        messages.error(request, str(error))
        return redirect("dataset-detail", file_id=file.id)
    messages.success(request, f"Deleted {file.filename}.")
    return redirect("dataset-list")


# --- evaluations, leaderboards, playground -------------------------------------------------


@login_required
def evaluation_detail(request, evaluation_id: str):
    org = org_or_404(request)
    evaluation = get_object_or_404(
        Evaluation.objects.for_org(org).select_related("base_model", "file", "adapter"),
        pk=evaluation_id,
    )
    return render(
        request,
        "jobs/evaluation_detail.html",
        {
            "evaluation": evaluation,
            "models": evaluation.scores_by_model(),
            "metrics": METRIC_COLUMNS,
            "samples": evaluation.results.get("samples", []),
            "forgetting": evaluation.results.get("forgetting"),
            "precision": evaluation.results.get("base_precision"),
        },
    )


@login_required
def leaderboard(request, file_id: str):
    """Every model evaluated on one eval file, best first."""
    org = org_or_404(request)
    file = get_object_or_404(File.objects.for_org(org), pk=file_id)
    runs = Evaluation.objects.for_org(org).filter(
        file=file, kind=Evaluation.Kind.CUSTOM, status=Evaluation.Status.SUCCEEDED
    )
    return render(
        request,
        "jobs/leaderboard.html",
        {"file": file, "entries": Evaluation.leaderboard(runs), "metrics": METRIC_COLUMNS},
    )


@login_required
def playground(request, adapter_id: str):
    """The adapter and its base answering the same conversation side by side. With
    JavaScript both answers stream in from /v1/adapters/{id}/generate; without, the form posts
    here and the page comes back with both answers."""
    org = org_or_404(request)
    adapter = get_object_or_404(
        Adapter.objects.for_org(org).select_related("base_model"), pk=adapter_id
    )
    context = {"adapter": adapter, "system": "", "prompt": "", "max_tokens": 128, "temperature": 0}
    if request.method == "POST":
        system, prompt = request.POST.get("system", ""), request.POST.get("prompt", "")
        messages = [{"role": "system", "content": system}] if system.strip() else []
        form = GenerateSerializer(
            data={
                "messages": [*messages, {"role": "user", "content": prompt}],
                "max_tokens": request.POST.get("max_tokens") or 128,
                "temperature": request.POST.get("temperature") or 0,
            }
        )
        context.update(system=system, prompt=prompt)
        if not form.is_valid():
            context["error"] = _first_error(form.errors)
        else:
            values = {
                **form.validated_data,
                "messages": [dict(m) for m in form.validated_data["messages"]],
            }
            values.pop("stream", None)
            context.update(max_tokens=values["max_tokens"], temperature=values["temperature"])
            try:
                context["answers"] = _side_by_side(adapter, values)
            except (
                inference.PromptRefused,
                inference.TooManyRequests,
                inference.InferenceUnavailable,
                GenerationFailed,
            ) as error:
                context["error"] = str(error)
    return render(request, "jobs/playground.html", context)


def _side_by_side(adapter: Adapter, values: dict) -> dict:
    """The base's and the adapter's answers, both queued at once and waited for within one
    request's timeout, holding one of the organization's places."""
    inference.check_prompt_fits(adapter.base_model, values["messages"], values["max_tokens"])
    with inference.take_slot(adapter.org_id):
        answer_by = answer_deadline()
        request_ids = {
            side: start_generation(adapter, {**values, "with_adapter": with_adapter}, answer_by)
            for side, with_adapter in (("base", False), ("adapter", True))
        }
        return {
            side: collect(read_events(request_id, answer_by))
            for side, request_id in request_ids.items()
        }


def _first_error(errors) -> str:
    while isinstance(errors, dict | list):
        errors = next(iter(errors.values())) if isinstance(errors, dict) else errors[0]
    return str(errors)
