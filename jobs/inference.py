"""Serving adapters: one base model loaded per worker process, many adapters beside it.

Playground requests and custom evaluations both ask a worker for "this base, with this adapter
(or none)". ``adapter_cache`` keeps one worker/generate.py AdapterCache per process: the base
loads once, adapters are fetched from S3 on first use and switched with peft's set_adapter.

A playground request crosses processes like everything else in Loft: the web process queues a
``generate`` task on the inference queue and reads the answer back from a Redis list that the
worker appends to as it generates (one list per request, expiring by itself), so the web never
loads a model and a streamed answer reaches the browser token by token.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import redis
from django.conf import settings

from jobs.datasets import spec_of, tokenizer_for
from jobs.models import Adapter, BaseModel
from loft import storage
from worker import artifacts, generate
from worker.base_models import BaseModelSpec, load_base_model, training_device

_lock = threading.Lock()
_cache: tuple[BaseModelSpec, generate.AdapterCache] | None = None


def adapter_cache(base_model: BaseModel) -> generate.AdapterCache:
    """This process's cache for ``base_model``. One base at a time: asking for another drops
    the first (a worker class serves one base model at a time in practice)."""
    global _cache
    spec = spec_of(base_model)
    with _lock:
        if _cache is None or _cache[0] != spec:
            _cache = None  # free the old base before loading the next

            def load_base():
                return load_base_model(
                    spec,
                    settings.LOFT_HOME / "models",
                    settings.LOFT_INFERENCE_QUANTIZATION,
                    training_device(),
                )

            _cache = (spec, generate.AdapterCache(load_base, settings.LOFT_INFERENCE_ADAPTERS))
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
        import shutil

        shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)
    return folder


def use(adapter: Adapter, with_adapter: bool = True):
    """``with use(adapter) as model``: the adapter's base with the adapter on, or off."""
    cache = adapter_cache(adapter.base_model)
    return cache.use(adapter.id if with_adapter else None, lambda: adapter_folder(adapter))


# --- playground requests across processes -------------------------------------------------


def _redis() -> redis.Redis:
    # redis-py 8 reads a socket for 5 s by default; a BLPOP waits up to the whole request's
    # timeout (a first request loads the model), so the socket must wait longer than that.
    return redis.Redis.from_url(
        settings.REDIS_URL,
        socket_timeout=settings.LOFT_INFERENCE_TIMEOUT_SECONDS + 10,
        socket_connect_timeout=5,
    )


def _key(request_id: str) -> str:
    return f"loft:generate:{request_id}"


def start_generation(adapter: Adapter, request: dict) -> str:
    """Queue a playground request; returns the id its answer is read back with."""
    from worker.tasks import generate as generate_task

    request_id = uuid.uuid4().hex
    generate_task.apply_async(
        (request_id, adapter.org_id, adapter.id, request),
        queue=settings.LOFT_INFERENCE_QUEUE,
        # A request nobody took in time is dropped: its client has given up by then.
        expires=settings.LOFT_INFERENCE_TIMEOUT_SECONDS,
    )
    return request_id


def read_events(request_id: str) -> Iterator[dict]:
    """The worker's events for a request as they arrive: ``delta`` (text), then ``done`` (with
    usage and finish_reason) or ``error``. A worker that does not answer in time ends it with
    an ``error`` event."""
    connection, key = _redis(), _key(request_id)
    deadline = time.monotonic() + settings.LOFT_INFERENCE_TIMEOUT_SECONDS
    while True:
        remaining = deadline - time.monotonic()
        try:
            item = (
                connection.blpop([key], timeout=max(1, int(remaining))) if remaining > 0 else None
            )
        except redis.RedisError as error:
            yield {
                "type": "error",
                "code": "inference_unavailable",
                "message": f"The answer could not be read from the broker ({error}); "
                "try again later.",
            }
            return
        if item is None:
            yield {
                "type": "error",
                "code": "inference_unavailable",
                "message": "No inference worker answered in "
                f"{settings.LOFT_INFERENCE_TIMEOUT_SECONDS} seconds; try again later.",
            }
            return
        event = json.loads(item[1])
        yield event
        if event["type"] in ("done", "error"):
            connection.delete(key)
            return


def serve_generation(request_id: str, org_id: str, adapter_id: str, request: dict) -> None:
    """Worker side: answer one playground request, pushing its events as they come."""
    connection, key = _redis(), _key(request_id)

    def push(event: dict) -> None:
        connection.rpush(key, json.dumps(event))
        connection.expire(key, settings.LOFT_INFERENCE_TIMEOUT_SECONDS * 2)

    adapter = Adapter.objects.filter(org_id=org_id, pk=adapter_id).select_related("base_model")
    adapter = adapter.first()
    if adapter is None:
        push({"type": "error", "code": "not_found", "message": "The adapter was deleted."})
        return
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
            )
            for piece in result:
                push({"type": "delta", "text": piece})
    except Exception as error:  # noqa: BLE001 - the client must hear why, whatever broke
        push({"type": "error", "code": "generation_failed", "message": f"{error}"})
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


class GenerationFailed(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def answer(adapter: Adapter, request: dict) -> dict:
    """A whole answer at once: ``text``, ``finish_reason`` and ``usage``; raises
    GenerationFailed when no worker answered or generation broke."""
    pieces = []
    for event in read_events(start_generation(adapter, request)):
        if event["type"] == "delta":
            pieces.append(event["text"])
        elif event["type"] == "done":
            return {"text": "".join(pieces), **{k: event[k] for k in ("finish_reason", "usage")}}
        else:
            raise GenerationFailed(event.get("code", "generation_failed"), event["message"])
    raise GenerationFailed("generation_failed", "The worker stopped without finishing.")
