"""The playground's requests, web side: queue a ``generate`` task on the inference queue by name
and read the answer back from a Redis list that the worker (worker/serving.py) appends to as it
generates (one list per request, expiring by itself), so the web never loads a model and a
streamed answer reaches the browser token by token.

Every request has a wall-clock deadline, ``answer_by`` (``LOFT_INFERENCE_TIMEOUT_SECONDS`` from
its start): the web thread stops waiting then, and the worker stops generating for a client
that is gone. What a request must satisfy before it is queued is jobs/inference.py."""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Iterator

import redis
from django.conf import settings

from jobs import tasks
from jobs.models import Adapter

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


def answer_deadline() -> float:
    """The wall-clock time by which a request starting now must be answered."""
    return time.time() + settings.LOFT_INFERENCE_TIMEOUT_SECONDS


def start_generation(adapter: Adapter, request: dict, answer_by: float) -> str:
    """Queue a playground request; returns the id its answer is read back with."""
    request_id = uuid.uuid4().hex
    tasks.generate(request_id, adapter.org_id, adapter.id, {**request, "answer_by": answer_by})
    return request_id


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
