"""What every inference request is held to before a worker sees it, whichever route it came by
(chat completions, the playground's page and its API):

- ``check_prompt_fits``: the conversation, rendered with the base model's chat template and
  counted with its tokenizer (engine/chat_tokenizer.py: the web stays torch-free), must leave
  ``max_tokens`` of the model's context for the answer; else ``PromptTooLong``, naming both.
- ``admit``: the organization's two inference limits, its Quota row's or else the operator's
  defaults (settings), checked and counted in one step in Redis (shared by every web process):
  - requests running at once (``max_concurrent_inference``, ``LOFT_INFERENCE_CONCURRENT_PER_ORG``),
    each holding a web thread: a sorted set per organization, each member scored with the time
    it lapses by itself, so a web process killed mid-request does not keep its place for ever;
  - tokens per minute (``max_inference_tokens_per_minute``,
    ``LOFT_INFERENCE_TOKENS_PER_MINUTE_PER_ORG``): each request reserves its prompt and its
    max_tokens when admitted, as OpenAI counts them, and gets nothing back for a shorter answer.
  Past either, ``TooManyRequests`` (the API's 429), with the seconds to wait.
"""

from __future__ import annotations

import contextlib
import functools
import math
import uuid
from collections.abc import Iterator

import redis
from django.conf import settings
from jinja2.exceptions import TemplateError

from jobs.datasets import chat_tokenizer_for
from jobs.models import BaseModel, Quota

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


class RequestTooLarge(PromptRefused):
    """The request alone asks for more tokens than the organization may use in a minute: no
    wait would let it through, so it is refused as a bad request, not a rate limit."""

    def __init__(self, tokens: int, budget: int, per: str):
        super().__init__(
            f"This request asks for {tokens:,} tokens (its prompt and max_tokens), more than "
            f"your organization's limit of {budget:,} tokens per {per}. Shorten the messages "
            "or lower max_tokens."
        )


class TooManyRequests(Exception):
    """One of the organization's inference limits is reached. ``limit`` names which, as
    OpenAI's 429s do: "requests" (running at once) or "tokens" (per minute); ``retry_after``
    is the whole seconds to wait, at least 1."""

    def __init__(self, message: str, *, retry_after: int, limit: str):
        super().__init__(message)
        self.retry_after = max(1, retry_after)
        self.limit = limit


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


# One step, so that two web processes never both take the last place or the last tokens, and
# a request refused for its tokens takes no place (nor the reverse). Redis's own clock scores
# the places: web processes on several hosts need not agree on the time.
_ADMIT = """
local now = redis.call('TIME')
now = tonumber(now[1]) + tonumber(now[2]) / 1000000
local lifetime, running_limit = tonumber(ARGV[2]), tonumber(ARGV[3])
local tokens, budget = tonumber(ARGV[4]), tonumber(ARGV[5])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local running = redis.call('ZCARD', KEYS[1])
if running_limit >= 0 and running >= running_limit then
  return {'requests', running, 0}
end
if budget >= 0 then
  local used = tonumber(redis.call('GET', KEYS[2]) or '0')
  if used + tokens > budget then
    return {'tokens', used, redis.call('PTTL', KEYS[2])}
  end
  redis.call('INCRBY', KEYS[2], tokens)
  if redis.call('PTTL', KEYS[2]) < 0 then
    redis.call('PEXPIRE', KEYS[2], ARGV[6])
  end
end
redis.call('ZADD', KEYS[1], now + lifetime, ARGV[1])
redis.call('EXPIRE', KEYS[1], lifetime)
return {'ok', running + 1, 0}
"""


@functools.cache
def _admit_script():
    """Sent to Redis once, then called by its hash (EVALSHA; redis-py sends it again if Redis
    restarted and forgot it)."""
    return _redis().register_script(_ADMIT)


def admit(org_id: str, tokens: int) -> Slot:
    """A place among the organization's running inference requests, with ``tokens`` (prompt +
    max_tokens) counted against its tokens-per-minute budget. Give the place back with
    ``Slot.release`` (or ``with``, or ``holding``); the tokens stay counted.

    The budget is a fixed window, opened by the first request that finds none open and lasting
    ``LOFT_INFERENCE_RATE_WINDOW_SECONDS`` (a minute): a counter whose expiry is the window's
    end, so that a refused request waits until then. (Two windows back to back may let up to
    twice the budget through within a minute; a sliding window would keep a line per request.)

    Raises ``TooManyRequests`` past either limit, ``RequestTooLarge`` (a ``PromptRefused``)
    for ``tokens`` above the whole budget, ``InferenceUnavailable`` when Redis does not answer.
    A limit of 0 in the organization's Quota row allows nothing; 0 in settings, no limit.
    """
    limits = (Quota.objects.filter(org_id=org_id).first() or Quota(org_id=org_id)).limits()
    running_limit, budget = limits["concurrent_inference"], limits["inference_tokens_per_minute"]
    window = max(1, settings.LOFT_INFERENCE_RATE_WINDOW_SECONDS)
    per = {60: "minute", 1: "second"}.get(window, f"{window} seconds")
    if running_limit == 0:
        raise TooManyRequests(
            "Your organization's quota allows no generation requests (its limit of requests "
            "running at once is 0).",
            retry_after=RETRY_AFTER_SECONDS,
            limit="requests",
        )
    if budget == 0:
        raise TooManyRequests(
            f"Your organization's quota allows no generation (its limit is 0 tokens per {per}).",
            retry_after=window,
            limit="tokens",
        )
    if budget is not None and tokens > budget:
        raise RequestTooLarge(tokens, budget, per)

    keys = [f"loft:inference:running:{org_id}", f"loft:inference:tokens:{org_id}"]
    member = uuid.uuid4().hex
    lifetime = settings.LOFT_INFERENCE_TIMEOUT_SECONDS + SLOT_GRACE_SECONDS
    no_limit = -1
    try:
        outcome, count, expires_ms = _admit_script()(
            keys,
            [
                member,
                lifetime,
                no_limit if running_limit is None else running_limit,
                tokens,
                no_limit if budget is None else budget,
                window * 1000,
            ],
        )
    except redis.RedisError as error:
        raise InferenceUnavailable(
            f"Generation is unavailable right now ({error}); try again later."
        ) from None
    if outcome == b"requests":
        raise TooManyRequests(
            f"Your organization already has {count} generation requests running, its limit; "
            f"try again in {RETRY_AFTER_SECONDS} seconds.",
            retry_after=RETRY_AFTER_SECONDS,
            limit="requests",
        )
    if outcome == b"tokens":
        wait = math.ceil(expires_ms / 1000) if expires_ms > 0 else window
        raise TooManyRequests(
            f"Your organization has used {count:,} of its {budget:,} tokens per {per}, and "
            f"this request needs {tokens:,} (its prompt and max_tokens); try again in "
            f"{wait} seconds.",
            retry_after=wait,
            limit="tokens",
        )
    return Slot(keys[0], member)


def holding(slot: Slot, events: Iterator[dict]) -> Iterator[dict]:
    """``events`` as they come, giving ``slot`` back when they end or the client goes away."""
    try:
        yield from events
    finally:
        slot.release()
