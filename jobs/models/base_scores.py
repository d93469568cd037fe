"""A base model's results, kept: the part of an evaluation that does not change between jobs.

Every job's evaluation scores the base (its adapter switched off) and the adapter on the same
rows: the held-out rows and Loft's forgetting probes. The base half is the same for every job on
the same base and the same rows, so it is computed once and kept here
(worker/base_scores.py reads and writes it; engine/evaluate.py says what a result depends on).

``key`` is the sha256 of everything the result depends on: the base model, its revision and
precision, the device, the library versions, the scoring code, the settings and the rows
themselves. Anything that changes gives another key, so a stale row is never read; it is simply
never used again. Rows computed from a tenant's file carry its organization, whose id is part
of their key: another tenant with the same file computes its own, and cannot learn that anyone
holds that file. The probes are Loft's own, shared by every tenant (``org`` is empty).
"""

from __future__ import annotations

from django.db import models
from django.db.models import F
from django.utils import timezone

from jobs.models.catalogue import BaseModel
from loft.tenancy import TenantOwnedModel


class BaseScores(TenantOwnedModel):
    """Never shown to a tenant; scoped all the same (``for_org``), its org left empty for
    Loft's own probes."""

    class Kind(models.TextChoices):
        HELD_OUT = "held_out"  # a job's held-out rows, or a custom evaluation's eval file
        PROBES = "probes"  # Loft's forgetting probes

    key = models.CharField(max_length=64, unique=True)
    kind = models.CharField(max_length=10, choices=Kind.choices)
    org = models.ForeignKey(
        "loft.Organization",
        null=True,
        blank=True,
        on_delete=models.CASCADE,
        related_name="+",
        help_text="Whose file the rows come from; empty for Loft's own probes.",
    )
    base_model = models.ForeignKey(BaseModel, on_delete=models.CASCADE, related_name="+")
    file_sha256 = models.CharField(
        max_length=64, blank=True, help_text="The file the rows come from (deleted with it)."
    )
    inputs = models.JSONField(help_text="What the key was made of, for operators to read.")
    result = models.JSONField()
    uses = models.PositiveIntegerField(default=0, help_text="Times read instead of computed.")
    created_at = models.DateTimeField(auto_now_add=True)
    last_used_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        verbose_name_plural = "base scores"
        indexes = [models.Index(fields=["org", "file_sha256"])]

    def __str__(self) -> str:
        return f"{self.kind} on {self.base_model_id} ({self.key[:12]})"

    @classmethod
    def read(cls, key: str) -> dict | None:
        """The kept result for ``key``, counted as a use; None when there is none."""
        found = cls.objects.filter(key=key).values_list("result", flat=True).first()
        if found is not None:
            cls.objects.filter(key=key).update(uses=F("uses") + 1, last_used_at=timezone.now())
        return found

    @classmethod
    def keep(cls, key: str, **fields) -> None:
        """Keep a result; a second worker that computed the same one meanwhile changes nothing."""
        cls.objects.get_or_create(key=key, defaults=fields)

    @classmethod
    def forget_file(cls, org_id: str, sha256: str) -> None:
        """Drop what was computed from a tenant's file once no file of theirs has its bytes."""
        from jobs.models.files import File  # that module imports this one

        if not File.objects.filter(org_id=org_id, sha256=sha256).exists():
            cls.objects.filter(org_id=org_id, file_sha256=sha256).delete()
