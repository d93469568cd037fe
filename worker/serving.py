"""Serving adapters: base models loaded once per worker process, many adapters beside them.

Chat completions (and the playground) are answered by engine/batching.py: one engine per base
model and precision in an inference worker, whose running batch holds the requests for the base
and for any of its adapters at once, one forward per decode step for all of them. A request
crosses processes (jobs/playground.py is the web's half): ``submit_generation`` (the Celery
task) hands it to the engine and returns; the engine's thread appends each answer's events to
its Redis list as they are generated (``AnswerChannel``).

Custom evaluations ask a (training) worker for "this base, with this adapter (or none)", one
model at a time: ``adapter_cache`` keeps one engine/generate.py AdapterCache per process, the
base loaded once, adapters fetched from S3 on first use and switched without reloading.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import redis
from django.conf import settings
from django.db import close_old_connections

from engine import artifacts, batching, data, generate
from engine.base_models import BaseModelSpec, load_base_model, training_device
from engine.evaluate import _prompt_ids
from jobs import playground
from jobs.models import Adapter, BaseModel, InferenceUsage
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


# --- answering requests: one batched engine per base model and precision ------------------


@dataclass
class Pending:
    """What the worker knows of a request the engine is answering."""

    org_id: str
    model: str
    adapter_id: str
    alias: str
    answer_by: float


class AnswerChannel:
    """The engine's listener: each request's events go to its Redis list (read by the web,
    jobs/playground.py), once per decode step for every row in one round trip; a request whose
    client went away (its cancel flag) or whose deadline passed is cancelled; each finished
    answer is metered (InferenceUsage)."""

    def __init__(self):
        self._requests: dict[str, Pending] = {}
        self._events: list[tuple[str, dict]] = []
        self._lock = threading.Lock()  # register() runs in a task, the rest on the engine's thread

    def register(self, request_id: str, pending: Pending) -> None:
        with self._lock:
            self._requests[request_id] = pending

    def piece(self, request_id: str, text: str) -> None:
        self._events.append((request_id, {"type": "delta", "text": text}))

    def finished(
        self,
        request_id: str,
        finish_reason: str,
        prompt_tokens: int,
        completion_tokens: int,
        error: str | None = None,
    ) -> None:
        with self._lock:
            pending = self._requests.pop(request_id, None)
        if finish_reason == "error":
            event = {"type": "error", "code": "generation_failed", "message": error or FAILED}
        elif finish_reason == "cancelled":
            event = {"type": "error", "code": "cancelled", "message": "Cancelled."}
        else:
            event = {
                "type": "done",
                "finish_reason": finish_reason,
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens,
                },
            }
        self._events.append((request_id, event))
        if pending is not None and finish_reason != "error":
            close_old_connections()  # this thread's connection may have outlived the database's
            InferenceUsage.record(
                pending.org_id,
                pending.model,
                pending.adapter_id,
                pending.alias,
                prompt_tokens,
                completion_tokens,
            )

    def after_step(self, running: list[str]) -> list[str]:
        """Send the step's events; the running requests nobody waits for any more."""
        events, self._events = self._events, []
        now = time.time()
        with self._lock:
            late = [r for r in running if self._requests.get(r, _NEVER).answer_by < now]
        try:
            with playground.answer_channel().pipeline(transaction=False) as pipe:
                for request_id, event in events:
                    key = playground.answer_key(request_id)
                    pipe.rpush(key, json.dumps(event))
                    pipe.expire(key, settings.LOFT_INFERENCE_TIMEOUT_SECONDS * 2)
                for request_id in running:
                    pipe.exists(playground.cancel_key(request_id))
                replies = pipe.execute()
        except redis.RedisError:
            # Nobody can read the answers: stop generating them.
            log.exception("the answers' channel failed; dropping %d requests", len(running))
            return list(running)
        flags = replies[2 * len(events) :]
        return late + [r for r, flag in zip(running, flags, strict=True) if flag and r not in late]


_NEVER = Pending("", "", "", "", float("inf"))
FAILED = "The model could not generate an answer; try again later."
_engines_lock = threading.Lock()
_engines: dict[tuple[BaseModelSpec, str], tuple[batching.BatchedEngine, AnswerChannel]] = {}


def engine_for(base_model: BaseModel, quantization: str):
    """This process's engine for ``base_model`` at one precision, started at first use: every
    request for that base and its adapters joins its running batch."""
    key = (base_model.spec, quantization)
    with _engines_lock:
        if key not in _engines:
            channel = AnswerChannel()

            def load_base():
                return load_base_model(
                    base_model.spec, settings.LOFT_HOME / "models", quantization, training_device()
                )

            engine = batching.BatchedEngine(
                load_base,
                tokenizer_for(base_model),
                channel,
                device=training_device(),
                max_rows=settings.LOFT_INFERENCE_BATCH_ROWS,
                adapter_capacity=settings.LOFT_INFERENCE_ADAPTERS,
            )
            engine.start()
            _engines[key] = (engine, channel)
        return _engines[key]


def submit_generation(request_id: str, org_id: str, request: dict) -> None:
    """Worker side of an inference request: check it, fetch its adapter (here, not on the
    engine's thread, so the running batch does not wait for a download) and hand it to the
    engine, which answers it among the others; its events reach the web through Redis."""

    def refuse(code: str, message: str) -> None:
        key = playground.answer_key(request_id)
        connection = playground.answer_channel()
        connection.rpush(key, json.dumps({"type": "error", "code": code, "message": message}))
        connection.expire(key, settings.LOFT_INFERENCE_TIMEOUT_SECONDS * 2)

    if time.time() > request["answer_by"]:
        return  # its client has given up
    base_model = BaseModel.objects.filter(pk=request["base_model"]).first()
    adapter = None
    if request["adapter"]:
        adapter = Adapter.objects.for_org(org_id).filter(pk=request["adapter"]).first()
    if base_model is None or (request["adapter"] and adapter is None):
        refuse("model_not_found", "The model was deleted.")
        return
    tokenizer = tokenizer_for(base_model)
    messages = [data.Message(m["role"], m["content"]) for m in request["messages"]]
    prompt = _prompt_ids(messages, tokenizer)
    if len(prompt) + request["max_tokens"] > base_model.context_length:
        refuse(
            "context_length_exceeded",
            f"The prompt is {len(prompt)} tokens; with max_tokens {request['max_tokens']} it "
            f"does not fit the model's context of {base_model.context_length} tokens.",
        )
        return
    engine, channel = engine_for(base_model, request["quantization"])
    try:
        folder = _folder_for(engine, adapter) if adapter else None
    except Exception:  # noqa: BLE001 - the client must hear that it broke, whatever broke
        log.exception("fetching adapter %s failed", adapter.id)
        refuse("generation_failed", FAILED)
        raise
    channel.register(
        request_id,
        Pending(
            org_id,
            request["model"],
            adapter.id if adapter else "",
            request["alias"],
            request["answer_by"],
        ),
    )
    sampling = batching.Sampling(
        max_new_tokens=request["max_tokens"],
        temperature=request["temperature"],
        top_p=request.get("top_p", 1.0),
        seed=request.get("seed"),
        stop=tuple(request.get("stop") or ()),
    )
    engine.submit(
        batching.Request(
            id=request_id,
            prompt=prompt,
            adapter=adapter.id if adapter else None,
            sampling=sampling,
            folder=folder,
        )
    )


def _folder_for(engine: batching.BatchedEngine, adapter: Adapter) -> Path:
    """The adapter's folder on this worker: checked against its manifest when the engine is to
    load it (fetched if need be), taken as it is when the engine has it loaded already, so that
    the requests for a loaded adapter do not read and hash its files again (20 MB with Loft's
    default shape, on the CPU the running batch uses). Its folder was checked when it was
    loaded, and stays: should the engine evict it meanwhile, it loads it from there again."""
    if engine.has_loaded(adapter.id):
        return settings.LOFT_HOME / "adapters" / adapter.id
    return adapter_folder(adapter)
