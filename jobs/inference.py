"""What every inference request is held to before a worker sees it, whichever route it came by
(the playground's now, chat completions later):

- ``check_prompt_fits``: the conversation, rendered with the base model's chat template and
  counted with its tokenizer (engine/chat_tokenizer.py: the web stays torch-free), must leave
  ``max_tokens`` of the model's context for the answer; else ``PromptTooLong``, naming both.
- ``take_slot``: an organization has at most ``LOFT_INFERENCE_CONCURRENT_PER_ORG`` requests
  waiting on workers at once, each holding a web thread; one more gets ``TooManyRequests``.
  The running requests are a Redis sorted set per organization (shared by every web process),
  each member scored with the time it lapses by itself, so a web process killed mid-request
  does not keep its place for ever.
"""

from __future__ import annotations

import contextlib
import functools
import time
import uuid
from collections.abc import Iterator

import redis
from django.conf import settings
from jinja2.exceptions import TemplateError

from jobs.datasets import chat_tokenizer_for
from jobs.models import BaseModel

# A refused request is told to come back after this long: most answers take seconds.
RETRY_AFTER_SECONDS = 5
# A place is kept this long past the request's own timeout, then lapses if never given back.
SLOT_GRACE_SECONDS = 30


class PromptRefused(ValueError):
    """The conversation cannot be put to the model; the message says why."""


class PromptTooLong(PromptRefused):
    def __init__(self, prompt_tokens: int, max_tokens: int, context_length: int):
        self.prompt_tokens = prompt_tokens
        self.room = context_length - max_tokens
        super().__init__(
            f"The messages are {prompt_tokens} tokens long, but this model's context of "
            f"{context_length} tokens, less max_tokens ({max_tokens}), leaves room for "
            f"{max(self.room, 0)}. Shorten the messages or lower max_tokens."
        )


class TooManyRequests(Exception):
    retry_after = RETRY_AFTER_SECONDS

    def __init__(self, limit: int):
        super().__init__(
            f"Your organization already has {limit} generation requests running, its limit; "
            f"try again in {self.retry_after} seconds."
        )


class InferenceUnavailable(Exception):
    """Redis, which counts the running requests and carries their answers, did not answer."""


def prompt_tokens(base_model: BaseModel, messages: list[dict]) -> int:
    """The tokens of ``messages`` as the worker will feed them: chat template, generation
    prompt, no extra special tokens (engine/evaluate.py's ``_prompt_ids``)."""
    tokenizer = chat_tokenizer_for(base_model)
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    except TemplateError as error:  # e.g. a template that wants roles to alternate
        message = f"The base model's chat template refuses these messages: {error}"
        raise PromptRefused(message) from None
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def check_prompt_fits(base_model: BaseModel, messages: list[dict], max_tokens: int) -> int:
    """The prompt's token count; raises ``PromptTooLong`` if the answer would not fit after it."""
    count = prompt_tokens(base_model, messages)
    if count + max_tokens > base_model.context_length:
        raise PromptTooLong(count, max_tokens, base_model.context_length)
    return count


@functools.cache
def _redis() -> redis.Redis:
    return redis.Redis.from_url(settings.REDIS_URL, socket_timeout=2, socket_connect_timeout=2)


class Slot:
    """One organization's place among its running requests; ``release`` gives it back."""

    def __init__(self, key: str, member: str):
        self.key, self.member = key, member

    def release(self) -> None:
        # If Redis is down, the place lapses by itself, SLOT_GRACE_SECONDS past the timeout.
        with contextlib.suppress(redis.RedisError):
            _redis().zrem(self.key, self.member)

    def __enter__(self) -> Slot:
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()


def take_slot(org_id: str) -> Slot:
    """A place for one more running request of ``org_id``; raises ``TooManyRequests`` when all
    are taken, ``InferenceUnavailable`` when Redis does not answer."""
    limit = settings.LOFT_INFERENCE_CONCURRENT_PER_ORG
    key, member = f"loft:inference:running:{org_id}", uuid.uuid4().hex
    now = time.time()
    lifetime = settings.LOFT_INFERENCE_TIMEOUT_SECONDS + SLOT_GRACE_SECONDS
    try:
        with _redis().pipeline() as pipe:  # MULTI/EXEC: counted and added in one step
            pipe.zremrangebyscore(key, "-inf", now)
            pipe.zadd(key, {member: now + lifetime})
            pipe.zcard(key)
            pipe.expire(key, lifetime)
            running = pipe.execute()[2]
        slot = Slot(key, member)
    except redis.RedisError as error:
        raise InferenceUnavailable(
            f"Generation is unavailable right now ({error}); try again later."
        ) from None
    if limit and running > limit:
        slot.release()
        raise TooManyRequests(limit)
    return slot


def holding(slot: Slot, events: Iterator[dict]) -> Iterator[dict]:
    """``events`` as they come, giving ``slot`` back when they end or the client goes away."""
    try:
        yield from events
    finally:
        slot.release()
