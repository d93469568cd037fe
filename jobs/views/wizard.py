"""The upload-and-train wizard: 1 data → 2 model and method → 3 review and launch.

What is chosen lives in the session (``wizard``), so going back shows it again. The wizard
makes the same create request the API takes (jobs/api/fine_tuning.py: ``prepare_job``,
``dry_run``, ``submit_job``), so a job launched here and one made with the ``openai`` client
are checked, planned and queued the same way; an API error names its field (``param``), and
the page shows its sentence beside that field.

A preference file (pairs of a preferred and a non-preferred answer) can train two ways, and step
2 asks which: DPO, the default, or supervised on the preferred answers. Every other file trains
supervised, and no choice is shown. Settings of the other method (their ``only_for``) are neither
shown nor sent.
"""

from __future__ import annotations

import json

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.shortcuts import redirect, render
from django.urls import reverse

from engine.hyperparameters import (
    API_FIELDS,
    AUTO,
    DPO,
    PREFERENCE_FORMAT,
    SUPERVISED,
    ApiField,
)
from engine.hyperparameters import PRESETS as SCHEMA_PRESETS
from jobs.api.fine_tuning import dry_run, prepare_job, submit_job
from jobs.api.serializers import JobCreateSerializer
from jobs.models import Adapter, BaseModel, File, FineTuneJob, Quota, trained_tokens_this_month
from loft.api.errors import LoftAPIError
from loft.tenancy import org_or_404


def _shown(values: dict) -> dict:
    """Values as the form shows them: no limit (null) is an empty field."""
    return {name: "" if value is None else value for name, value in values.items()}


SESSION_KEY = "wizard"
# The Advanced fields, each preset's values and how a typed value is read: all from the schema.
FIELDS = [h for h in API_FIELDS if h.form == "number"]
CHOICE_FIELDS = [h for h in API_FIELDS if h.form == "choice"]
PRESETS = {
    key: {"label": p.label, "help": p.help, "values": _shown(p.values)}
    for key, p in SCHEMA_PRESETS.items()
}
# The methods a preference file offers, the default first: (label, what the adapter learns).
METHOD_CHOICES = {
    DPO: ("DPO", "learn to prefer the preferred answer over the other"),
    SUPERVISED: ("Supervised", "learn the preferred answers"),
}


def _methods_for(file: File | None) -> tuple[str, ...]:
    """The methods a training file can train, the default first."""
    if file is not None and file.format == PREFERENCE_FORMAT:
        return tuple(METHOD_CHOICES)
    return (SUPERVISED,)


def _applies(field: ApiField, method_type: str) -> bool:
    return field.only_for in (None, method_type)


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
    files = files.order_by("-created_at").defer("report")[:50]  # only the chosen one's is shown
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
            if chosen.id != state.get("file"):  # another file: its own default method
                _save(request, method_type=_methods_for(chosen)[0])
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
    methods = _methods_for(File.objects.for_org(org).filter(pk=state["file"]).first())
    method_type = state.get("method_type")
    if method_type not in methods:
        method_type = methods[0]
    preset = state.get("preset", "balanced")
    values = state.get("values") or dict(PRESETS[preset]["values"])
    chosen_model = state.get("model") or (parent.base_model.name if parent else models[0].name)
    errors: dict[str, str] = {}
    if request.method == "POST":
        chosen_model = request.POST.get("model", chosen_model)
        preset = request.POST.get("preset", preset)
        if preset not in PRESETS:
            preset = "balanced"
        if request.POST.get("method_type") in methods:
            method_type = request.POST["method_type"]
        if request.POST.get("action") == "apply_preset":
            values = dict(PRESETS[preset]["values"])
        else:
            values, errors = _read_values(request.POST, method_type, values)
            suffix = request.POST.get("suffix", "").strip()
            if not errors:
                _save(
                    request,
                    model=chosen_model,
                    preset=preset,
                    values=values,
                    suffix=suffix,
                    method_type=method_type,
                )
                problem = _check(org, _state(request))
                if problem is None:
                    return redirect("wizard-review")
                errors[problem[0]] = problem[1]
        _save(request, model=chosen_model, preset=preset, values=values, method_type=method_type)
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
            "methods": [(key, *METHOD_CHOICES[key]) for key in methods] if len(methods) > 1 else [],
            "method_type": method_type,
            # A field of one method only is on the page when the file offers that method, and
            # hidden while another is chosen (the page's script shows it when it is chosen).
            "fields": [
                (
                    h.name,
                    h.label,
                    h.help,
                    values.get(h.name, ""),
                    errors.get(h.name),
                    h.only_for,
                    not _applies(h, method_type),
                )
                for h in FIELDS
                if h.only_for is None or h.only_for in methods
            ],
            "choice_fields": [
                (
                    h.name,
                    h.label,
                    h.help,
                    h.choices,
                    values.get(h.name, h.default),
                    h.only_for,
                    not _applies(h, method_type),
                )
                for h in CHOICE_FIELDS
                if h.only_for is None or h.only_for in methods
            ],
            "values": values,
            "errors": errors,
            "suffix": _state(request).get("suffix", ""),
        },
    )


def _read_values(post, method_type: str, previous: dict) -> tuple[dict, dict]:
    """The Advanced fields as the API takes them: numbers, "auto", or nothing. A field of
    another method than ``method_type`` is not read: it keeps its previous value, unsent."""
    values, errors = {}, {}
    for field in FIELDS:
        if not _applies(field, method_type):
            values[field.name] = previous.get(field.name, AUTO if field.auto else field.default)
            continue
        raw = post.get(field.name, "").strip()
        if raw == "" and field.nullable:
            values[field.name] = ""
        elif raw.lower() == AUTO and field.auto:
            values[field.name] = AUTO
        else:
            try:
                values[field.name] = field.kind(raw)
            except ValueError:
                allowed = " or auto" if field.auto else ""
                errors[field.name] = f"{field.label} must be a number{allowed}."
    for field in CHOICE_FIELDS:
        if not _applies(field, method_type):
            values[field.name] = previous.get(field.name, field.default)
            continue
        raw = post.get(field.name, "")
        values[field.name] = raw if raw in field.choices else field.default
    values["packing"] = post.get("packing") == "on"
    quantization = post.get("quantization", AUTO)
    values["quantization"] = quantization if quantization in ("nf4", "none") else AUTO
    return values, errors


def _request_body(state: dict) -> dict:
    """The create request the wizard's choices make, as the API would receive it: OpenAI's
    method object, with the hyperparameters that apply to its type."""
    method_type = state.get("method_type") or SUPERVISED
    sent = {h.name for h in API_FIELDS if _applies(h, method_type)}
    hyperparameters = {
        k: v for k, v in (state.get("values") or {}).items() if v != "" and k in sent
    }
    if state.get("parent"):
        hyperparameters["parent_adapter"] = state["parent"]
    return {
        "model": state.get("model", ""),
        "training_file": state.get("file", ""),
        "method": {"type": method_type, method_type: {"hyperparameters": hyperparameters}},
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
        return _field_of(error, state.get("method_type") or SUPERVISED), str(error.detail)
    return None


def _field_of(error: LoftAPIError, method_type: str) -> str:
    """The wizard field an API error belongs to: its ``param``, or the hyperparameter (of the
    chosen method, so one the page shows) its sentence names first."""
    message = str(error.detail)
    if error.param in ("hyperparameters", "hyperparameters.parent_adapter", None):
        shown = [h for h in FIELDS if _applies(h, method_type)]
        named = [(message.find(h.name), h.name) for h in shown if h.name in message]
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
    file = File.objects.for_org(org).filter(pk=state["file"]).first()
    method_type = state.get("method_type") or SUPERVISED
    return render(
        request,
        "jobs/wizard_review.html",
        {
            "steps": _steps(3),
            "state": state,
            "file": file,
            # What it learns: the method's label and sentence where the file offered a choice.
            "method": METHOD_CHOICES[method_type] if len(_methods_for(file)) > 1 else None,
            "dpo": method_type == DPO,
            "parent": prepared.parent if prepared else None,
            "preset": PRESETS.get(state.get("preset"), {}).get("label", "Custom"),
            "plan": plan,
            "error": error,
            "quota": {
                "limit": limits["monthly_trained_tokens"],
                "used": trained_tokens_this_month(org, active),
            },
        },
    )
