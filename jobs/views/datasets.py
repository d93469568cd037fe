"""Browser pages of the fine-tuning domain: datasets, evaluations and leaderboards, the
playground."""

import logging

import redis
from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_POST
from kombu.exceptions import OperationalError
from rest_framework import serializers

from jobs import inference
from jobs.api.chat import ChatMessageSerializer
from jobs.api.serializers import StrictSerializer
from jobs.models import Adapter, Alias, BaseModel, Evaluation, File, FileInUse
from jobs.playground import (
    GenerationFailed,
    answer_deadline,
    collect,
    find_target,
    read_events,
    start_generation,
)
from loft.tenancy import org_or_404

log = logging.getLogger(__name__)

# The scores shown for each model, in this order: (label, key, higher is better).
METRIC_COLUMNS = [
    ("Exact match", "exact_match", True),
    ("Normalized exact match", "normalized_exact_match", True),
    ("ROUGE-L", "rouge_l", True),
    ("Loss", "loss", False),
    ("Perplexity", "perplexity", False),
    ("Token accuracy", "token_accuracy", True),
]
# On preference pairs (a DPO job's held-out pairs, a preference eval file), first.
PREFERENCE_COLUMNS = [
    ("Preference accuracy", "preference_accuracy", True),
    ("Reward accuracy", "reward_accuracy", True),
    ("Reward margin", "reward_margin", True),
]


def metric_columns(models: list[dict]) -> list[tuple[str, str, bool]]:
    """The score columns for these models' scores: the preference ones where they have them."""
    if any(entry.get("preference_accuracy") is not None for entry in models):
        return PREFERENCE_COLUMNS + METRIC_COLUMNS
    return METRIC_COLUMNS


@login_required
def dataset_list(request):
    org = org_or_404(request)
    # The list shows no report, which can hold 100 row errors and a preview per file.
    files = File.objects.for_org(org).defer("report").order_by("-created_at")[:200]
    return render(
        request,
        "jobs/dataset_list.html",
        {"files": files, "purposes": [(p.value, p.label) for p in File.UPLOADABLE]},
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
    models = evaluation.scores_by_model()
    return render(
        request,
        "jobs/evaluation_detail.html",
        {
            "evaluation": evaluation,
            "models": models,
            "metrics": metric_columns(models),
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
    entries = Evaluation.leaderboard(runs)
    return render(
        request,
        "jobs/leaderboard.html",
        {"file": file, "entries": entries, "metrics": metric_columns(entries)},
    )


# The playground's columns: each answers the same conversation with the model picked for it.
PLAYGROUND_COLUMNS = 3


class PlaygroundForm(StrictSerializer):
    """The page's form without JavaScript: a conversation and how to answer it."""

    messages = serializers.ListField(child=ChatMessageSerializer(), min_length=1, max_length=100)
    max_tokens = serializers.IntegerField(min_value=1, max_value=settings.LOFT_INFERENCE_MAX_TOKENS)
    temperature = serializers.FloatField(min_value=0, max_value=2)


@login_required
def playground(request, adapter_id: str):
    """Up to three models side by side (by default the adapter's base and the adapter, and an
    alias of the adapter if it has one), each picked from the base models, the organization's
    adapters and its aliases, all answering the same conversation. With JavaScript each answer
    streams in from /v1/chat/completions (the page's session and CSRF token authenticate it);
    without, the form posts here and the page comes back with every answer."""
    org = org_or_404(request)
    adapter = get_object_or_404(
        Adapter.objects.for_org(org).select_related("base_model"), pk=adapter_id
    )
    choices = _model_choices(org)
    alias = next((a for a in choices["aliases"] if a.adapter_id == adapter.id), None)
    picked = [adapter.base_model.name, adapter.id, alias.name if alias else ""]
    context = {
        "adapter": adapter,
        "choices": choices,
        "system": "",
        "prompt": "",
        "max_tokens": 128,
        "temperature": 0,
    }
    if request.method == "POST":
        sent = request.POST.getlist("model")
        if sent:  # the page's pickers; a form without them gets the default columns
            picked = [*sent, *[""] * PLAYGROUND_COLUMNS][:PLAYGROUND_COLUMNS]
        system, prompt = request.POST.get("system", ""), request.POST.get("prompt", "")
        conversation = [{"role": "system", "content": system}] if system.strip() else []
        form = PlaygroundForm(
            data={
                "messages": [*conversation, {"role": "user", "content": prompt}],
                "max_tokens": request.POST.get("max_tokens") or 128,
                "temperature": request.POST.get("temperature") or 0,
            }
        )
        context.update(system=system, prompt=prompt)
        if not any(picked):
            context["error"] = "Pick a model for at least one column."
        elif not form.is_valid():
            context["error"] = _first_error(form.errors)
        else:
            values = form.validated_data
            context.update(max_tokens=values["max_tokens"], temperature=values["temperature"])
            generation = {
                "messages": [dict(m) for m in values["messages"]],
                "max_tokens": values["max_tokens"],
                "temperature": values["temperature"],
                "top_p": 1.0,
                "stop": [],
                "seed": None,
            }
            try:
                context["answers"] = _side_by_side(org, picked, generation)
            except (
                inference.PromptRefused,
                inference.TooManyRequests,
                inference.InferenceUnavailable,
            ) as error:
                context["error"] = str(error)
    context["columns"] = [
        {"number": number, "model": model, "answer": context.get("answers", {}).get(number)}
        for number, model in enumerate(picked, start=1)
    ]
    return render(request, "jobs/playground.html", context)


def _model_choices(org) -> dict:
    """What a column may pick: the enabled base models, the organization's adapters and its
    aliases (each with the adapter it points to)."""
    return {
        "bases": list(BaseModel.objects.enabled().order_by("name")),
        "adapters": list(Adapter.objects.for_org(org).order_by("-created_at")[:200]),
        "aliases": list(Alias.objects.for_org(org).select_related("adapter").order_by("name")),
    }


def _side_by_side(org, picked: list[str], generation: dict) -> dict[int, dict]:
    """Each picked column's answer (``text``, ``finish_reason``, ``usage``) or ``error``, by
    column number. All are queued at once under one admission for their tokens together and
    waited for within one request's timeout; a column whose model is gone or whose generation
    broke says so in a sentence, and the others still answer."""
    answers: dict[int, dict] = {}
    targets = {}
    for number, model in enumerate(picked, start=1):
        if not model:
            continue
        target = find_target(org, model)
        if target is None:
            answers[number] = {"error": f"The model '{model}' no longer exists."}
        else:
            targets[number] = target
    if not targets:
        return answers
    tokens = sum(
        inference.check_prompt_fits(t.base_model, generation["messages"], generation["max_tokens"])
        + generation["max_tokens"]
        for t in targets.values()
    )
    with inference.admit(org.id, tokens):
        answer_by = answer_deadline()
        try:
            request_ids = {
                number: start_generation(org.id, target, generation, answer_by)
                for number, target in targets.items()
            }
        except (OperationalError, redis.RedisError) as error:
            log.warning("queueing playground requests: %s", error)
            raise inference.InferenceUnavailable(
                "The inference workers cannot be reached right now; try again later."
            ) from None
        for number, request_id in request_ids.items():
            try:
                answers[number] = collect(read_events(request_id, answer_by))
            except GenerationFailed as error:
                answers[number] = {"error": str(error)}
    return answers


def _first_error(errors) -> str:
    while isinstance(errors, dict | list):
        errors = next(iter(errors.values())) if isinstance(errors, dict) else errors[0]
    return str(errors)
