"""The upload-and-train wizard: 1 data → 2 model and method → 3 review and launch.

What is chosen lives in the session (``wizard``), so going back shows it again. The wizard
makes the same create request the API takes (jobs/api/fine_tuning.py: ``prepare_job``,
``dry_run``, ``submit_job``), so a job launched here and one made with the ``openai`` client
are checked, planned and queued the same way; an API error names its field (``param``), and
the page shows its sentence beside that field.
"""

from __future__ import annotations

import json

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.shortcuts import redirect, render
from django.urls import reverse

from jobs.api.fine_tuning import dry_run, prepare_job, submit_job
from jobs.api.serializers import JobCreateSerializer
from jobs.models import Adapter, BaseModel, File, FineTuneJob, Quota, trained_tokens_this_month
from jobs.preflight import AUTO_RESOLVED, LOFT_HYPERPARAMETERS, OPENAI_HYPERPARAMETERS
from loft.api.errors import LoftAPIError
from loft.tenancy import org_or_404

SESSION_KEY = "wizard"
COMMON = {
    "batch_size": "auto",
    "max_seq_length": "auto",
    "lora_dropout": 0.05,
    "warmup_ratio": 0.03,
    "packing": True,
    "quantization": "nf4",
    "max_steps": "",
}
# Each preset sets every field shown under Advanced; the person may change any of them.
PRESETS = {
    "quick": {
        "label": "Quick",
        "help": "One pass over the data with a small adapter: a first result in minutes.",
        "values": {**COMMON, "n_epochs": 1, "lora_rank": 8, "lora_alpha": 16,
                   "learning_rate_multiplier": 2.0},
    },
    "balanced": {
        "label": "Balanced",
        "help": "Epochs chosen from the data size (OpenAI's rule), a medium adapter.",
        "values": {**COMMON, "n_epochs": "auto", "lora_rank": 16, "lora_alpha": 32,
                   "learning_rate_multiplier": 1.0},
    },
    "thorough": {
        "label": "Thorough",
        "help": "More epochs, a larger adapter and a gentler learning rate; takes longest.",
        "values": {**COMMON, "n_epochs": 5, "lora_rank": 32, "lora_alpha": 64,
                   "learning_rate_multiplier": 0.5},
    },
}  # fmt: skip
FIELDS = [
    ("n_epochs", "Epochs", "Passes over the training rows, or auto."),
    ("batch_size", "Batch size", "Examples per optimizer step, or auto."),
    ("learning_rate_multiplier", "Learning rate multiplier", "× 2e-4."),
    ("lora_rank", "LoRA rank", "Size of the adapter (r)."),
    ("lora_alpha", "LoRA alpha", "Scaling of the adapter's update."),
    ("lora_dropout", "LoRA dropout", "Dropout on the adapter's input, 0 to 1."),
    ("max_seq_length", "Max sequence length", "Tokens per row, or auto."),
    ("warmup_ratio", "Warmup ratio", "Share of steps warming up, 0 to 1."),
    ("max_steps", "Max steps", "Stop after this many steps; empty for no limit."),
]
NUMBERS = {"lora_rank": int, "lora_alpha": int, "max_steps": int, "n_epochs": int,
           "batch_size": int, "max_seq_length": int, "learning_rate_multiplier": float,
           "lora_dropout": float, "warmup_ratio": float}  # fmt: skip


def _state(request) -> dict:
    return request.session.get(SESSION_KEY) or {}


def _save(request, **changes) -> dict:
    state = {**_state(request), **changes}
    request.session[SESSION_KEY] = state
    return state


def _steps(current: int) -> list[dict]:
    names = ["Data", "Model and method", "Review and launch"]
    urls = ["wizard", "wizard-model", "wizard-review"]
    return [
        {"number": i + 1, "name": name, "url": reverse(url), "current": i + 1 == current}
        for i, (name, url) in enumerate(zip(names, urls, strict=True))
    ]


# --- 1: data --------------------------------------------------------------------------------


@login_required
def data_step(request):
    org = org_or_404(request)
    files = File.objects.for_org(org).filter(purpose=File.Purpose.FINE_TUNE)
    files = files.order_by("-created_at")[:50]
    if request.GET.get("parent"):  # "Train again from this adapter"
        parent = Adapter.objects.for_org(org).filter(pk=request.GET["parent"]).first()
        _save(request, parent=parent.id if parent else None)
    state = _state(request)
    chosen_id = request.POST.get("file") or request.GET.get("file") or state.get("file")
    chosen = File.objects.for_org(org).filter(pk=chosen_id).first() if chosen_id else None
    error = None
    if request.method == "POST":
        if chosen is None:
            error = "Choose a dataset, or upload one."
        elif chosen.status != File.Status.PROCESSED:
            error = (
                f"{chosen.filename} is not ready: "
                f"{chosen.status_details or 'its rows are still being checked.'}"
            )
        else:
            _save(request, file=chosen.id)
            return redirect("wizard-model")
    return render(
        request,
        "jobs/wizard_data.html",
        {
            "steps": _steps(1),
            "files": files,
            "chosen": chosen,
            "report": chosen.report if chosen else None,
            "error": error,
            "parent": Adapter.objects.for_org(org).filter(pk=state.get("parent")).first(),
        },
    )


# --- 2: model and method --------------------------------------------------------------------


@login_required
def model_step(request):
    org = org_or_404(request)
    state = _state(request)
    if not state.get("file"):
        return redirect("wizard")
    parent = Adapter.objects.for_org(org).filter(pk=state.get("parent")).first()
    models = list(BaseModel.objects.enabled().order_by("parameters"))
    if not models:
        messages.error(request, "No base model is enabled; an operator enables them in the admin.")
        return redirect("wizard")
    preset = state.get("preset", "balanced")
    values = state.get("values") or dict(PRESETS[preset]["values"])
    chosen_model = state.get("model") or (parent.base_model.name if parent else models[0].name)
    errors: dict[str, str] = {}
    if request.method == "POST":
        chosen_model = request.POST.get("model", chosen_model)
        preset = request.POST.get("preset", preset)
        if preset not in PRESETS:
            preset = "balanced"
        if request.POST.get("action") == "apply_preset":
            values = dict(PRESETS[preset]["values"])
        else:
            values, errors = _read_values(request.POST)
            suffix = request.POST.get("suffix", "").strip()
            if not errors:
                _save(request, model=chosen_model, preset=preset, values=values, suffix=suffix)
                problem = _check(org, _state(request))
                if problem is None:
                    return redirect("wizard-review")
                errors[problem[0]] = problem[1]
        _save(request, model=chosen_model, preset=preset, values=values)
    return render(
        request,
        "jobs/wizard_model.html",
        {
            "steps": _steps(2),
            "models": models,
            "chosen_model": chosen_model,
            "parent": parent,
            "presets": PRESETS,
            "presets_json": json.dumps({k: p["values"] for k, p in PRESETS.items()}),
            "preset": preset,
            "fields": [
                (name, label, help_text, values.get(name, ""), errors.get(name))
                for name, label, help_text in FIELDS
            ],
            "values": values,
            "errors": errors,
            "suffix": _state(request).get("suffix", ""),
        },
    )


def _read_values(post) -> tuple[dict, dict]:
    """The Advanced fields as the API takes them: numbers, "auto", or nothing."""
    values, errors = {}, {}
    for name, label, _ in FIELDS:
        raw = post.get(name, "").strip()
        if raw == "" and name == "max_steps":
            values[name] = ""
        elif raw.lower() == "auto" and name in AUTO_RESOLVED:
            values[name] = "auto"
        else:
            try:
                values[name] = NUMBERS[name](raw)
            except ValueError:
                allowed = " or auto" if name in AUTO_RESOLVED else ""
                errors[name] = f"{label} must be a number{allowed}."
    values["packing"] = post.get("packing") == "on"
    values["quantization"] = "nf4" if post.get("quantization", "nf4") == "nf4" else "none"
    return values, errors


def _request_body(state: dict) -> dict:
    """The create request the wizard's choices make, as the API would receive it."""
    hyperparameters = {
        k: v
        for k, v in (state.get("values") or {}).items()
        if v != "" and k in (*OPENAI_HYPERPARAMETERS, *LOFT_HYPERPARAMETERS)
    }
    if state.get("parent"):
        hyperparameters["parent_adapter"] = state["parent"]
    return {
        "model": state.get("model", ""),
        "training_file": state.get("file", ""),
        "hyperparameters": hyperparameters,
        "suffix": state.get("suffix", ""),
    }


def _prepare(org, state: dict):
    body = JobCreateSerializer(data=_request_body(state))
    if not body.is_valid():
        field, messages = next(iter(body.errors.items()))
        raise LoftAPIError(str(messages[0]), param=field)
    values = body.validated_data
    return prepare_job(org, values), values


def _check(org, state: dict) -> tuple[str, str] | None:
    """The field an API error points at and its sentence, or None when the request is good."""
    try:
        dry_run(_prepare(org, state)[0])
    except LoftAPIError as error:
        return _field_of(error), str(error.detail)
    return None


def _field_of(error: LoftAPIError) -> str:
    """The wizard field an API error belongs to: its ``param``, or the hyperparameter its
    sentence names first."""
    message = str(error.detail)
    if error.param in ("hyperparameters", "hyperparameters.parent_adapter", None):
        named = [(message.find(name), name) for name, _, _ in FIELDS if name in message]
        if named:
            return min(named)[1]
        return "form"
    return {"model": "model", "suffix": "suffix", "training_file": "form"}.get(error.param, "form")


# --- 3: review and launch -------------------------------------------------------------------


@login_required
def review_step(request):
    org = org_or_404(request)
    state = _state(request)
    if not state.get("file") or not state.get("values"):
        return redirect("wizard-model" if state.get("file") else "wizard")
    error, plan, prepared = None, None, None
    try:
        prepared, values = _prepare(org, state)
        plan = dry_run(prepared)
    except LoftAPIError as problem:
        error = str(problem.detail)
    if request.method == "POST" and prepared is not None and error is None:
        try:
            job = submit_job(org, prepared, values)
        except LoftAPIError as problem:
            error = str(problem.detail)
        else:
            request.session.pop(SESSION_KEY, None)
            return redirect("job-detail", job_id=job.id)
    limits = Quota.for_org(org).limits()
    active = FineTuneJob.objects.filter(org=org, status__in=FineTuneJob.ACTIVE)
    return render(
        request,
        "jobs/wizard_review.html",
        {
            "steps": _steps(3),
            "state": state,
            "file": File.objects.for_org(org).filter(pk=state["file"]).first(),
            "preset": PRESETS.get(state.get("preset"), {}).get("label", "Custom"),
            "plan": plan,
            "error": error,
            "quota": {
                "limit": limits["monthly_trained_tokens"],
                "used": trained_tokens_this_month(org, active),
            },
        },
    )
