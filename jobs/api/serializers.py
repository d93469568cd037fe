import orjson
from django.db.models import OuterRef, TextField
from django.db.models.functions import Cast
from django.utils import timezone
from rest_framework import serializers

from engine.data import FORMATS
from engine.hyperparameters import (
    API_FIELDS,
    AUTO,
    AUTO_RESOLVED,
    METHOD_TYPES,
    SUPERVISED,
    ApiField,
    method_object,
    public,
)
from jobs import preflight
from jobs.models import (
    Adapter,
    BaseModel,
    Checkpoint,
    Evaluation,
    File,
    FineTuneJob,
    JobEvent,
    WorkerHeartbeat,
    evaluation_summary,
)
from jobs.models.jobs import waiting_sentence
from loft.api.base import ObjectTypeField, UnixSeconds, UnixTimestampField

EVENT_ID_PREFIX = "ftevent-"
CHECKPOINT_ID_PREFIX = "ftckpt-"


class ModelSerializer(serializers.ModelSerializer):
    """OpenAI's Model object, plus the catalogue's facts a person picks a base model by."""

    id = serializers.CharField(source="name")
    object = ObjectTypeField("model")
    created = UnixTimestampField(source="created_at")
    owned_by = serializers.SerializerMethodField()

    class Meta:
        model = BaseModel
        fields = ["id", "object", "created", "owned_by", "parameters", "context_length", "license"]

    def get_owned_by(self, model: BaseModel) -> str:
        return model.name.split("/", 1)[0] if "/" in model.name else "loft"


class FileSerializer(serializers.ModelSerializer):
    """OpenAI's File object, plus Loft's measurements of the dataset."""

    object = ObjectTypeField("file")
    created_at = UnixTimestampField()
    expires_at = serializers.SerializerMethodField()
    status_details = serializers.SerializerMethodField()
    format = serializers.SerializerMethodField()
    validation = serializers.JSONField(source="report")

    class Meta:
        model = File
        fields = [
            "id",
            "object",
            "bytes",
            "created_at",
            "expires_at",
            "filename",
            "purpose",
            "status",
            "status_details",
            "format",
            "file_type",
            "rows",
            "tokens",
            "sha256",
            "validation",
        ]

    def get_expires_at(self, file: File) -> int | None:
        return None

    def get_status_details(self, file: File) -> str | None:
        return file.status_details or None

    def get_format(self, file: File) -> str | None:
        return file.format or None


class FileListSerializer(FileSerializer):
    """A File object in ``GET /v1/files``: OpenAI's members and Loft's measurements, without
    the validation report (up to 100 row errors and a preview), which its retrieve gives."""

    class Meta(FileSerializer.Meta):
        fields = [name for name in FileSerializer.Meta.fields if name != "validation"]


class FileUploadSerializer(serializers.Serializer):
    purpose = serializers.ChoiceField(choices=[purpose.value for purpose in File.UPLOADABLE])
    format = serializers.ChoiceField(choices=FORMATS, required=False, allow_blank=True)
    model = serializers.CharField(
        required=False, allow_blank=True, help_text="Base model whose tokenizer counts."
    )

    def validate_model(self, name: str) -> BaseModel:
        if not name:
            return BaseModel.default()
        model = BaseModel.objects.enabled().filter(name=name).first()
        if model is None:
            raise serializers.ValidationError(
                f"The model '{name}' does not exist or is not enabled."
            )
        return model


# --- fine-tuning jobs ---------------------------------------------------------------------------


# The columns a job object is made of, read as values rather than model instances, in one
# query: a page of 100 jobs spent two thirds of its time building instances (bench/api_load.py).
# JobSerializer takes such a row (jobs/api/fine_tuning.py::job_rows).
JOB_COLUMNS = (
    "id",
    "org_id",
    "status",
    "trained_tokens",
    "training_file_id",
    "validation_file_id",
    "parent_adapter_id",
    "result_file_id",
    "hyperparameters",
    "seed",
    "suffix",
    "base_model__name",
    "adapter__id",
    "adapter__name",
)
# Computed by PostgreSQL, as cheap to read as they are to show (a third of what was left of a
# page's time went into decoding JSON and timestamps):
COMPUTED_COLUMNS = {
    # JSON the object shows as it is, as PostgreSQL's text, put into the answer undecoded;
    # also requested_hyperparameters, decoded only while the files are validated
    **{
        f"{name}_text": Cast(name, TextField())
        for name in (
            "error",
            "metadata",
            "progress",
            "metrics",
            "plan",
            "timings",
            "requested_hyperparameters",
        )
    },
    # OpenAI's timestamps, whole seconds since the epoch
    "created_at_unix": UnixSeconds("created_at"),
    "finished_at_unix": UnixSeconds("finished_at"),
    "latest_evaluation": Evaluation.latest_summary_parts(OuterRef("pk")),
}


def verbatim_json(text: str | None) -> orjson.Fragment | None:
    """A JSON column's text, written into the answer as it is (loft/api/renderers.py)."""
    return None if text is None else orjson.Fragment(text)


class JobSerializer(serializers.ModelSerializer):
    """OpenAI's FineTuningJob object, plus Loft's progress, metrics, plan and adapter.

    It serializes a row of ``JOB_COLUMNS`` and ``COMPUTED_COLUMNS``, written out by hand;
    the fields declared here document the object in the OpenAPI schema, and
    tests/test_jobs_api.py checks that both name the same members."""

    object = ObjectTypeField("fine_tuning.job")
    model = serializers.CharField(source="base_model.name")
    fine_tuned_model = serializers.SerializerMethodField()
    organization_id = serializers.CharField(source="org_id")
    created_at = UnixTimestampField()
    finished_at = UnixTimestampField()
    hyperparameters = serializers.SerializerMethodField()
    method = serializers.SerializerMethodField()
    result_files = serializers.SerializerMethodField()
    estimated_finish = serializers.SerializerMethodField()
    suffix = serializers.SerializerMethodField()
    adapter = serializers.SerializerMethodField()
    evaluation = serializers.SerializerMethodField()
    integrations = serializers.SerializerMethodField()
    status_details = serializers.SerializerMethodField()
    timings = serializers.JSONField(
        help_text="Where the job's time went, in seconds: queue (submission to a worker's "
        "first claim), setup, training (first step's start to last step's end), evaluation, "
        "upload and total; the attempt they describe. Written when an attempt ends; empty "
        "before."
    )

    class Meta:
        model = FineTuneJob
        fields = [
            "id",
            "object",
            "model",
            "fine_tuned_model",
            "organization_id",
            "status",
            "status_details",
            "created_at",
            "finished_at",
            "trained_tokens",
            "training_file",
            "validation_file",
            "hyperparameters",
            "method",
            "result_files",
            "error",
            "seed",
            "suffix",
            "estimated_finish",
            "metadata",
            "integrations",
            "parent_adapter",
            "progress",
            "metrics",
            "plan",
            "timings",
            "adapter",
            "evaluation",
        ]
        read_only_fields = fields

    def to_representation(self, job: dict) -> dict:
        hyperparameters = self.get_hyperparameters(job)
        return {
            "id": job["id"],
            "object": "fine_tuning.job",
            "model": job["base_model__name"],
            "fine_tuned_model": self.get_fine_tuned_model(job),
            "organization_id": job["org_id"],
            "status": job["status"],
            "status_details": self.get_status_details(job),
            "created_at": job["created_at_unix"],
            "finished_at": job["finished_at_unix"],
            "trained_tokens": job["trained_tokens"],
            "training_file": job["training_file_id"],
            "validation_file": job["validation_file_id"],
            "hyperparameters": hyperparameters,
            "method": method_object(job["hyperparameters"], hyperparameters),
            "result_files": self.get_result_files(job),
            "error": verbatim_json(job["error_text"]),
            "seed": job["seed"],
            "suffix": self.get_suffix(job),
            "estimated_finish": self.get_estimated_finish(job),
            "metadata": verbatim_json(job["metadata_text"]),
            "integrations": self.get_integrations(job),
            "parent_adapter": job["parent_adapter_id"],
            "progress": verbatim_json(job["progress_text"]),
            "metrics": verbatim_json(job["metrics_text"]),
            "plan": verbatim_json(job["plan_text"]),
            "timings": verbatim_json(job["timings_text"]),
            "adapter": self.get_adapter(job),
            "evaluation": self.get_evaluation(job),
        }

    def get_fine_tuned_model(self, job: dict) -> str | None:
        return job["adapter__name"]

    def get_hyperparameters(self, job: dict) -> dict:
        shown = public(job["hyperparameters"])
        if job["status"] == FineTuneJob.Status.VALIDATING_FILES:
            # Resolved from the data once it is measured; until then, what the client asked.
            for name in (name for name in AUTO_RESOLVED if name in shown):
                if orjson.loads(job["requested_hyperparameters_text"]).get(name, AUTO) == AUTO:
                    shown[name] = AUTO
        return shown

    def get_method(self, job: dict) -> dict:
        return method_object(job["hyperparameters"], self.get_hyperparameters(job))

    def get_result_files(self, job: dict) -> list[str]:
        """The job's metrics by step as a CSV file (``GET /v1/files/{id}/content``), once it
        has succeeded."""
        return [job["result_file_id"]] if job["result_file_id"] else []

    def get_estimated_finish(self, job: dict) -> int | None:
        """From the live ETA while running, from the plan while waiting."""
        if job["status"] in FineTuneJob.FINISHED:
            return None
        now = timezone.now()
        eta = orjson.loads(job["progress_text"]).get("eta_seconds")
        if job["status"] == FineTuneJob.Status.RUNNING and eta is not None:
            return int(now.timestamp() + eta)
        seconds = orjson.loads(job["plan_text"] or "{}").get("estimated_seconds")
        return int(now.timestamp() + seconds) if seconds else None

    def get_status_details(self, job: dict) -> str | None:
        """For a queued job whose worker class has no worker online, what it waits for (it
        stays queued and runs when one starts); else null."""
        if job["status"] != FineTuneJob.Status.QUEUED:
            return None
        if not hasattr(self, "_classes"):  # read once per page of jobs
            known = {worker.name for worker in preflight.known_classes()}
            self._classes = WorkerHeartbeat.online_by_class(), known
        return waiting_sentence(orjson.loads(job["plan_text"] or "{}"), *self._classes)

    def get_suffix(self, job: dict) -> str | None:
        return job["suffix"] or None

    def get_adapter(self, job: dict) -> str | None:
        return job["adapter__id"]

    def get_evaluation(self, job: dict) -> dict | None:
        """Base against adapter on the held-out rows, with the promotion gate's verdict."""
        latest = job["latest_evaluation"]  # Evaluation.latest_summary_parts
        return evaluation_summary(**latest) if latest else None

    def get_integrations(self, job: dict) -> list:
        return []


def _documented(hyperparameter: ApiField) -> serializers.Field:
    """How the OpenAPI schema shows one hyperparameter; engine/hyperparameters.py checks it."""
    options = {"required": False, "help_text": hyperparameter.help}
    if hyperparameter.choices:
        auto = [AUTO] if hyperparameter.auto else []
        return serializers.ChoiceField(choices=auto + list(hyperparameter.choices), **options)
    if hyperparameter.auto or hyperparameter.openai:  # OpenAI's take "auto"
        wanted = {int: "An integer", bool: "true, false"}.get(hyperparameter.kind, "A number")
        return serializers.JSONField(
            **{**options, "help_text": f'{wanted} or "auto". ' + options["help_text"]}
        )
    field = {
        int: serializers.IntegerField,
        float: serializers.FloatField,
        bool: serializers.BooleanField,
        str: serializers.CharField,
    }
    return field[hyperparameter.kind](allow_null=hyperparameter.nullable, **options)


HyperparametersSerializer = type(
    "HyperparametersSerializer",
    (serializers.Serializer,),
    {
        "__doc__": "Documents the hyperparameters object (engine/hyperparameters.py).",
        **{h.name: _documented(h) for h in API_FIELDS},
        "parent_adapter": serializers.CharField(
            required=False, help_text="An adapter id or fine-tuned model name to continue from."
        ),
    },
)


class StrictSerializer(serializers.Serializer):
    """A request body whose unknown fields are refused by name, so that a client never sets
    what the server owns (status, ids, tenants) and a typo is not silently ignored."""

    def to_internal_value(self, data):
        if isinstance(data, dict):
            unknown = sorted(set(data) - set(self.fields))
            if unknown:
                raise serializers.ValidationError(
                    {
                        unknown[0]: [
                            f"Unknown parameter {unknown[0]!r}: Loft sets it, or it does not exist."
                        ]
                    },
                    code="unknown_parameter",
                )
        return super().to_internal_value(data)


class JobCreateSerializer(StrictSerializer):
    """OpenAI's create body. Anything else, e.g. ``status``, is refused by name."""

    model = serializers.CharField()
    training_file = serializers.CharField()
    validation_file = serializers.CharField(required=False, allow_null=True, allow_blank=True)
    # Read raw: "auto", types and ranges are checked by jobs.preflight, which names the field.
    hyperparameters = serializers.JSONField(required=False)
    method = serializers.JSONField(
        required=False,
        help_text='{"type": "supervised", "supervised": {"hyperparameters": {…}}}, or '
        '{"type": "dpo", "dpo": {"hyperparameters": {…}}} on a preference file',
    )
    suffix = serializers.RegexField(
        r"^[A-Za-z0-9_-]{0,64}$",
        required=False,
        allow_null=True,
        allow_blank=True,
        error_messages={"invalid": "suffix takes up to 64 letters, digits, '-' and '_'."},
    )
    seed = serializers.IntegerField(
        required=False, allow_null=True, min_value=0, max_value=2**31 - 1
    )
    metadata = serializers.DictField(
        child=serializers.CharField(max_length=512, allow_blank=True),
        required=False,
        allow_null=True,
    )
    integrations = serializers.ListField(required=False, allow_null=True, max_length=0)
    dry_run = serializers.BooleanField(
        required=False, default=False, help_text="Return the pre-flight plan; create nothing."
    )

    def validate_metadata(self, metadata):
        raw = self.initial_data.get("metadata") or {}
        if not isinstance(raw, dict) or any(not isinstance(value, str) for value in raw.values()):
            raise serializers.ValidationError("metadata values must be strings.")
        if metadata and (
            len(metadata) > 16 or any(not 0 < len(key) <= 64 or "\x00" in key for key in metadata)
        ):
            raise serializers.ValidationError(
                "metadata holds at most 16 pairs with keys of up to 64 characters."
            )
        return metadata or {}

    def validate(self, attrs):
        method = attrs.get("method")
        attrs["method_type"] = SUPERVISED
        if method is not None:
            kind = method.get("type", SUPERVISED) if isinstance(method, dict) else None
            if kind not in METHOD_TYPES:
                raise serializers.ValidationError(
                    {
                        "method": [
                            "Loft trains supervised fine-tuning and DPO: method.type "
                            "'supervised' or 'dpo'."
                        ]
                    }
                )
            settings_of_kind = method.get(kind) or {}
            inner = (
                settings_of_kind.get("hyperparameters", {})
                if isinstance(settings_of_kind, dict)
                else None
            )
            if not isinstance(inner, dict):
                raise serializers.ValidationError(
                    {"method": [f"method.{kind}.hyperparameters must be an object."]}
                )
            if self.initial_data.get("hyperparameters"):
                raise serializers.ValidationError(
                    {"hyperparameters": ["Give hyperparameters or method, not both."]}
                )
            attrs["hyperparameters"] = inner
            attrs["method_type"] = kind
        else:
            # The raw object: "auto" and the checks live in engine/hyperparameters.py.
            raw = self.initial_data.get("hyperparameters")
            attrs["hyperparameters"] = {} if raw is None else raw
        if not isinstance(attrs["hyperparameters"], dict):
            raise serializers.ValidationError({"hyperparameters": ["Must be an object."]})
        parent = attrs["hyperparameters"].get("parent_adapter")
        if parent is not None and not (isinstance(parent, str) and _printable(parent)):
            raise serializers.ValidationError(
                {"hyperparameters": ["parent_adapter must be an adapter id or model name."]}
            )
        return attrs


def _printable(text: str) -> bool:
    return 0 < len(text) <= 300 and "\x00" not in text


class EventSerializer(serializers.ModelSerializer):
    id = serializers.SerializerMethodField()
    object = ObjectTypeField("fine_tuning.job.event")
    created_at = UnixTimestampField()
    type = serializers.SerializerMethodField()

    class Meta:
        model = JobEvent
        fields = ["id", "object", "created_at", "level", "message", "data", "type"]

    def get_id(self, event) -> str:
        return f"{EVENT_ID_PREFIX}{event.pk}"

    def get_type(self, event) -> str:
        return "metrics" if "train_loss" in event.data else "message"

    def to_representation(self, event):
        data = super().to_representation(event)
        data["level"] = {"warning": "warn"}.get(data["level"], data["level"])  # OpenAI's word
        return data


class CheckpointSerializer(serializers.ModelSerializer):
    id = serializers.SerializerMethodField()
    object = ObjectTypeField("fine_tuning.job.checkpoint")
    created_at = UnixTimestampField()
    fine_tuned_model_checkpoint = serializers.SerializerMethodField()
    fine_tuning_job_id = serializers.CharField(source="job_id")
    step_number = serializers.IntegerField(source="step")
    metrics = serializers.SerializerMethodField()

    class Meta:
        model = Checkpoint
        fields = [
            "id",
            "object",
            "created_at",
            "fine_tuned_model_checkpoint",
            "fine_tuning_job_id",
            "step_number",
            "metrics",
        ]

    def get_id(self, checkpoint) -> str:
        return f"{CHECKPOINT_ID_PREFIX}{checkpoint.pk}"

    def get_fine_tuned_model_checkpoint(self, checkpoint) -> str:
        return checkpoint.model_name

    def get_metrics(self, checkpoint) -> dict:
        return {"step": checkpoint.step, **checkpoint.metrics}


class AdapterSerializer(serializers.ModelSerializer):
    object = ObjectTypeField("adapter")
    base_model = serializers.CharField(source="base_model.name")
    created_at = UnixTimestampField()
    files = serializers.SerializerMethodField()
    flagged_worse_than_base = serializers.SerializerMethodField()
    base_quantization = serializers.CharField(
        read_only=True,
        help_text="The base precision the adapter was trained on and is served on: "
        "none (full precision) or nf4 (4-bit).",
    )

    class Meta:
        model = Adapter
        fields = [
            "id",
            "object",
            "name",
            "base_model",
            "base_quantization",
            "job",
            "parent",
            "size_bytes",
            "files",
            "metrics",
            "flagged_worse_than_base",
            "created_at",
        ]
        read_only_fields = fields

    def get_flagged_worse_than_base(self, adapter) -> bool | None:
        """The promotion gate: True when held-out evaluation found it worse than its base;
        None when it was not evaluated."""
        verdict = (adapter.metrics or {}).get("verdict")
        return None if verdict is None else not verdict["better"]

    def get_files(self, adapter) -> dict:
        return (adapter.manifest or {}).get("files", {})


class FineTunedModelSerializer(serializers.ModelSerializer):
    """A tenant's adapter as OpenAI lists a fine-tuned model."""

    id = serializers.CharField(source="name")
    object = ObjectTypeField("model")
    created = UnixTimestampField(source="created_at")
    owned_by = serializers.CharField(source="org.slug")
    root = serializers.CharField(source="base_model.name")
    adapter = serializers.CharField(source="pk")

    class Meta:
        model = Adapter
        fields = ["id", "object", "created", "owned_by", "root", "adapter"]


class JobCreateRequestSerializer(JobCreateSerializer):
    """The create body as the OpenAPI schema documents it."""

    hyperparameters = HyperparametersSerializer(required=False)
