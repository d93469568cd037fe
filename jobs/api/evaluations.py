"""``/v1/evaluations`` (custom evaluations) and ``/v1/adapters/{id}/generate`` (playground).

Both are Loft's own: OpenAI's fine-tuning API has neither. Shapes follow OpenAI's habits
(``object``, unix ``created_at``, list envelopes); a generate answer is a ``chat.completion``
and its stream ``chat.completion.chunk`` server-sent events, so a chat client reads it.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator

from django.conf import settings
from django.http import StreamingHttpResponse
from drf_spectacular.utils import extend_schema
from rest_framework import exceptions, mixins, serializers, status
from rest_framework.response import Response

from jobs import inference, playground
from jobs.api.serializers import StrictSerializer
from jobs.models import Adapter, BaseModel, Evaluation, File, QuotaExceeded
from loft.api.base import ObjectTypeField, TenantScopedViewSet, UnixTimestampField
from loft.api.errors import LoftAPIError

MAX_MODELS = 10


class EvaluationCreateSerializer(StrictSerializer):
    file = serializers.CharField(help_text="An eval file (purpose 'eval'), chat rows with answers")
    models = serializers.ListField(
        child=serializers.CharField(max_length=300),
        min_length=1,
        max_length=MAX_MODELS,
        help_text="Adapter ids or ft: model names of one base model; the base is always scored.",
    )
    max_generations = serializers.IntegerField(required=False, min_value=0, max_value=1000)
    max_new_tokens = serializers.IntegerField(required=False, min_value=1, max_value=1024)


class EvaluationSerializer(serializers.ModelSerializer):
    object = ObjectTypeField("evaluation")
    base_model = serializers.CharField(source="base_model.name")
    created_at = UnixTimestampField()
    finished_at = UnixTimestampField()
    models = serializers.SerializerMethodField()
    samples = serializers.SerializerMethodField()
    forgetting = serializers.SerializerMethodField()

    class Meta:
        model = Evaluation
        fields = [
            "id",
            "object",
            "kind",
            "status",
            "file",
            "job",
            "adapter",
            "base_model",
            "models",
            "verdict",
            "forgetting",
            "samples",
            "options",
            "error",
            "created_at",
            "finished_at",
        ]
        read_only_fields = fields

    def get_models(self, evaluation) -> list[dict]:
        """Per model: ``model``, ``adapter`` (null for the base) and its scores."""
        return evaluation.scores_by_model()

    def get_samples(self, evaluation) -> list[dict]:
        return evaluation.results.get("samples", [])

    def get_forgetting(self, evaluation) -> dict | None:
        return evaluation.results.get("forgetting")


class EvaluationViewSet(
    mixins.CreateModelMixin,
    mixins.ListModelMixin,
    mixins.RetrieveModelMixin,
    TenantScopedViewSet,
):
    """Evaluations: the end-of-job ones (kind ``job``) and custom ones (kind ``custom``)."""

    queryset = Evaluation.objects.select_related("base_model")
    serializer_class = EvaluationSerializer
    object_name = "evaluation"

    @extend_schema(request=EvaluationCreateSerializer, responses={200: EvaluationSerializer})
    def create(self, request, *args, **kwargs):
        body = EvaluationCreateSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        values = body.validated_data
        file = self._eval_file(values["file"])
        base_model, adapters = self._models(values["models"])
        try:
            evaluation = Evaluation.submit(
                org=self.org,
                file=file,
                base_model=base_model,
                adapters=adapters,
                options={
                    "max_generations": values.get(
                        "max_generations", settings.LOFT_EVAL_MAX_GENERATIONS
                    ),
                    "max_new_tokens": values.get(
                        "max_new_tokens", settings.LOFT_EVAL_MAX_NEW_TOKENS
                    ),
                },
            )
        except QuotaExceeded as error:
            from jobs.api.fine_tuning import quota_error  # that module imports this one

            raise quota_error(error) from None
        return Response(self.get_serializer(evaluation).data, status=status.HTTP_200_OK)

    def _eval_file(self, file_id: str) -> File:
        file = File.objects.for_org(self.org).filter(pk=file_id).first()
        if file is None:
            raise LoftAPIError(f"No such File object: {file_id}", param="file", code="invalid_file")
        if file.purpose != File.Purpose.EVAL:
            raise LoftAPIError(
                f"The file {file_id} was uploaded with purpose '{file.purpose}'; "
                "an evaluation set needs purpose 'eval'.",
                param="file",
                code="invalid_file",
            )
        if file.status != File.Status.PROCESSED:
            reason = (
                f"failed validation: {file.status_details}"
                if file.status == File.Status.ERROR
                else "is still being validated; try again shortly"
            )
            raise LoftAPIError(f"The file {file_id} {reason}.", param="file", code="invalid_file")
        return file

    def _models(self, names: list[str]) -> tuple[BaseModel, list[Adapter]]:
        """The adapters named (by id or ft: name) and their one base model; a base model's
        own name may be listed too. Another tenant's adapter reads like a missing one."""
        adapters: list[Adapter] = []
        bases: set[int] = set()
        for name in dict.fromkeys(names):
            base = BaseModel.objects.enabled().filter(name=name).first()
            if base is not None:
                bases.add(base.pk)
                continue
            owned = Adapter.objects.for_org(self.org).select_related("base_model")
            adapter = owned.filter(pk=name).first() or owned.filter(name=name).first()
            if adapter is None:
                raise LoftAPIError(
                    f"The model '{name}' does not exist.", param="models", code="model_not_found"
                )
            adapters.append(adapter)
            bases.add(adapter.base_model_id)
        if len(bases) > 1:
            raise LoftAPIError(
                "An evaluation compares adapters of one base model; these models have "
                f"{len(bases)} different bases.",
                param="models",
            )
        base_model = adapters[0].base_model if adapters else BaseModel.objects.get(pk=bases.pop())
        return base_model, adapters


# --- playground -----------------------------------------------------------------------------


class MessageSerializer(StrictSerializer):
    role = serializers.ChoiceField(choices=["system", "user", "assistant"])
    content = serializers.CharField(max_length=32_000, trim_whitespace=False)


class GenerateSerializer(StrictSerializer):
    messages = serializers.ListField(child=MessageSerializer(), min_length=1, max_length=100)
    max_tokens = serializers.IntegerField(required=False, default=256, min_value=1)
    temperature = serializers.FloatField(required=False, default=0.0, min_value=0, max_value=2)
    seed = serializers.IntegerField(
        required=False, allow_null=True, min_value=0, max_value=2**31 - 1
    )
    stream = serializers.BooleanField(required=False, default=False)
    with_adapter = serializers.BooleanField(
        required=False,
        default=True,
        help_text="false: answer with the adapter's base model alone (for side by side).",
    )

    def validate_max_tokens(self, value: int) -> int:
        if value > settings.LOFT_INFERENCE_MAX_TOKENS:
            raise serializers.ValidationError(
                f"max_tokens is at most {settings.LOFT_INFERENCE_MAX_TOKENS}."
            )
        return value

    def validate_messages(self, messages: list[dict]) -> list[dict]:
        if messages[-1]["role"] != "user":
            raise serializers.ValidationError("The last message must be the user's.")
        return messages


def generate_response(adapter: Adapter, request) -> Response | StreamingHttpResponse:
    body = GenerateSerializer(data=request.data)
    body.is_valid(raise_exception=True)
    values = dict(body.validated_data)
    stream = values.pop("stream")
    values["messages"] = [dict(m) for m in values["messages"]]
    try:
        inference.check_prompt_fits(adapter.base_model, values["messages"], values["max_tokens"])
    except inference.PromptTooLong as error:
        raise LoftAPIError(str(error), param="messages", code="context_length_exceeded") from None
    except inference.PromptRefused as error:
        raise LoftAPIError(str(error), param="messages", code="invalid_messages") from None
    slot = api_slot(adapter.org_id)
    model = adapter.name if values["with_adapter"] else adapter.base_model.name
    completion_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
    created = int(time.time())
    answer_by = playground.answer_deadline()
    try:
        events = playground.read_events(
            playground.start_generation(adapter, values, answer_by), answer_by
        )
    except BaseException:
        slot.release()
        raise
    if stream:
        response = StreamingHttpResponse(
            _sse(inference.holding(slot, events), completion_id, created, model),
            content_type="text/event-stream",
        )
        response["Cache-Control"] = "no-cache"
        response["X-Accel-Buffering"] = "no"  # nginx: pass each event on at once
        return response
    try:
        with slot:
            result = playground.collect(events)
    except playground.GenerationFailed as error:
        unavailable = error.code == "inference_unavailable"
        raise LoftAPIError(
            str(error),
            status_code=status.HTTP_503_SERVICE_UNAVAILABLE if unavailable else 502,
            type="server_error",
            code=error.code,
        ) from error
    return Response(
        {
            "id": completion_id,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": result["text"]},
                    "finish_reason": result["finish_reason"],
                }
            ],
            "usage": result["usage"],
        }
    )


def api_slot(org_id: str) -> inference.Slot:
    """A place among the organization's running requests, or the API's 429 / 503 answer."""
    try:
        return inference.take_slot(org_id)
    except inference.TooManyRequests as error:
        raise exceptions.Throttled(
            wait=error.retry_after, detail=str(error), code="rate_limit_exceeded"
        ) from None
    except inference.InferenceUnavailable as error:
        raise LoftAPIError(
            str(error),
            status_code=status.HTTP_503_SERVICE_UNAVAILABLE,
            type="server_error",
            code="inference_unavailable",
        ) from None


def _sse(events: Iterator[dict], completion_id: str, created: int, model: str) -> Iterator[str]:
    def chunk(delta: dict, finish_reason: str | None = None, **extra) -> str:
        body = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
            **extra,
        }
        return f"data: {json.dumps(body)}\n\n"

    yield chunk({"role": "assistant", "content": ""})
    for event in events:
        if event["type"] == "delta":
            yield chunk({"content": event["text"]})
        elif event["type"] == "done":
            yield chunk({}, event["finish_reason"], usage=event["usage"])
        else:
            error = {"message": event["message"], "type": "server_error", "code": event.get("code")}
            yield f"data: {json.dumps({'error': error})}\n\n"
    yield "data: [DONE]\n\n"
