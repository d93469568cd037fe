"""The Deployments page: the organization's aliases, each with its adapter, pinned eval files
and the history of its moves with their evidence; promote and roll back by form.

The moves themselves are ``Alias.promote`` and ``Alias.roll_back`` (jobs/models/aliases.py),
the very calls the API makes; each form posts, then comes back here with a sentence.
"""

from __future__ import annotations

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.db.models import Prefetch
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_POST

from jobs.api.aliases import ONLY_OWNERS_FORCE, may_force
from jobs.models import Adapter, File, QuotaExceeded
from jobs.models.aliases import Alias, AliasError, AliasMove
from loft.tenancy import org_or_404

MOVES_SHOWN = 20


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
    for alias in aliases:
        alias.history = alias.moves.all()[:MOVES_SHOWN]
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
