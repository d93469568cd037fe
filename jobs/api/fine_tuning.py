"""``/v1/fine_tuning/jobs`` (OpenAI's), ``/v1/adapters`` and ``/v1/usage`` (Loft's)."""

from __future__ import annotations

import hashlib
import json
import zipfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import datetime

from django.http import StreamingHttpResponse
from drf_spectacular.utils import OpenApiParameter, extend_schema, inline_serializer
from rest_framework import mixins, serializers, status
from rest_framework.decorators import action
from rest_framework.response import Response
from rest_framework.views import APIView

from engine.hyperparameters import SUPERVISED, ConfigError, TrainConfig, method_fits_file, public
from jobs import lineage, preflight
from jobs.api.serializers import (
    CHECKPOINT_ID_PREFIX,
    COMPUTED_COLUMNS,
    EVENT_ID_PREFIX,
    JOB_COLUMNS,
    AdapterSerializer,
    CheckpointSerializer,
    EventSerializer,
    JobCreateRequestSerializer,
    JobCreateSerializer,
    JobSerializer,
)
from jobs.models import (
    Adapter,
    BaseModel,
    Checkpoint,
    File,
    FineTuneJob,
    IdempotencyKeyReused,
    QuotaExceeded,
    month_start,
)
from jobs.models.adapters import AdapterInUse
from jobs.usage import usage_of
from loft import storage
from loft.api.base import AfterLimitPagination, TenantScopedViewSet
from loft.api.errors import LoftAPIError
from loft.tenancy import current_org

IDEMPOTENCY_HEADER = "Idempotency-Key"


def quota_error(error: QuotaExceeded) -> LoftAPIError:
    return LoftAPIError(
        str(error),
        status_code=status.HTTP_429_TOO_MANY_REQUESTS,
        type="insufficient_quota",
        param=error.quota,
        code="quota_exceeded",
    )


class NumberedCursorPagination(AfterLimitPagination):
    """Events and checkpoints: newest first, ids like ``ftevent-42`` (the row's number)."""

    prefix = ""

    def paginate_queryset(self, queryset, request, view=None):
        limit = self._limit(request)
        queryset = queryset.order_by("-pk")
        after = request.query_params.get("after")
        if after:
            number = after.removeprefix(self.prefix)
            if not (number.isascii() and number.isdigit() and len(number) < 19):
                raise LoftAPIError(f"No such object to page after: {after}", param="after")
            queryset = queryset.filter(pk__lt=int(number))
        rows = list(queryset[: limit + 1])
        self.has_more = len(rows) > limit
        return rows[:limit]


class EventPagination(NumberedCursorPagination):
    prefix = EVENT_ID_PREFIX


class CheckpointPagination(NumberedCursorPagination):
    prefix = CHECKPOINT_ID_PREFIX


def job_rows(jobs):
    """``jobs`` (a queryset) as rows of what their objects show: JobSerializer's input."""
    return jobs.values(*JOB_COLUMNS, **COMPUTED_COLUMNS)


class FineTuningJobViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, TenantScopedViewSet):
    # Job objects are read as rows (job_rows); the other actions take model instances.
    queryset = FineTuneJob.objects.all()
    serializer_class = JobSerializer
    object_name = "fine-tuning job"

    @extend_schema(
        request=JobCreateRequestSerializer,
        responses={200: JobSerializer},
        parameters=[OpenApiParameter(IDEMPOTENCY_HEADER, str, OpenApiParameter.HEADER)],
        description="Create a job; with dry_run, return the pre-flight plan and create nothing.",
    )
    def create(self, request):
        body = JobCreateSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        values = body.validated_data
        prepared = prepare_job(self.org, values)
        if values.get("dry_run"):
            return Response(dry_run(prepared))
        key = request.headers.get(IDEMPOTENCY_HEADER, "")
        if len(key) > 255:
            raise LoftAPIError(
                "The Idempotency-Key header is longer than 255 characters.", param=None
            )
        fingerprint = ""
        if key:
            canonical = json.dumps(request.data, sort_keys=True, default=str).encode()
            fingerprint = hashlib.sha256(canonical).hexdigest()
        job = submit_job(self.org, prepared, values, idempotency_key=key, fingerprint=fingerprint)
        response = Response(self.job_object(job.pk))
        if job.replayed:
            response["Idempotent-Replayed"] = "true"
        return response

    @extend_schema(request=None, responses={200: JobSerializer})
    @action(detail=True, methods=["post"])
    def cancel(self, request, pk=None):
        job = self.get_object()
        if job.status in FineTuneJob.FINISHED:
            raise LoftAPIError(
                f"The job {job.id} has already {job.status}; there is nothing to cancel.",
                param="id",
                code="job_finished",
            )
        job.request_cancel()
        return Response(self.job_object(job.pk))

    @extend_schema(request=None, responses={200: JobSerializer})
    @action(detail=True, methods=["post"])
    def pause(self, request, pk=None):
        """OpenAI's jobs.pause: a running job stops at its next step after a checkpoint, a
        queued one at once; it waits, paused, for ``resume``."""
        job = self.get_object()
        if not job.request_pause():
            raise LoftAPIError(
                f"The job {job.id} is {job.status}; only a queued or running job can pause.",
                param="id",
                code="job_not_running",
            )
        return Response(self.job_object(job.pk))

    @extend_schema(request=None, responses={200: JobSerializer})
    @action(detail=True, methods=["post"])
    def resume(self, request, pk=None):
        """OpenAI's jobs.resume: a paused job is queued again and goes on from its last
        checkpoint."""
        job = self.get_object()
        if not job.request_resume():
            raise LoftAPIError(
                f"The job {job.id} is {job.status}, not paused; there is nothing to resume.",
                param="id",
                code="job_not_paused",
            )
        return Response(self.job_object(job.pk))

    def list(self, request):
        page = self.paginate_queryset(job_rows(self.get_queryset()))
        return self.get_paginated_response(JobSerializer(page, many=True).data)

    def retrieve(self, request, pk=None):
        row = self.get_object(job_rows(self.get_queryset()))
        return Response(JobSerializer(row).data)

    def job_object(self, pk: str) -> dict:
        """The job object of one of the caller's jobs, as the list and retrieve show it."""
        row = job_rows(self.get_queryset().filter(pk=pk)).get()
        return JobSerializer(row).data

    @extend_schema(responses={200: EventSerializer(many=True)})
    @action(detail=True, methods=["get"], pagination_class=EventPagination)
    def events(self, request, pk=None):
        job = self.get_object()
        page = self.paginate_queryset(job.events.all())
        return self.get_paginated_response(EventSerializer(page, many=True).data)

    @extend_schema(responses={200: CheckpointSerializer(many=True)})
    @action(detail=True, methods=["get"], pagination_class=CheckpointPagination)
    def checkpoints(self, request, pk=None):
        job = self.get_object()
        page = self.paginate_queryset(job.checkpoints.select_related("job__org", "job__base_model"))
        return self.get_paginated_response(CheckpointSerializer(page, many=True).data)


# --- creating a job: shared by the API and the browser wizard (jobs/wizard.py) -------------


@dataclass
class PreparedJob:
    """A create request checked and resolved: what ``submit_job`` or ``dry_run`` needs."""

    base_model: BaseModel
    parent: Adapter | None
    training_file: File
    validation_file: File | None
    requested: dict
    resolved: dict
    config: TrainConfig
    seed: int


def prepare_job(org, values: dict) -> PreparedJob:
    """Check a create body (JobCreateSerializer's validated data) against the tenant's files
    and adapters and resolve "auto"; raises LoftAPIError whose ``param`` names the field."""
    base_model, parent = _base_model_and_parent(org, values)
    training_file = _file(org, values["training_file"], "training_file")
    validation_file = (
        _file(org, values["validation_file"], "validation_file")
        if values.get("validation_file")
        else None
    )
    requested = dict(values["hyperparameters"])
    requested.pop("parent_adapter", None)
    method_type = values.get("method_type", SUPERVISED)
    for param, file in (("training_file", training_file), ("validation_file", validation_file)):
        unfit = file and method_fits_file(method_type, file.format)
        if unfit:
            raise LoftAPIError(unfit, param=param, code="invalid_file")
    try:
        resolved = preflight.resolve_hyperparameters(
            requested, training_file, validation_file, base_model, parent, method_type
        )
        seed = values.get("seed")
        seed = 42 if seed is None else seed
        config = TrainConfig(**{**resolved, "seed": seed})
    except ConfigError as error:
        raise LoftAPIError(
            str(error), param="hyperparameters", code="invalid_hyperparameters"
        ) from None
    return PreparedJob(
        base_model, parent, training_file, validation_file, requested, resolved, config, seed
    )


def submit_job(
    org, prepared: PreparedJob, values: dict, idempotency_key: str = "", fingerprint: str = ""
) -> FineTuneJob:
    try:
        return FineTuneJob.submit(
            org=org,
            training_file=prepared.training_file,
            validation_file=prepared.validation_file,
            base_model=prepared.base_model,
            hyperparameters=prepared.resolved,
            requested_hyperparameters=prepared.requested,
            seed=prepared.seed,
            suffix=values.get("suffix") or "",
            parent_adapter=prepared.parent,
            metadata=values.get("metadata") or {},
            idempotency_key=idempotency_key,
            fingerprint=fingerprint,
        )
    except preflight.JobTooLarge as error:
        raise _too_large(error.plan) from None
    except ConfigError as error:  # a class named that a worker stopped declaring meanwhile
        raise LoftAPIError(
            str(error), param="hyperparameters", code="invalid_hyperparameters"
        ) from None
    except File.DoesNotExist:
        raise LoftAPIError(
            f"No such File object: {values['training_file']}",
            param="training_file",
            code="invalid_file",
        ) from None
    except QuotaExceeded as error:
        raise quota_error(error) from None
    except IdempotencyKeyReused as error:
        raise LoftAPIError(
            str(error), status_code=409, param=None, code="idempotency_key_reused"
        ) from None


def dry_run(prepared: PreparedJob) -> dict:
    """The pre-flight plan of a prepared job, or LoftAPIError when it cannot be planned or
    would not fit."""
    training_file = prepared.training_file
    if training_file.status != File.Status.PROCESSED:
        raise LoftAPIError(
            f"The file {training_file.id} is still being validated; "
            "a plan needs its measurements. Try again shortly.",
            param="training_file",
            code="file_not_ready",
        )
    plan = preflight.plan(
        prepared.config,
        prepared.base_model,
        training_file,
        prepared.validation_file,
        prepared.parent,
    )
    if not plan.fits:
        raise _too_large(plan)
    return {
        **plan.as_dict(),
        "model": prepared.base_model.name,
        "hyperparameters": public(asdict(prepared.config)),
    }


def _base_model_and_parent(org, values) -> tuple[BaseModel, Adapter | None]:
    """``model`` names a base model, or one of the tenant's fine-tuned models to continue
    from (OpenAI's way); ``hyperparameters.parent_adapter`` is Loft's way to say the same."""
    name = values["model"]
    parent_ref = values["hyperparameters"].get("parent_adapter")
    parent = None
    if name.startswith("ft:") or parent_ref:
        ref = parent_ref or name
        parent = (
            Adapter.objects.for_org(org).filter(pk=ref).first()
            or Adapter.objects.for_org(org).filter(name=ref).first()
            or _checkpoint_as_adapter(org, ref)
        )
        if parent is None:
            param = "hyperparameters.parent_adapter" if parent_ref else "model"
            raise LoftAPIError(
                f"The adapter '{ref}' does not exist.", param=param, code="model_not_found"
            )
        if not name.startswith("ft:") and name != parent.base_model.name:
            raise LoftAPIError(
                f"The parent adapter was trained on {parent.base_model.name}, not {name}.",
                param="model",
            )
        return parent.base_model, parent
    base_model = BaseModel.objects.enabled().filter(name=name).first()
    if base_model is None:
        raise LoftAPIError(
            f"The model '{name}' does not exist or cannot be fine-tuned; "
            "GET /v1/models lists the ones that can.",
            param="model",
            code="model_not_found",
        )
    return base_model, None


def _checkpoint_as_adapter(org, name: str) -> Adapter | None:
    """A checkpoint named as a model (``ft:…:ckpt-step-N``, OpenAI's
    fine_tuned_model_checkpoint): the job continues from its weights, made into an adapter
    of their own the first time (object storage failing is a 503, as everywhere)."""
    checkpoint = Checkpoint.named(org, name)
    return checkpoint.as_adapter() if checkpoint is not None else None


def _file(org, file_id: str, param: str) -> File:
    """Another tenant's file reads exactly like a missing one."""
    file = File.objects.for_org(org).filter(pk=file_id).first()
    if file is None:
        raise LoftAPIError(f"No such File object: {file_id}", param=param, code="invalid_file")
    if file.status == File.Status.ERROR:
        raise LoftAPIError(
            f"The file {file_id} failed validation: {file.status_details}",
            param=param,
            code="invalid_file",
        )
    if file.purpose == File.Purpose.RESULTS:
        raise LoftAPIError(
            f"The file {file_id} holds a job's results, not training rows.",
            param=param,
            code="invalid_file",
        )
    if param == "training_file" and file.purpose != File.Purpose.FINE_TUNE:
        raise LoftAPIError(
            f"The file {file_id} was uploaded with purpose '{file.purpose}'; "
            "a training file needs purpose 'fine-tune'.",
            param=param,
            code="invalid_file",
        )
    return file


def _too_large(plan) -> LoftAPIError:
    return LoftAPIError(
        preflight.too_large_message(plan),
        param="hyperparameters",
        code="job_too_large",
        details={"plan": plan.as_dict()},
    )


def delete_adapter(adapter: Adapter) -> None:
    """Delete an adapter and its files, or the API's 409 with the sentence saying why not."""
    try:
        adapter.delete_with_content()
    except AdapterInUse as error:
        raise LoftAPIError(
            str(error), status_code=status.HTTP_409_CONFLICT, param="id", code="adapter_in_use"
        ) from None


class AdapterViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, TenantScopedViewSet):
    """The tenant's trained adapters; ``download`` streams a zip of the PEFT folder; delete
    removes it and its files (refused while an alias points at it)."""

    queryset = Adapter.objects.select_related("base_model")
    serializer_class = AdapterSerializer
    object_name = "adapter"

    @extend_schema(
        responses=inline_serializer(
            "AdapterDeleted",
            {
                "id": serializers.CharField(),
                "object": serializers.CharField(),
                "deleted": serializers.BooleanField(),
            },
        )
    )
    def destroy(self, request, pk=None):
        adapter = self.get_object()
        delete_adapter(adapter)
        return Response({"id": pk, "object": "adapter", "deleted": True})

    @extend_schema(responses={200: serializers.DictField()})
    @action(detail=True, methods=["get"])
    def lineage(self, request, pk=None):
        """The versions the adapter was trained along, oldest first, each with its data, its
        scores on every task of the chain and the alias moves to it (jobs/lineage.py)."""
        return Response(lineage.lineage(self.get_object()))

    @extend_schema(
        responses={(200, "application/zip"): bytes},
        description="A zip of the adapter folder: safetensors weights, config, tokenizer, "
        "model card and manifest.json.",
    )
    @action(detail=True, methods=["get"])
    def download(self, request, pk=None):
        adapter = self.get_object()
        filename = adapter.name.replace(":", "_").replace("/", "_") + ".zip"
        response = StreamingHttpResponse(zip_stream(adapter), content_type="application/zip")
        response["Content-Disposition"] = f'attachment; filename="{filename}"'
        return response


class _ZipSink:
    """A write-only file for zipfile that hands out what was written so far."""

    def __init__(self):
        self.chunks: list[bytes] = []
        self.position = 0

    def write(self, data) -> int:
        self.chunks.append(bytes(data))
        self.position += len(data)
        return len(data)

    def tell(self) -> int:
        return self.position

    def flush(self) -> None:
        pass

    def take(self) -> bytes:
        out, self.chunks = b"".join(self.chunks), []
        return out


def zip_stream(adapter: Adapter) -> Iterator[bytes]:
    """The adapter's PEFT folder and its manifest as a zip (see zip_folder)."""
    return zip_folder(adapter.s3_prefix, adapter.manifest, adapter.created_at)


def zip_folder(prefix: str, manifest: dict, date: datetime) -> Iterator[bytes]:
    """An artifact's files from S3 and its manifest.json as a zip, piece by piece: nothing whole
    in memory or on disk. Entries are stored, not deflated: safetensors weights do not
    compress."""
    sink = _ZipSink()
    names = sorted(manifest.get("files", {})) + ["manifest.json"]
    with zipfile.ZipFile(sink, mode="w", compression=zipfile.ZIP_STORED) as archive:
        for name in names:
            info = zipfile.ZipInfo(name, date_time=date.timetuple()[:6])
            with archive.open(info, mode="w", force_zip64=True) as entry:
                for chunk in storage.iter_object(prefix + name):
                    entry.write(chunk)
                    yield sink.take()
            yield sink.take()
    yield sink.take()


class UsageView(APIView):
    """``GET /v1/usage``: trained tokens and compute seconds per month and per job, inference
    requests and their prompt and completion tokens per month and per model, storage in use,
    and the organization's limits. ``?month=YYYY-MM`` picks the month of the job list and of
    the model list."""

    @extend_schema(
        parameters=[OpenApiParameter("month", str, description="YYYY-MM; this month if absent")],
        responses={
            200: inline_serializer(
                "Usage",
                {
                    "object": serializers.CharField(),
                    "month": serializers.CharField(),
                    "totals": serializers.DictField(),
                    "limits": serializers.DictField(),
                    "months": serializers.ListField(child=serializers.DictField()),
                    "jobs": serializers.ListField(child=serializers.DictField()),
                    "inference": serializers.ListField(child=serializers.DictField()),
                },
            )
        },
    )
    def get(self, request):
        start = self._month(request.query_params.get("month"))
        return Response(usage_of(current_org(request), start).as_json())

    def _month(self, raw: str | None) -> datetime:
        if not raw:
            return month_start()
        try:
            parsed = datetime.strptime(raw, "%Y-%m")
            if not 2000 <= parsed.year <= 9000:
                raise ValueError(raw)
        except ValueError:
            raise LoftAPIError("month must look like 2026-11.", param="month") from None
        return month_start().replace(year=parsed.year, month=parsed.month)
