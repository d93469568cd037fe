"""The tokenizers a worker trains, evaluates and serves with: transformers' tokenizer of a base
model, loaded once per process. (The web counts tokens with engine/chat_tokenizer.py, which
gives the same ids without torch.)"""

from __future__ import annotations

import functools

from django.conf import settings

from engine.base_models import BaseModelSpec, load_tokenizer
from jobs.models import BaseModel


@functools.lru_cache(maxsize=4)
def _tokenizer(spec: BaseModelSpec):
    return load_tokenizer(spec, settings.LOFT_HOME / "models")


def tokenizer_for(model: BaseModel):
    return _tokenizer(model.spec)
