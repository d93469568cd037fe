"""Aliases: a tenant's named deployments, each pointing at one adapter, and the record of every
move (jobs/promotion.py decides whether a move is allowed; jobs/api/aliases.py serves them).

A request for ``model="<alias name>"`` is answered by the adapter the alias points at when the
request arrives, so a promotion takes effect on the very next request, with no restart.
"""

from __future__ import annotations

from django.conf import settings
from django.db import models

from loft.ids import make_id
from loft.tenancy import TenantOwnedModel


def new_alias_id() -> str:
    return make_id("alias")


class Alias(TenantOwnedModel):
    """A named pointer to one of the organization's adapters, with the eval files (one per task
    the alias serves) on which every candidate is measured against the current adapter."""

    id = models.CharField(primary_key=True, max_length=40, default=new_alias_id, editable=False)
    name = models.CharField(max_length=64, help_text="The name requests use as their model.")
    adapter = models.ForeignKey("Adapter", on_delete=models.PROTECT, related_name="aliases")
    eval_files = models.ManyToManyField("File", related_name="pinned_by_aliases", blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]
        constraints = [
            models.UniqueConstraint(fields=["org", "name"], name="one_alias_name_per_org")
        ]

    def __str__(self) -> str:
        return self.name


class AliasMove(TenantOwnedModel):
    """One move of an alias: who, when, from which adapter to which, and the evidence. Adapter
    ids are kept as text, so the history outlives an adapter deleted after it left the alias."""

    class Kind(models.TextChoices):
        CREATED = "created"
        PROMOTED = "promoted"
        FORCED = "forced"  # promoted by an owner over the gate's refusal
        REFUSED = "refused"  # a promotion the gate refused: the alias did not move
        ROLLED_BACK = "rolled_back"

    alias = models.ForeignKey(Alias, on_delete=models.CASCADE, related_name="moves")
    kind = models.CharField(max_length=12, choices=Kind.choices)
    from_adapter = models.CharField(max_length=40, blank=True)
    to_adapter = models.CharField(max_length=40, blank=True)
    actor = models.CharField(max_length=200, help_text="Who moved it: a person, a key, a policy.")
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    evidence = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return f"{self.alias_id} {self.kind} {self.from_adapter} → {self.to_adapter}"
