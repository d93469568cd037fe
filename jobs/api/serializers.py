from rest_framework import serializers

from jobs.models import BaseModel, File
from loft.api.base import UnixTimestampField
from worker.data import FORMATS


class ModelSerializer(serializers.ModelSerializer):
    """OpenAI's Model object, plus the catalogue's facts a person picks a base model by."""

    id = serializers.CharField(source="name")
    object = serializers.SerializerMethodField()
    created = UnixTimestampField(source="created_at")
    owned_by = serializers.SerializerMethodField()

    class Meta:
        model = BaseModel
        fields = ["id", "object", "created", "owned_by", "parameters", "context_length", "license"]

    def get_object(self, model: BaseModel) -> str:
        return "model"

    def get_owned_by(self, model: BaseModel) -> str:
        return model.name.split("/", 1)[0] if "/" in model.name else "loft"


class FileSerializer(serializers.ModelSerializer):
    """OpenAI's File object, plus Loft's measurements of the dataset."""

    object = serializers.SerializerMethodField()
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

    def get_object(self, file: File) -> str:
        return "file"

    def get_expires_at(self, file: File) -> None:
        return None

    def get_status_details(self, file: File) -> str | None:
        return file.status_details or None

    def get_format(self, file: File) -> str | None:
        return file.format or None


class FileUploadSerializer(serializers.Serializer):
    purpose = serializers.ChoiceField(choices=File.Purpose.values)
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
