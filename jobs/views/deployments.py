"""The Deployments page: the organization's aliases, each with its adapter, pinned eval files
and the history of its moves with their evidence; promote and roll back by form. And each
alias's traffic: its stored completions (``store: true``), rated and corrected by form, and its
continual policy (jobs/continual.py) with its runs.

The moves themselves are ``Alias.promote`` and ``Alias.roll_back`` (jobs/models/aliases.py),
the very calls the API makes; each form posts, then comes back here with a sentence.
"""

from __future__ import annotations

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.db.models import Prefetch
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_POST

from jobs import continual, traffic
from jobs.api.aliases import ONLY_OWNERS_FORCE, may_force
from jobs.models import Adapter, File, QuotaExceeded, StoredCompletion
from jobs.models.aliases import Alias, AliasError, AliasMove
from jobs.models.completions import CORRECTION_LENGTH
from jobs.models.policies import ContinualPolicy
from loft.tenancy import org_or_404

MOVES_SHOWN = 20
COMPLETIONS_SHOWN = 50
RUNS_SHOWN = 10


@login_required
def deployments(request):
    org = org_or_404(request)
    aliases = list(
        Alias.objects.for_org(org)
        .select_related("adapter__base_model")
        .prefetch_related(
            Prefetch("eval_files", queryset=File.objects.only("id", "filename").order_by("id")),
            Prefetch("moves", queryset=AliasMove.objects.order_by("-created_at", "-id")),
        )
        .order_by("name")
    )
    adapters = list(
        Adapter.objects.for_org(org).only("id", "name", "base_model_id").order_by("-created_at")
    )
    stored = StoredCompletion.objects.for_org(org)
    for alias in aliases:
        alias.history = alias.moves.all()[:MOVES_SHOWN]
        alias.stored = stored.filter(alias=alias.name).count()
        alias.candidates = [
            a
            for a in adapters
            if a.base_model_id == alias.adapter.base_model_id and a.id != alias.adapter_id
        ]
    return render(
        request,
        "jobs/deployments.html",
        {"aliases": aliases, "may_force": may_force(request, org)},
    )


def _alias(request, name: str) -> Alias:
    return get_object_or_404(
        Alias.objects.for_org(org_or_404(request)).select_related("adapter"), name=name
    )


@login_required
@require_POST
def deployment_promote(request, name: str):
    alias = _alias(request, name)
    candidate = Adapter.objects.for_org(alias.org_id).filter(pk=request.POST.get("adapter")).first()
    force = request.POST.get("force") == "on"
    if candidate is None:
        messages.error(request, "Choose one of your adapters to promote.")
    elif force and not may_force(request, alias.org):
        messages.error(request, ONLY_OWNERS_FORCE)
    else:
        try:
            outcome = alias.promote(
                candidate, force=force, actor=request.user.get_username(), user=request.user
            )
        except (AliasError, QuotaExceeded) as error:
            messages.error(request, str(error))
        else:
            _tell(request, alias, candidate, outcome)
    return redirect("deployments")


def _tell(request, alias: Alias, candidate: Adapter, outcome) -> None:
    if outcome.status == "evaluating":
        messages.info(
            request,
            f"Evaluating {candidate.name} against the current adapter on the pinned eval "
            f"files ({len(outcome.evaluations)} evaluation(s)); promote again when they finish.",
        )
    elif outcome.status == "promoted":
        messages.success(request, f"{alias.name} now points at {candidate.name}.")
    elif outcome.status == "forced":
        messages.warning(request, f"{alias.name} now points at {candidate.name} (forced).")
    else:
        messages.error(request, "Not promoted. " + " ".join(outcome.report["reasons"]))


@login_required
@require_POST
def deployment_rollback(request, name: str):
    alias = _alias(request, name)
    try:
        move = alias.roll_back(actor=request.user.get_username(), user=request.user)
    except AliasError as error:
        messages.error(request, str(error))
    else:
        messages.success(request, f"{alias.name} is back on {move.to_adapter}.")
    return redirect("deployments")


@login_required
def deployment_traffic(request, name: str):
    """The alias's stored completions, newest first, each with its rating and correction."""
    alias = _alias(request, name)
    stored = StoredCompletion.objects.for_org(alias.org).filter(alias=alias.name)
    completions = list(stored.order_by("-created_at", "-id")[:COMPLETIONS_SHOWN])
    for completion in completions:
        completion.question = next(
            (m["content"] for m in reversed(completion.messages) if m["role"] == "user"), ""
        )
    counts = {
        "stored": stored.count(),
        "rated_up": stored.filter(rating=1).count(),
        "rated_down": stored.filter(rating=-1).count(),
        "corrected": stored.exclude(correction="").count(),
    }
    policy = ContinualPolicy.objects.filter(alias=alias).first()
    return render(
        request,
        "jobs/deployment_traffic.html",
        {
            "alias": alias,
            "completions": completions,
            "counts": counts,
            "policy": policy,
            "new_feedback": continual.new_feedback(policy).count() if policy else 0,
            "runs": alias.policy_runs.all()[:RUNS_SHOWN],
        },
    )


@login_required
@require_POST
def deployment_policy(request, name: str):
    """The alias's continual policy set, changed or stopped by form (the API's rules)."""
    alias = _alias(request, name)
    if request.POST.get("stop"):
        ContinualPolicy.objects.filter(alias=alias).delete()
        messages.success(request, f"{alias.name} no longer trains on its traffic by itself.")
        return redirect("deployment-traffic", name=alias.name)
    try:
        every_completions = int(request.POST.get("every_completions") or 0) or None
        hours = float(request.POST.get("every_hours") or 0)
    except ValueError:
        every_completions, hours = -1, 0
    every_seconds = round(hours * 3600) or None
    if (every_completions or 0) < 0 or hours < 0 or not (every_completions or every_seconds):
        messages.error(
            request, "Say when to train: after a number of new answers, every few hours, or both."
        )
    elif every_seconds is not None and every_seconds < 60:
        messages.error(request, "Train at most once a minute.")
    else:
        ContinualPolicy.set_for(
            alias, every_completions=every_completions, every_seconds=every_seconds
        )
        messages.success(
            request,
            f"{alias.name} trains a child on its rated and corrected answers when due, and "
            "moves to it only if it passes the promotion gate.",
        )
    return redirect("deployment-traffic", name=alias.name)


@login_required
@require_POST
def deployment_feedback(request, name: str, completion_id: str):
    """A rating (the thumbs) or a correction (the edit box) of one stored completion."""
    alias = _alias(request, name)
    completion = get_object_or_404(
        StoredCompletion.objects.for_org(alias.org).filter(alias=alias.name), pk=completion_id
    )
    rating = request.POST.get("rating")
    correction = request.POST.get("correction")
    if rating not in (None, "1", "-1", "0"):
        messages.error(request, "A rating is a thumb up or down.")
    elif correction is not None and len(correction) > CORRECTION_LENGTH:
        messages.error(request, f"A correction is at most {CORRECTION_LENGTH:,} characters.")
    else:
        completion.give_feedback(
            int(rating) if rating is not None else None,
            correction.strip() if correction is not None else None,
        )
        messages.success(request, "Feedback saved.")
    return redirect("deployment-traffic", name=alias.name)


@login_required
@require_POST
def deployment_training_file(request, name: str):
    """A training file of the alias's rated-up and corrected completions (jobs/traffic.py)."""
    alias = _alias(request, name)
    try:
        file = traffic.request_training_file(alias.org, alias=alias.name)
    except traffic.TrafficError as error:
        messages.error(request, str(error))
        return redirect("deployment-traffic", name=alias.name)
    messages.success(
        request,
        "The training file is being built from the rated and corrected answers; it is checked "
        "like any upload.",
    )
    return redirect("dataset-detail", file_id=file.id)
