"""Stored completions: chat completions kept at their request's asking (``store: true``), with
the feedback the organization's users give on them — the traffic continual fine-tuning learns
from (jobs/traffic.py builds training files out of them).

A stored completion is the tenant's users' data: it is kept for the organization's retention
(``Quota.stored_completion_days``, by default ``LOFT_STORED_COMPLETION_DAYS``; 0 keeps none),
then deleted by beat (worker/tasks.py ``expire_stored_completions``); its bytes count in the
organization's storage. Its shape in the API is OpenAI's (``as_chat_completion``).
"""

from __future__ import annotations

import json
from datetime import timedelta

from django.db import models
from django.utils import timezone

from loft.tenancy import TenantOwnedModel

# OpenAI's limits on metadata: 16 pairs, keys of 64 characters, values of 512.
METADATA_PAIRS = 16
METADATA_KEY_LENGTH = 64
METADATA_VALUE_LENGTH = 512
CORRECTION_LENGTH = 32_000


class StoredCompletion(TenantOwnedModel):
    """One answered chat completion request, as asked and as answered, and its feedback."""

    id = models.CharField(primary_key=True, max_length=40, help_text="The answer's chatcmpl- id.")
    model = models.CharField(max_length=300, help_text="The model the request named.")
    alias = models.CharField(max_length=64, blank=True, help_text="The alias it named, if any.")
    adapter_id = models.CharField(
        max_length=40, blank=True, help_text="The adapter that answered; empty: the base alone."
    )
    base_model = models.CharField(max_length=200)
    messages = models.JSONField(help_text="The request's messages: role and content.")
    sampling = models.JSONField(default=dict, help_text="temperature, top_p, max_tokens, ...")
    content = models.TextField(help_text="The answer.")
    finish_reason = models.CharField(max_length=20)
    prompt_tokens = models.PositiveIntegerField(default=0)
    completion_tokens = models.PositiveIntegerField(default=0)
    metadata = models.JSONField(default=dict)
    rating = models.SmallIntegerField(
        null=True, blank=True, help_text="+1: a good answer, -1: a bad one; empty: not rated."
    )
    correction = models.TextField(blank=True, help_text="The answer it should have given.")
    feedback_at = models.DateTimeField(null=True, blank=True)
    size_bytes = models.PositiveIntegerField(default=0)
    created_at = models.DateTimeField(default=timezone.now, db_index=True)
    expires_at = models.DateTimeField(db_index=True)

    class Meta:
        ordering = ["created_at", "id"]
        indexes = [models.Index(fields=["org", "alias", "created_at"])]

    def __str__(self) -> str:
        return self.id

    # --- keeping ------------------------------------------------------------------------------

    @classmethod
    def keep(
        cls,
        org,
        answer: dict,
        *,
        messages: list[dict],
        sampling: dict,
        alias: str,
        adapter_id: str,
        base_model: str,
        metadata: dict,
    ) -> StoredCompletion | None:
        """Store ``answer`` (a ``chat.completion`` object) with the request it answers; None
        when the organization keeps no completions (a retention of 0 days)."""
        from jobs.models.usage import Quota  # that module counts these rows' bytes

        days = Quota.for_org(org).completion_retention_days()
        if days == 0:
            return None
        now = timezone.now()
        stored = cls(
            org=org,
            id=answer["id"],
            model=answer["model"],
            alias=alias,
            adapter_id=adapter_id,
            base_model=base_model,
            messages=messages,
            sampling=sampling,
            content=answer["choices"][0]["message"]["content"],
            finish_reason=answer["choices"][0]["finish_reason"],
            prompt_tokens=answer["usage"]["prompt_tokens"],
            completion_tokens=answer["usage"]["completion_tokens"],
            metadata=metadata,
            created_at=now,
            expires_at=now + timedelta(days=days),
        )
        stored.size_bytes = stored.measure()
        stored.save(force_insert=True)
        return stored

    def measure(self) -> int:
        """The bytes this completion keeps: its texts and metadata, as JSON."""
        kept = [self.messages, self.content, self.correction, self.metadata, self.sampling]
        return len(json.dumps(kept, ensure_ascii=False).encode())

    @classmethod
    def expire(cls, now=None) -> int:
        """Delete every organization's completions past their retention; how many."""
        deleted, _ = cls.objects.filter(expires_at__lte=now or timezone.now()).delete()
        return deleted

    # --- feedback -----------------------------------------------------------------------------

    def give_feedback(self, rating: int | None, correction: str | None) -> None:
        """Record a rating (+1, -1; 0 clears it) and/or a corrected answer ("" clears it); what
        is not given stays as it was."""
        if rating is not None:
            self.rating = rating or None
        if correction is not None:
            self.correction = correction
        self.feedback_at = timezone.now()
        self.size_bytes = self.measure()
        self.save(update_fields=["rating", "correction", "feedback_at", "size_bytes"])

    @property
    def training_answer(self) -> str:
        """The answer a model should learn: the correction when there is one."""
        return self.correction or self.content

    # --- OpenAI's shapes ----------------------------------------------------------------------

    def as_chat_completion(self) -> dict:
        """OpenAI's ``chat.completion`` with its ``metadata``, and Loft's own members: the
        alias and adapter that answered, and the feedback."""
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": int(self.created_at.timestamp()),
            "model": self.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": self.content, "refusal": None},
                    "logprobs": None,
                    "finish_reason": self.finish_reason,
                }
            ],
            "usage": {
                "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens,
            },
            "metadata": self.metadata,
            **self.sampling,  # temperature, top_p, seed, max_tokens, stop: as asked
            "alias": self.alias or None,
            "adapter": self.adapter_id or None,
            "feedback": {
                "rating": self.rating,
                "correction": self.correction or None,
                "given_at": int(self.feedback_at.timestamp()) if self.feedback_at else None,
            },
            "expires_at": int(self.expires_at.timestamp()),
        }

    def message_objects(self) -> list[dict]:
        """The request's messages as OpenAI lists them (``GET .../messages``), each with an id."""
        return [
            {
                "id": f"{self.id}-{index}",
                "role": message["role"],
                "content": message["content"],
                "content_parts": None,
                "name": message.get("name"),
            }
            for index, message in enumerate(self.messages)
        ]
