"""Continual policies: an alias that trains its own next version from its traffic.

A policy says when (every N new rated or corrected completions of the alias, or every so many
seconds when there is at least one) and how (the child job's hyperparameters); each time it is
due, a ``PolicyRun`` builds a training file from the alias's traffic, trains a child of the
adapter the alias serves, and puts the child through the alias's promotion gate. What a run
does, step by step, is jobs/continual.py's; these rows are what it remembers between steps,
so that a run outlives any worker or beat process that drives it.
"""

from __future__ import annotations

from django.db import models
from django.db.models import Q
from django.utils import timezone

from loft.ids import make_id
from loft.tenancy import TenantOwnedModel


def new_policy_run_id() -> str:
    return make_id("polrun")


class ContinualPolicy(TenantOwnedModel):
    """When and how an alias trains a child of its adapter on its own traffic."""

    alias = models.OneToOneField("Alias", on_delete=models.CASCADE, related_name="policy")
    enabled = models.BooleanField(default=True)
    every_completions = models.PositiveIntegerField(
        null=True, blank=True, help_text="Train after this many new rated or corrected ones."
    )
    every_seconds = models.PositiveIntegerField(
        null=True, blank=True, help_text="Or train this long after the last run (or creation)."
    )
    hyperparameters = models.JSONField(
        default=dict, blank=True, help_text="The child job's, as a create request names them."
    )
    # Feedback given after this moment is "new": the start of the last run, or the creation.
    counting_since = models.DateTimeField()
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    def __str__(self) -> str:
        return f"policy of {self.alias_id}"

    @classmethod
    def set_for(
        cls,
        alias,
        *,
        every_completions: int | None,
        every_seconds: int | None,
        enabled: bool = True,
        hyperparameters: dict | None = None,
    ) -> ContinualPolicy:
        """The alias's policy, created or changed. A new one counts feedback from now on; a
        changed one keeps its count, and its hyperparameters unless new ones are given."""
        chosen = {
            "org_id": alias.org_id,
            "enabled": enabled,
            "every_completions": every_completions,
            "every_seconds": every_seconds,
        }
        if hyperparameters is not None:
            chosen["hyperparameters"] = hyperparameters
        policy, _ = cls.objects.update_or_create(
            alias=alias,
            defaults=chosen,
            create_defaults={**chosen, "counting_since": timezone.now()},
        )
        return policy


class PolicyRun(TenantOwnedModel):
    """One turn of a policy: traffic file → child job → promotion through the alias's gate."""

    class Status(models.TextChoices):
        TRAINING = "training"  # the traffic file is built and validated, then the child trains
        EVALUATING = "evaluating"  # the gate's evaluations of child and current adapter run
        PROMOTED = "promoted"  # the alias moved to the child
        REFUSED = "refused"  # the gate kept the alias where it was: the child is flagged
        FAILED = "failed"  # the file, the job or an evaluation failed: ``reason`` says which

    ACTIVE = (Status.TRAINING, Status.EVALUATING)

    id = models.CharField(primary_key=True, max_length=40, default=new_policy_run_id)
    # The alias's, not the policy's: a policy replaced or deleted leaves its runs' record.
    alias = models.ForeignKey("Alias", on_delete=models.CASCADE, related_name="policy_runs")
    status = models.CharField(max_length=12, choices=Status.choices, default=Status.TRAINING)
    trigger = models.CharField(max_length=200, help_text="Why it started, in a sentence.")
    parent_adapter = models.CharField(max_length=40, help_text="The adapter the child continues.")
    training_file = models.ForeignKey(
        "File", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    job = models.ForeignKey(
        "FineTuneJob", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    child_adapter = models.CharField(max_length=40, blank=True)
    move = models.ForeignKey(
        "AliasMove", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    reason = models.TextField(blank=True, help_text="Why it was refused or failed; what passed.")
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        constraints = [
            # One run per alias at a time: a second beat tick, or two beat processes, cannot
            # start another while one is on.
            models.UniqueConstraint(
                fields=["alias"],
                condition=Q(status__in=["training", "evaluating"]),
                name="one_active_policy_run_per_alias",
            )
        ]

    def __str__(self) -> str:
        return f"{self.id} ({self.status})"
