import json
import time

from django.conf import settings
from django.db import connection, transaction
from django.db.models import F
from django.http import HttpResponse, StreamingHttpResponse
from django.template.defaultfilters import filesizeformat
from drf_spectacular.utils import extend_schema, inline_serializer
from rest_framework import mixins, serializers, status
from rest_framework.authentication import get_authorization_header
from rest_framework.decorators import action
from rest_framework.parsers import JSONParser, MultiPartParser
from rest_framework.response import Response
from rest_framework.views import APIView

from engine.data import DatasetError, OutOfTime
from jobs import tasks, traffic
from jobs.api.fine_tuning import delete_adapter, quota_error
from jobs.api.serializers import (
    FileListSerializer,
    FileSerializer,
    FileUploadSerializer,
    FineTunedModelSerializer,
    ModelSerializer,
    StrictSerializer,
)
from jobs.datasets import check_object_head, rejection_details, validate_object
from jobs.models import (
    Adapter,
    Alias,
    BaseModel,
    File,
    FileInUse,
    Quota,
    QuotaExceeded,
    new_file_id,
)
from jobs.uploads import S3StreamingUploadHandler, StoredUpload
from loft import storage
from loft.api.base import TenantScopedViewSet, UnixTimeField, is_id_like
from loft.api.errors import LoftAPIError
from loft.models import Organization
from loft.tenancy import current_org

# The multipart envelope around the file (boundaries, headers, the purpose field).
MULTIPART_OVERHEAD_BYTES = 64 * 1024


class ModelListView(APIView):
    """``GET /v1/models``: the enabled base models of the catalogue, the organization's aliases
    (by name), then its fine-tuned models (its adapters), newest first."""

    @extend_schema(
        operation_id="models_list",
        responses=inline_serializer(
            "ModelList",
            {"object": serializers.CharField(), "data": ModelSerializer(many=True)},
        ),
    )
    def get(self, request):
        org = current_org(request)
        base_models = ModelSerializer(BaseModel.objects.enabled(), many=True).data
        aliases = [alias_model(alias) for alias in aliases_of(org)]
        fine_tuned = fine_tuned_models_json(Adapter.objects.for_org(org))
        members = [json.dumps(base_models)[1:-1], json.dumps(aliases)[1:-1], fine_tuned[1:-1]]
        body = '{"object": "list", "data": [' + ", ".join(m for m in members if m) + "]}"
        return HttpResponse(body, content_type="application/json")


FINE_TUNED_MODELS_SQL = (
    "SELECT coalesce(json_agg(json_build_object('id', model_id, 'object', 'model',"
    " 'created', floor(extract(epoch FROM created))::bigint, 'owned_by', owned_by,"
    " 'root', root, 'adapter', adapter) ORDER BY created DESC, adapter DESC), '[]')::text"
    " FROM ({rows}) AS fine_tuned"
)


def fine_tuned_models_json(adapters) -> str:
    """The adapters as OpenAI lists models (FineTunedModelSerializer's members), newest first:
    the text of a JSON array that PostgreSQL builds. OpenAI's models list has no pagination, so a
    tenant with thousands of adapters gets them all; built in Python they cost the web ~30 µs
    each (bench/api_load.py), built by the database next to nothing."""
    rows = adapters.order_by().values(
        model_id=F("name"),
        created=F("created_at"),
        owned_by=F("org__slug"),
        root=F("base_model__name"),
        adapter=F("id"),
    )
    query, params = rows.query.sql_with_params()
    with connection.cursor() as cursor:
        # What goes into the text is the ORM's own SQL; every value in it is a parameter.
        cursor.execute(FINE_TUNED_MODELS_SQL.format(rows=query), params)  # noqa: S608
        return cursor.fetchone()[0]


def aliases_of(org):
    return Alias.objects.for_org(org).select_related("org", "adapter__base_model").order_by("name")


def alias_model(alias: Alias) -> dict:
    """An alias as OpenAI lists a model: its name is the id requests use."""
    return {
        "id": alias.name,
        "object": "model",
        "created": int(alias.created_at.timestamp()),
        "owned_by": alias.org.slug,
        "root": alias.adapter.base_model.name,
        "adapter": alias.adapter_id,
        "alias": True,
    }


class ModelDetailView(APIView):
    """``GET /v1/models/{model}`` (a base model, an alias or a fine-tuned model) and
    ``DELETE /v1/models/{model}`` (a fine-tuned model: its adapter and its files, OpenAI's
    call); model ids contain a slash, so the route takes a path."""

    @extend_schema(operation_id="models_retrieve", responses=ModelSerializer)
    def get(self, request, model: str):
        if not is_id_like(model, max_length=300):
            model = ""  # found by no query
        found = BaseModel.objects.enabled().filter(name=model).first()
        if found is not None:
            return Response(ModelSerializer(found).data)
        org = current_org(request)
        alias = aliases_of(org).filter(name=model).first()
        if alias is not None:
            return Response(alias_model(alias))
        adapter = self._adapter(org, model)
        return Response(FineTunedModelSerializer(adapter).data)

    @extend_schema(
        operation_id="models_delete",
        responses=inline_serializer(
            "ModelDeleted",
            {
                "id": serializers.CharField(),
                "object": serializers.CharField(),
                "deleted": serializers.BooleanField(),
            },
        ),
    )
    def delete(self, request, model: str):
        if not is_id_like(model, max_length=300):
            model = ""
        org = current_org(request)
        if BaseModel.objects.filter(name=model).exists():
            raise LoftAPIError(
                f"The model '{model}' is a base model of the catalogue; only fine-tuned models "
                "can be deleted.",
                status_code=status.HTTP_403_FORBIDDEN,
                param="model",
                code="model_not_deletable",
            )
        if aliases_of(org).filter(name=model).exists():
            raise LoftAPIError(
                f"'{model}' is an alias, not a model; DELETE /v1/aliases/{model} removes it.",
                param="model",
                code="model_not_deletable",
            )
        adapter = self._adapter(org, model)
        delete_adapter(adapter)
        return Response({"id": model, "object": "model", "deleted": True})

    @staticmethod
    def _adapter(org, model: str) -> Adapter:
        adapter = (
            Adapter.objects.for_org(org).select_related("org", "base_model").filter(name=model)
        ).first()
        if adapter is None:
            raise LoftAPIError(
                f"The model '{model}' does not exist",
                status_code=404,
                param="model",
                code="model_not_found",
            )
        return adapter


class TrafficFileSerializer(StrictSerializer):
    alias = serializers.CharField(required=False, max_length=64)
    model = serializers.CharField(required=False, max_length=300)
    created_after = UnixTimeField(required=False)
    created_before = UnixTimeField(required=False)
    select = serializers.ListField(
        child=serializers.ChoiceField(choices=traffic.SELECTIONS), required=False, min_length=1
    )


class FileViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, TenantScopedViewSet):
    """``/v1/files``: upload (streamed to S3 and validated), list, retrieve, delete, content."""

    queryset = File.objects.all()
    serializer_class = FileSerializer
    object_name = "File object"
    parser_classes = [MultiPartParser]

    def initial(self, request, *args, **kwargs):
        # The streaming handler must be in place before anything reads the body. For a signed-in
        # browser, that happens during authentication (the CSRF check reads the form), so it is
        # installed before authentication and learns the organization when the file begins.
        if self.action != "create":
            return super().initial(request, *args, **kwargs)
        self.upload_handler = self._streaming_handler(request)
        request._request.upload_handlers = [self.upload_handler]
        try:
            super().initial(request, *args, **kwargs)
        except BaseException:
            # E.g. a browser whose CSRF token was wrong: the check read (and stored) the file.
            self.upload_handler.discard()
            raise

    def get_queryset(self):
        queryset = super().get_queryset()
        if self.action == "list":
            queryset = queryset.defer("report")
        purpose = self.request.query_params.get("purpose")
        return queryset.filter(purpose=purpose) if purpose else queryset

    def get_serializer_class(self):
        return FileListSerializer if self.action == "list" else FileSerializer

    def create(self, request):
        handler = self.upload_handler
        self._refuse_oversized_body(request)
        try:
            upload = request.FILES.get("file")
            if handler.too_large:
                raise self._too_large()
            if upload is None:
                raise LoftAPIError(
                    "Attach the dataset as the multipart field 'file'.", param="file"
                )
            options = FileUploadSerializer(data=request.data)
            options.is_valid(raise_exception=True)
            file = self._store(upload, options.validated_data)
        except BaseException:
            handler.discard()
            raise
        return Response(self.get_serializer(file).data, status=status.HTTP_200_OK)

    def destroy(self, request, pk=None):
        file = self.get_object()
        try:
            file.delete_with_content()
        except FileInUse as error:
            raise LoftAPIError(
                str(error), status_code=409, param="id", code="file_in_use"
            ) from None
        return Response({"id": pk, "object": "file", "deleted": True})

    @extend_schema(request=TrafficFileSerializer, responses={200: FileSerializer})
    @action(
        detail=False, methods=["post"], url_path="from_completions", parser_classes=[JSONParser]
    )
    def from_completions(self, request):
        """A training file made of an alias's (or a model's) stored completions rated up or
        corrected (jobs/traffic.py): created at once, built and validated by a worker."""
        body = TrafficFileSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        values = body.validated_data
        try:
            file = traffic.request_training_file(
                self.org,
                alias=values.get("alias"),
                model=values.get("model"),
                created_after=values.get("created_after"),
                created_before=values.get("created_before"),
                select=tuple(values.get("select") or traffic.SELECTIONS),
            )
        except traffic.TrafficError as error:
            raise LoftAPIError(str(error), param=error.param, code="invalid_selection") from None
        return Response(FileSerializer(file).data, status=status.HTTP_200_OK)

    @action(detail=True, methods=["get"])
    def content(self, request, pk=None):
        file = self.get_object()
        if file.status == File.Status.ERROR:
            raise LoftAPIError(
                f"The file {file.id} was rejected and its content deleted: {file.status_details}",
                status_code=404,
                param="id",
            )
        response = StreamingHttpResponse(
            storage.iter_object(file.s3_key), content_type="application/octet-stream"
        )
        response["Content-Length"] = str(file.bytes)
        response["Content-Disposition"] = f'attachment; filename="{file.filename}"'
        return response

    # --- helpers ----------------------------------------------------------------------------

    def _streaming_handler(self, request) -> S3StreamingUploadHandler:
        bearer = get_authorization_header(request).lower().startswith(b"bearer ")
        self.new_file_id = new_file_id()

        def key_for(file_name: str) -> str | None:
            org = self.org if bearer else current_org(request._request)
            return File.object_key(org.id, self.new_file_id) if org else None

        return S3StreamingUploadHandler(
            key_for, max_bytes=settings.LOFT_MAX_UPLOAD_BYTES, request=request._request
        )

    def _too_large(self) -> LoftAPIError:
        limit = filesizeformat(settings.LOFT_MAX_UPLOAD_BYTES).replace("\xa0", " ")
        return LoftAPIError(
            f"The file is larger than the upload limit of {limit}. "
            "Split it, or ask an operator to raise the limit.",
            status_code=status.HTTP_413_REQUEST_ENTITY_TOO_LARGE,
            param="file",
            code="file_too_large",
        )

    def _refuse_oversized_body(self, request) -> None:
        """Refuse at once when the declared body is larger than the limit, before reading it."""
        try:
            declared = int(request.META.get("CONTENT_LENGTH") or 0)
        except ValueError:
            declared = 0
        if declared > settings.LOFT_MAX_UPLOAD_BYTES + MULTIPART_OVERHEAD_BYTES:
            raise self._too_large()

    def _store(self, upload: StoredUpload, options: dict) -> File:
        """Validate inline when small and quick, else record it and validate in the background."""
        base_model = options["model"] if "model" in options else BaseModel.default()
        requested_format = options.get("format") or ""
        fields = dict(
            id=self.new_file_id,
            org=self.org,
            filename=upload.name,
            purpose=options["purpose"],
            bytes=upload.size,
            sha256=upload.sha256,
            s3_key=upload.key,
            requested_format=requested_format,
            base_model=base_model,
        )
        report = None  # None: the full pass is a worker's
        try:
            if upload.size > settings.LOFT_INLINE_VALIDATION_MAX_BYTES:
                # Large: a quick parse of its head now, the full pass in a worker.
                check_object_head(upload.key, upload.name, requested_format)
            else:
                deadline = time.monotonic() + settings.LOFT_INLINE_VALIDATION_SECONDS
                report = validate_object(
                    upload.key, upload.name, requested_format, base_model, deadline=deadline
                )
        except OutOfTime:
            pass  # slow to tokenize: handed to a worker as a large file is
        except DatasetError as error:
            raise LoftAPIError(
                error.message, param="file", code=error.code, details=rejection_details(error)
            ) from error
        with transaction.atomic():
            self._check_storage_quota(upload.size)
            file = File(**fields)
            if report is None:
                file.save()
                tasks.validate_file(file.id)
            else:
                file.mark_processed(report)
        return file

    def _check_storage_quota(self, size: int) -> None:
        """Under a lock on the organization's row (until the caller's transaction ends), so
        that parallel uploads cannot pass the limit together."""
        Organization.objects.select_for_update().filter(pk=self.org.pk).first()
        try:
            Quota.for_org(self.org).check_new_bytes(size)
        except QuotaExceeded as error:
            raise quota_error(error) from None
