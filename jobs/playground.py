"""Inference requests, web side (chat completions and the playground): find what answers a
``model`` name, queue a ``generate`` task on the inference queue by name, and read the answer
back from a Redis list that the worker (worker/serving.py) appends to as it generates (one list
per request, expiring by itself), so the web never loads a model and a streamed answer reaches
the client token by token.

Every request has a wall-clock deadline, ``answer_by`` (``LOFT_INFERENCE_TIMEOUT_SECONDS`` from
its start): the web thread stops waiting then, and the worker stops generating for a client
that is gone. A client that disconnects earlier raises the request's cancel flag
(``request_cancel``), which the worker reads after every decode step. What a request must
satisfy before it is queued is jobs/inference.py."""

from __future__ import annotations

import contextlib
import json
import logging
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import redis
from django.conf import settings

from jobs import tasks
from jobs.models import Adapter, Alias, BaseModel
from loft.api.base import is_id_like

log = logging.getLogger(__name__)


def answer_channel() -> redis.Redis:
    # redis-py 8 reads a socket for 5 s by default; a BLPOP waits up to the whole request's
    # timeout (a first request loads the model), so the socket must wait longer than that.
    return redis.Redis.from_url(
        settings.REDIS_URL,
        socket_timeout=settings.LOFT_INFERENCE_TIMEOUT_SECONDS + 10,
        socket_connect_timeout=5,
    )


def answer_key(request_id: str) -> str:
    return f"loft:generate:{request_id}"


def cancel_key(request_id: str) -> str:
    return f"loft:generate:{request_id}:cancel"


@dataclass(frozen=True)
class Target:
    """What answers a request: a base model alone, or one of its adapters, named directly or
    through an alias. ``model`` is the name an answer reports: the adapter's ``ft:`` name even
    when the request named an alias, as OpenAI answers a model alias with the snapshot that
    served it."""

    model: str
    base_model: BaseModel
    adapter: Adapter | None = None
    alias: str = ""
    quantization: str = "none"  # the base's precision: an adapter's, the one it trained on

    @classmethod
    def of_adapter(cls, adapter: Adapter, alias: str = "") -> Target:
        return cls(adapter.name, adapter.base_model, adapter, alias, adapter.base_quantization)


def find_target(org, model: str) -> Target | None:
    """What answers ``model`` for ``org``: an enabled base model, one of the organization's
    adapters (its ``ft:`` name or its id) or aliases; None when nothing of the organization's
    has that name (another tenant's included)."""
    if not is_id_like(model, max_length=300):
        return None
    base = BaseModel.objects.enabled().filter(name=model).first()
    if base is not None:
        return Target(base.name, base)
    adapters = Adapter.objects.for_org(org).select_related("base_model")
    adapter = adapters.filter(name=model).first() or adapters.filter(pk=model).first()
    if adapter is not None:
        return Target.of_adapter(adapter)
    alias = Alias.objects.for_org(org).filter(name=model).select_related("adapter__base_model")
    alias = alias.first()
    if alias is not None:
        return Target.of_adapter(alias.adapter, alias=alias.name)
    return None


def answer_deadline() -> float:
    """The wall-clock time by which a request starting now must be answered."""
    return time.time() + settings.LOFT_INFERENCE_TIMEOUT_SECONDS


def start_generation(org_id: str, target: Target, request: dict, answer_by: float) -> str:
    """Queue a request (``messages`` and the sampling options) for ``target``; returns the id
    its answer is read back with."""
    request_id = uuid.uuid4().hex
    task = {
        **request,
        "model": target.model,
        "base_model": target.base_model.pk,
        "adapter": target.adapter.pk if target.adapter else None,
        "alias": target.alias,
        "quantization": target.quantization,
        "answer_by": answer_by,
    }
    queue = tasks.inference_queue(target.base_model.name, target.quantization)
    tasks.generate(request_id, org_id, task, queue)
    return request_id


def request_cancel(request_id: str) -> None:
    """Tell the worker nobody reads this answer any more: it drops the request at its next
    decode step. Best effort: if Redis is down, the answer's deadline stops it."""
    with contextlib.suppress(redis.RedisError):
        answer_channel().set(cancel_key(request_id), 1, ex=settings.LOFT_INFERENCE_TIMEOUT_SECONDS)


def read_events(request_id: str, answer_by: float) -> Iterator[dict]:
    """The worker's events for a request as they arrive: ``delta`` (text), then ``done`` (with
    usage and finish_reason) or ``error``. A worker that has not finished by ``answer_by``
    ends it with an ``error`` event."""
    connection, key = answer_channel(), answer_key(request_id)
    while True:
        remaining = answer_by - time.time()
        try:
            item = (
                connection.blpop([key], timeout=max(1, int(remaining))) if remaining > 0 else None
            )
        except redis.RedisError:
            log.exception("reading the answer of generation request %s", request_id)
            yield {
                "type": "error",
                "code": "inference_unavailable",
                "message": "The answer could not be read from the broker; try again later.",
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


class GenerationFailed(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def collect(events: Iterator[dict]) -> dict:
    """A whole answer from its events: ``text``, ``finish_reason`` and ``usage``; raises
    GenerationFailed when no worker answered or generation broke."""
    pieces = []
    for event in events:
        if event["type"] == "delta":
            pieces.append(event["text"])
        elif event["type"] == "done":
            return {"text": "".join(pieces), **{k: event[k] for k in ("finish_reason", "usage")}}
        else:
            raise GenerationFailed(event.get("code", "generation_failed"), event["message"])
    raise GenerationFailed("generation_failed", "The worker stopped without finishing.")
