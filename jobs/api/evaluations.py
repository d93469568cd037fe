"""``/v1/evaluations``: custom evaluations, the base and chosen adapters scored on one file.

Loft's own: OpenAI's fine-tuning API has none. Shapes follow OpenAI's habits (``object``, unix
``created_at``, list envelopes).
"""

from __future__ import annotations

from django.conf import settings
from drf_spectacular.utils import extend_schema
from rest_framework import mixins, serializers, status
from rest_framework.response import Response

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
    retention = serializers.SerializerMethodField()

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
            "retention",
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

    def get_retention(self, evaluation) -> list[dict]:
        """A continual job's: on each ancestor's held-out rows, the child's and the parent's
        scores."""
        return evaluation.retention()


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
        if file.unusable_reason:
            raise LoftAPIError(file.unusable_reason, param="file", code="invalid_file")
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
