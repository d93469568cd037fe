"""``POST /v1/chat/completions``: OpenAI's chat completions, answered by Loft's models.

``model`` names a base model, one of the organization's fine-tuned models (its ``ft:`` name or
its adapter id) or one of its aliases (jobs/playground.py ``find_target``); another tenant's
name is a 404 ``model_not_found``, as a name that does not exist. The request is checked here
(shape, context length, the organization's limits: jobs/inference.py), queued for an inference
worker, and its answer read back as the worker generates it (jobs/playground.py): whole, as a
``chat.completion``, or streamed as ``chat.completion.chunk`` server-sent events ending in
``data: [DONE]``, with a last chunk holding ``usage`` when ``stream_options.include_usage``.
A streaming client that disconnects raises the request's cancel flag, and the worker drops its
row at its next decode step.

Of OpenAI's parameters Loft takes ``messages`` (text content), ``max_tokens`` /
``max_completion_tokens``, ``temperature``, ``top_p``, ``stop``, ``seed``, ``n`` (1 only),
``stream``, ``stream_options``, ``user``, ``store`` and ``metadata``; any other is refused by
name, so a client never believes a setting took effect that did not. ``store: true`` keeps the
request and its answer (jobs/api/completions.py lists, reads and deletes them, and takes their
feedback).
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Generator, Iterator

from django.conf import settings
from django.db import transaction
from django.http import StreamingHttpResponse
from drf_spectacular.utils import extend_schema
from rest_framework import exceptions, serializers, status
from rest_framework.response import Response
from rest_framework.views import APIView

from jobs import inference, playground
from jobs.api.completions import MetadataField, StoredCompletionListMixin
from jobs.api.serializers import StrictSerializer
from jobs.models import StoredCompletion
from loft.api.errors import LoftAPIError
from loft.tenancy import current_org

log = logging.getLogger(__name__)

MAX_STOP_SEQUENCES = 4


class MessageContentField(serializers.Field):
    """A message's content: a string, or OpenAI's list of content parts, of which Loft's models
    read text parts only."""

    def to_internal_value(self, value):
        if isinstance(value, str):
            return value
        if isinstance(value, list) and all(
            isinstance(part, dict)
            and part.get("type") == "text"
            and isinstance(part.get("text"), str)
            for part in value
        ):
            return "".join(part["text"] for part in value)
        raise serializers.ValidationError(
            "Content must be a string or a list of text parts; these models read text only."
        )

    def to_representation(self, value):
        return value


class ChatMessageSerializer(StrictSerializer):
    role = serializers.ChoiceField(choices=["system", "developer", "user", "assistant"])
    content = MessageContentField()
    name = serializers.CharField(required=False, max_length=64)

    def validate_content(self, content: str) -> str:
        if len(content) > 32_000:
            raise serializers.ValidationError("A message is at most 32,000 characters.")
        return content


class StopField(serializers.Field):
    def to_internal_value(self, value):
        stops = [value] if isinstance(value, str) else value
        if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
            raise serializers.ValidationError("stop is a string or a list of non-empty strings.")
        if len(stops) > MAX_STOP_SEQUENCES:
            raise serializers.ValidationError(f"stop holds at most {MAX_STOP_SEQUENCES} sequences.")
        return stops

    def to_representation(self, value):
        return value


class StreamOptionsSerializer(StrictSerializer):
    include_usage = serializers.BooleanField(required=False, default=False)


class ChatCompletionSerializer(StrictSerializer):
    model = serializers.CharField(max_length=300)
    messages = serializers.ListField(child=ChatMessageSerializer(), min_length=1, max_length=100)
    max_tokens = serializers.IntegerField(required=False, allow_null=True, min_value=1)
    max_completion_tokens = serializers.IntegerField(required=False, allow_null=True, min_value=1)
    temperature = serializers.FloatField(required=False, allow_null=True, min_value=0, max_value=2)
    top_p = serializers.FloatField(required=False, allow_null=True, min_value=0, max_value=1)
    stop = StopField(required=False, allow_null=True)
    seed = serializers.IntegerField(required=False, allow_null=True)
    n = serializers.IntegerField(required=False, allow_null=True)
    stream = serializers.BooleanField(required=False, allow_null=True, default=False)
    stream_options = StreamOptionsSerializer(required=False, allow_null=True)
    user = serializers.CharField(required=False, allow_blank=True, max_length=256)
    store = serializers.BooleanField(required=False, allow_null=True, default=False)
    metadata = MetadataField(required=False, allow_null=True)

    def validate_n(self, value):
        if value not in (None, 1):
            raise serializers.ValidationError("Loft answers one choice per request: n must be 1.")
        return value

    def validate_top_p(self, value):
        if value is not None and value <= 0:
            raise serializers.ValidationError("top_p must be above 0.")
        return value

    def validate(self, attrs):
        if attrs.get("stream_options") and not attrs.get("stream"):
            raise serializers.ValidationError(
                {"stream_options": "stream_options is only allowed when stream is true."}
            )
        limit = settings.LOFT_INFERENCE_MAX_TOKENS
        for name in ("max_tokens", "max_completion_tokens"):
            if (attrs.get(name) or 0) > limit:
                raise serializers.ValidationError({name: f"{name} is at most {limit}."})
        if attrs["messages"][-1]["role"] == "assistant":
            raise serializers.ValidationError(
                {"messages": "The last message must not be the assistant's: it is the answer."}
            )
        return attrs


class ChatCompletionsView(StoredCompletionListMixin, APIView):
    @extend_schema(
        operation_id="chat_completions_create",
        request=ChatCompletionSerializer,
        responses={200: serializers.DictField()},
    )
    def post(self, request):
        body = ChatCompletionSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        values = body.validated_data
        org = current_org(request)
        target = playground.find_target(org, values["model"])
        if target is None:
            raise LoftAPIError(
                f"The model '{values['model']}' does not exist or you do not have access to it.",
                status_code=status.HTTP_404_NOT_FOUND,
                param="model",
                code="model_not_found",
            )
        messages = [
            {"role": "system" if m["role"] == "developer" else m["role"], "content": m["content"]}
            for m in values["messages"]
        ]
        temperature = values.get("temperature")
        top_p = values.get("top_p")
        generation = {
            "messages": messages,
            "max_tokens": values.get("max_completion_tokens") or values.get("max_tokens"),
            "temperature": 1.0 if temperature is None else temperature,  # OpenAI's default
            "top_p": 1.0 if top_p is None else top_p,
            "stop": values.get("stop") or [],
            "seed": values.get("seed"),
        }
        include_usage = bool((values.get("stream_options") or {}).get("include_usage"))
        keep = None
        if values.get("store"):
            keep = Keeping(org, messages, generation, values.get("metadata") or {})
        return answer(
            org.id, target, generation, bool(values.get("stream")), include_usage, keep=keep
        )


class Keeping:
    """What a request asking ``store: true`` keeps beside its answer (StoredCompletion)."""

    def __init__(self, org, messages: list[dict], generation: dict, metadata: dict):
        self.org, self.messages, self.metadata = org, messages, metadata
        self.sampling = {
            name: generation[name]
            for name in ("temperature", "top_p", "max_tokens", "seed", "stop")
            if generation.get(name) not in (None, [])
        }

    def keep(self, target: playground.Target, answer: dict) -> None:
        StoredCompletion.keep(
            self.org,
            answer,
            messages=self.messages,
            sampling=self.sampling,
            alias=target.alias or "",
            adapter_id=target.adapter.id if target.adapter else "",
            base_model=target.base_model.name,
            metadata=self.metadata,
        )


def answer(
    org_id: str,
    target: playground.Target,
    generation: dict,
    stream: bool,
    include_usage: bool = True,
    keep: Keeping | None = None,
) -> Response | StreamingHttpResponse:
    """Queue ``generation`` (messages and sampling; ``max_tokens`` None: as much as the context
    leaves, up to LOFT_INFERENCE_MAX_TOKENS) for ``target`` and answer as OpenAI does; the
    finished answer is stored when ``keep`` says so."""
    try:
        prompt_tokens = inference.prompt_tokens(target.base_model, generation["messages"])
        if generation["max_tokens"] is None:
            room = target.base_model.context_length - prompt_tokens
            generation["max_tokens"] = max(1, min(settings.LOFT_INFERENCE_MAX_TOKENS, room))
        inference.check_prompt_fits(
            target.base_model, generation["messages"], generation["max_tokens"]
        )
    except inference.PromptTooLong as error:
        raise LoftAPIError(str(error), param="messages", code="context_length_exceeded") from None
    except inference.PromptRefused as error:
        raise LoftAPIError(str(error), param="messages", code="invalid_messages") from None
    slot = api_admission(org_id, prompt_tokens + generation["max_tokens"])
    completion = Completion(target, keep)
    try:
        answer_by = playground.answer_deadline()
        completion.request_id = playground.start_generation(org_id, target, generation, answer_by)
        events = playground.read_events(completion.request_id, answer_by)
        # The first event decides the status: an error before any text is an HTTP error, as
        # OpenAI answers a refused request, not a stream that starts and then breaks.
        first = next(events)
        if first["type"] == "error":
            raise _api_error(first)
    except BaseException:
        slot.release()
        raise
    events = _chain(first, events)
    if stream:
        response = StreamingHttpResponse(
            completion.chunks(inference.holding(slot, events), include_usage),
            content_type="text/event-stream",
        )
        response["Cache-Control"] = "no-cache"
        response["X-Accel-Buffering"] = "no"  # nginx: pass each event on at once
        return response
    try:
        with slot:
            result = playground.collect(events)
    except playground.GenerationFailed as error:
        raise _api_error({"code": error.code, "message": str(error)}) from error
    whole = completion.whole(result)
    completion.kept(whole)
    return Response(whole)


def api_admission(org_id: str, tokens: int) -> inference.Slot:
    """``inference.admit``, or the API's answer: 429 past a limit, with ``Retry-After`` and
    OpenAI's code ``rate_limit_exceeded``; 400 for a request larger than the whole budget
    (no wait would help, and OpenAI's clients retry a 429 by themselves); 503 without Redis."""
    try:
        return inference.admit(org_id, tokens)
    except inference.TooManyRequests as error:
        # Its wait set apart: DRF would add a sentence of its own to ours, which names it.
        throttled = exceptions.Throttled(detail=str(error), code="rate_limit_exceeded")
        throttled.wait = error.retry_after
        raise throttled from None
    except inference.RequestTooLarge as error:
        raise LoftAPIError(str(error), param="max_tokens", code="request_too_large") from None
    except inference.InferenceUnavailable as error:
        raise LoftAPIError(
            str(error),
            status_code=status.HTTP_503_SERVICE_UNAVAILABLE,
            type="server_error",
            code="inference_unavailable",
        ) from None


def _chain(first: dict, rest: Iterator[dict]) -> Iterator[dict]:
    yield first
    yield from rest


# The status of an answer whose first event is an error, by the worker's code.
ERROR_STATUS = {
    "context_length_exceeded": status.HTTP_400_BAD_REQUEST,
    "model_not_found": status.HTTP_404_NOT_FOUND,
    "inference_unavailable": status.HTTP_503_SERVICE_UNAVAILABLE,
}


def _api_error(event: dict) -> LoftAPIError:
    code = event.get("code") or "generation_failed"
    status_code = ERROR_STATUS.get(code, status.HTTP_502_BAD_GATEWAY)
    kind = "invalid_request_error" if status_code < 500 else "server_error"
    return LoftAPIError(event["message"], status_code=status_code, type=kind, code=code)


class Completion:
    """One answer in OpenAI's shapes: whole, or as the chunks of a stream."""

    def __init__(self, target: playground.Target, keep: Keeping | None = None):
        self.target = target
        self.keep = keep
        self.id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.request_id = ""
        # Which weights answered: the adapter's id, or the base's revision.
        adapter = target.adapter
        self.fingerprint = adapter.id if adapter else f"base-{target.base_model.revision[:12]}"

    def _envelope(self, kind: str) -> dict:
        return {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.target.model,
            "system_fingerprint": self.fingerprint,
        }

    def whole(self, result: dict) -> dict:
        message = {"role": "assistant", "content": result["text"], "refusal": None}
        choice = {
            "index": 0,
            "message": message,
            "logprobs": None,
            "finish_reason": result["finish_reason"],
        }
        return {**self._envelope("chat.completion"), "choices": [choice], "usage": result["usage"]}

    def kept(self, whole: dict) -> None:
        """Store the finished answer if its request asked to (``store: true``). An answer
        already given is not failed for its storage: a failure is logged."""
        if self.keep is None:
            return
        try:
            with transaction.atomic():
                self.keep.keep(self.target, whole)
        except Exception:
            log.exception("storing chat completion %s failed", self.id)

    def chunks(self, events: Generator[dict], include_usage: bool) -> Iterator[str]:
        """The server-sent events of a stream. When the client goes away, the web server closes
        this generator at its next write: the worker is told to stop generating."""
        finished = False

        def chunk(delta: dict | None, finish_reason: str | None = None, **extra) -> str:
            choices = (
                []
                if delta is None
                else [
                    {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
                ]
            )
            body = {**self._envelope("chat.completion.chunk"), "choices": choices, **extra}
            if include_usage and "usage" not in body:
                body["usage"] = None
            return f"data: {json.dumps(body)}\n\n"

        pieces = []
        try:
            yield chunk({"role": "assistant", "content": ""})
            for event in events:
                if event["type"] == "delta":
                    pieces.append(event["text"])
                    yield chunk({"content": event["text"]})
                elif event["type"] == "done":
                    finished = True
                    yield chunk({}, event["finish_reason"])
                    if include_usage:
                        yield chunk(None, usage=event["usage"])
                    self.kept(self.whole({**event, "text": "".join(pieces)}))
                else:
                    finished = True
                    error = {
                        "message": event["message"],
                        "type": "server_error",
                        "param": None,
                        "code": event.get("code"),
                    }
                    yield f"data: {json.dumps({'error': error})}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            if not finished and self.request_id:
                playground.request_cancel(self.request_id)
            events.close()  # gives the organization's place back
