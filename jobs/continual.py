"""Continual training at work: the life of a policy run, from traffic to a promoted (or refused)
child adapter. Beat calls ``advance_all`` every minute (worker/tasks.py
``advance_continual_policies``); everything a run needs to go on is in its row
(jobs/models/policies.py), so a beat or worker process killed at any point loses nothing: the
next tick takes up where the last one stopped, and the child job resumes from its checkpoints
like any job.

A run, step by step:

1. **due** — the policy's alias has ``every_completions`` new rated-up or corrected stored
   completions since the last run, or ``every_seconds`` have passed and there is at least one;
2. **start** (one transaction: all of it or nothing) — a training file is requested from the
   alias's traffic (jobs/traffic.py: rated up and corrected, prompts its adapters learned left
   out) and a child job of the adapter the alias serves is submitted on it; the job waits for
   the file's validation, then trains with replay of its ancestors' rows (worker/training.py);
3. **training → evaluating** — when the job succeeds, the child is put through the alias's
   promotion gate (``Alias.promote``: every pinned eval file, the new task's and the earlier
   ones', and the forgetting probes); its evaluations are queued;
4. **promoted / refused** — a later tick finds them finished: the alias moves to the child, or
   stays, the child flagged with the gate's reasons (``reason`` here, and the refused move on
   the alias). Both send the alias's webhook event. A failed file, job or evaluation ends the
   run as ``failed``, with the reason.

One run per alias at a time (a partial unique index, and row locks taken with skip_locked),
so two beat processes, or a slow tick overlapping the next, cannot start two.
"""

from __future__ import annotations

import logging
from datetime import datetime

from django.db import transaction
from django.utils import timezone

from engine.hyperparameters import ConfigError
from jobs import preflight, traffic
from jobs.models import Adapter, FineTuneJob, QuotaExceeded, StoredCompletion
from jobs.models.aliases import AliasError
from jobs.models.policies import ContinualPolicy, PolicyRun

log = logging.getLogger(__name__)
Status = PolicyRun.Status


def actor(alias_name: str) -> str:
    """Who moves the alias, as its moves record it."""
    return f"continual policy of {alias_name}"


def advance_all(now: datetime | None = None) -> dict:
    """Move every running run on as far as it can go now, and start the runs that are due.
    Returns how many runs started and how many are running."""
    now = now or timezone.now()
    running = PolicyRun.objects.filter(status__in=PolicyRun.ACTIVE)
    for run_id in running.values_list("id", flat=True):  # first: a run that ends frees its alias
        advance(run_id)
    started = 0
    for policy_id in ContinualPolicy.objects.filter(enabled=True).values_list("id", flat=True):
        started += start_if_due(policy_id, now) is not None
    return {"started": started, "running": running.count()}


def new_feedback(policy: ContinualPolicy):
    """The alias's stored completions rated up or corrected since the policy last counted."""
    return StoredCompletion.objects.for_org(policy.org_id).filter(
        traffic.learnable(),
        alias=policy.alias.name,
        feedback_at__gt=policy.counting_since,
    )


def due(policy: ContinualPolicy, now: datetime) -> str | None:
    """Why the policy should start a run now, in a sentence; None when it should not."""
    new = new_feedback(policy).count()
    if policy.every_completions and new >= policy.every_completions:
        return (
            f"{new} new rated or corrected completions (the policy trains every "
            f"{policy.every_completions})."
        )
    waited = (now - policy.counting_since).total_seconds()
    if policy.every_seconds and new and waited >= policy.every_seconds:
        return (
            f"{waited / 3600:.1f} h since the last run (the policy trains every "
            f"{policy.every_seconds / 3600:.1f} h), {new} new rated or corrected completions."
        )
    return None


def start_if_due(policy_id: int, now: datetime) -> PolicyRun | None:
    """The run the policy starts now, if it is due and has none running; None otherwise. A run
    that cannot start (no new rows, a quota) is recorded as failed, with the reason, and the
    policy counts anew from now: it does not try again every minute."""
    with transaction.atomic():
        policy = (
            ContinualPolicy.objects.select_for_update(skip_locked=True, of=("self",))
            .select_related("alias__adapter__base_model", "org")
            .filter(pk=policy_id, enabled=True)
            .first()
        )
        if policy is None or policy.alias.policy_runs.filter(status__in=PolicyRun.ACTIVE).exists():
            return None
        trigger = due(policy, now)
        if trigger is None:
            return None
        parent = policy.alias.adapter
        run = PolicyRun(org_id=policy.org_id, alias=policy.alias, trigger=trigger)
        run.parent_adapter = parent.id
        policy.counting_since = now
        policy.save(update_fields=["counting_since", "updated_at"])
        try:
            with transaction.atomic():  # the file and the job, or neither
                file = traffic.request_training_file(policy.org, alias=policy.alias.name)
                run.job = submit_child(policy, parent, run, file)
                run.training_file = file
        except (traffic.TrafficError, ConfigError, QuotaExceeded) as error:
            finish(run, Status.FAILED, f"The run could not start: {error}")
        except preflight.JobTooLarge as error:
            finish(run, Status.FAILED, preflight.too_large_message(error.plan))
        # The policy's row lock keeps a second process out; the unique index on active runs
        # would refuse its run anyway, and roll its file and job back with it.
        run.save()
    log.info("policy run %s started for alias %s: %s", run.id, policy.alias.name, trigger)
    return run


def submit_child(policy: ContinualPolicy, parent: Adapter, run: PolicyRun, file) -> FineTuneJob:
    """The child job: the alias's adapter continued on the traffic file, with the policy's
    hyperparameters ("auto" resolved once the file is measured, as for any job)."""
    requested = dict(policy.hyperparameters)
    resolved = preflight.resolve_hyperparameters(requested, file, None, parent.base_model, parent)
    return FineTuneJob.submit(
        org=policy.org,
        training_file=file,
        base_model=parent.base_model,
        hyperparameters=resolved,
        requested_hyperparameters=requested,
        suffix=policy.alias.name[:40],
        parent_adapter=parent,
        metadata={"alias": policy.alias.name, "policy_run": run.id},
        idempotency_key=f"policy-run:{run.id}",
    )


def advance(run_id: str) -> None:
    """Move one run on as far as it can go now; a run another process holds is left to it."""
    with transaction.atomic():
        run = (
            PolicyRun.objects.select_for_update(skip_locked=True, of=("self",))
            .select_related("alias", "job")
            .filter(pk=run_id, status__in=PolicyRun.ACTIVE)
            .first()
        )
        if run is None:
            return
        if run.status == Status.TRAINING:
            after_training(run)
        if run.status == Status.EVALUATING:
            through_the_gate(run)


def after_training(run: PolicyRun) -> None:
    job = run.job
    if job is None:
        finish(run, Status.FAILED, "The child job was deleted before it finished.")
    elif job.status == FineTuneJob.Status.SUCCEEDED:
        run.child_adapter = job.adapter.id
        run.status = Status.EVALUATING
        run.save(update_fields=["child_adapter", "status"])
    elif job.status in (FineTuneJob.Status.FAILED, FineTuneJob.Status.CANCELLED):
        why = (job.error or {}).get("message") or "no reason given"
        finish(run, Status.FAILED, f"The child job {job.id} {job.status}: {why}")


def through_the_gate(run: PolicyRun) -> None:
    """Ask the alias to promote the child: its evaluations are queued the first time, and a
    later tick finds the verdict."""
    alias = run.alias
    child = Adapter.objects.for_org(run.org_id).filter(pk=run.child_adapter).first()
    if child is None:
        finish(run, Status.FAILED, f"The child adapter {run.child_adapter} was deleted.")
        return
    try:
        outcome = alias.promote(child, actor=actor(alias.name))
    except AliasError as error:
        finish(run, Status.FAILED, str(error))
        return
    except QuotaExceeded as error:
        finish(run, Status.FAILED, f"The gate's evaluations do not fit the quota: {error}")
        return
    if outcome.status == "evaluating":
        return
    reasons = " ".join((outcome.report or {}).get("reasons", []))
    run.move = outcome.move
    if outcome.status == "promoted":
        finish(run, Status.PROMOTED, reasons)
    elif outcome.status == "refused":
        finish(run, Status.REFUSED, f"The gate kept {alias.name} where it was. {reasons}")
    else:
        finish(run, Status.FAILED, f"The gate could not decide: {reasons}")


def finish(run: PolicyRun, status: str, reason: str) -> None:
    """End the run (saved if it is in the database already; a run refused at its start is
    saved by its caller)."""
    run.status, run.reason, run.finished_at = status, reason, timezone.now()
    if not run._state.adding:
        run.save(update_fields=["status", "reason", "finished_at", "move"])
