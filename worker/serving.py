"""Serving adapters: one base model loaded per worker process, many adapters beside it.

Playground requests and custom evaluations both ask a worker for "this base, with this adapter
(or none)". ``adapter_cache`` keeps one engine/generate.py AdapterCache per process: the base
loads once, adapters are fetched from S3 on first use and switched with peft's set_adapter.

A playground request crosses processes (jobs/playground.py is the web's half): ``serve_generation``
appends the answer's events to the request's Redis list as they are generated.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
import uuid
from pathlib import Path

from django.conf import settings

from engine import artifacts, generate
from engine.base_models import BaseModelSpec, load_base_model, training_device
from jobs import playground
from jobs.models import Adapter, BaseModel
from loft import storage
from worker.tokenizer import tokenizer_for

log = logging.getLogger(__name__)

_lock = threading.Lock()
_cache: tuple[tuple[BaseModelSpec, str], generate.AdapterCache] | None = None


def adapter_cache(base_model: BaseModel, quantization: str = "none") -> generate.AdapterCache:
    """This process's cache for ``base_model`` at one precision ("none": full precision, or
    "nf4"): an adapter is served on the base precision it was trained on. One base at one
    precision at a time: asking for another drops the first (a worker serves one base model
    at a time in practice)."""
    global _cache
    key = (base_model.spec, quantization)
    with _lock:
        if _cache is None or _cache[0] != key:
            _cache = None  # free the old base before loading the next

            def load_base():
                return load_base_model(
                    base_model.spec, settings.LOFT_HOME / "models", quantization, training_device()
                )

            _cache = (key, generate.AdapterCache(load_base, settings.LOFT_INFERENCE_ADAPTERS))
        return _cache[1]


def adapter_folder(adapter: Adapter) -> Path:
    """The adapter's PEFT folder on this worker, downloaded once and checked against its
    manifest (a folder that fails the check is fetched again)."""
    folder = settings.LOFT_HOME / "adapters" / adapter.id
    try:
        artifacts.verify(folder, adapter.manifest)
        return folder
    except (OSError, ValueError):
        pass
    partial = folder.with_name(f"{adapter.id}.partial-{uuid.uuid4().hex[:8]}")
    storage.download_folder(adapter.s3_prefix, partial)
    artifacts.verify(partial, adapter.manifest)
    if folder.exists():
        shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)
    return folder


def use(adapter: Adapter, with_adapter: bool = True):
    """``with use(adapter) as model``: the adapter's base with the adapter on, or off."""
    cache = adapter_cache(adapter.base_model, adapter.base_quantization)
    return cache.use(adapter.id if with_adapter else None, lambda: adapter_folder(adapter))


def serve_generation(request_id: str, org_id: str, adapter_id: str, request: dict) -> None:
    """Worker side: answer one playground request, pushing its events as they come, until the
    answer ends or its client stops waiting (``answer_by``, wall-clock)."""
    connection, key = playground.answer_channel(), playground.answer_key(request_id)

    def push(event: dict) -> None:
        connection.rpush(key, json.dumps(event))
        connection.expire(key, settings.LOFT_INFERENCE_TIMEOUT_SECONDS * 2)

    adapter = Adapter.objects.filter(org_id=org_id, pk=adapter_id).select_related("base_model")
    adapter = adapter.first()
    if adapter is None:
        push({"type": "error", "code": "not_found", "message": "The adapter was deleted."})
        return
    answer_by = request.get("answer_by", float("inf"))
    tokenizer = tokenizer_for(adapter.base_model)
    try:
        with use(adapter, request.get("with_adapter", True)) as model:
            result = generate.generate(
                model,
                tokenizer,
                request["messages"],
                max_new_tokens=request["max_tokens"],
                temperature=request["temperature"],
                seed=request.get("seed"),
                device=training_device(),
                context_length=adapter.base_model.context_length,
            )
            for piece in result:
                if time.time() > answer_by:  # nobody waits for the rest
                    push({"type": "error", "code": "timeout", "message": "Out of time."})
                    return
                push({"type": "delta", "text": piece})
    except generate.PromptTooLong as error:
        push({"type": "error", "code": "context_length_exceeded", "message": str(error)})
        return
    except Exception:  # noqa: BLE001 - the client must hear that it broke, whatever broke
        # The details (paths, storage addresses) are for operators; the tenant gets a sentence.
        log.exception("generation failed for adapter %s", adapter.id)
        push(
            {
                "type": "error",
                "code": "generation_failed",
                "message": "The model could not generate an answer; try again later.",
            }
        )
        raise
    push(
        {
            "type": "done",
            "finish_reason": result.finish_reason,
            "usage": {
                "prompt_tokens": result.prompt_tokens,
                "completion_tokens": result.completion_tokens,
                "total_tokens": result.prompt_tokens + result.completion_tokens,
            },
        }
    )
