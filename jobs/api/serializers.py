from rest_framework import serializers

from jobs.models import BaseModel
from loft.api.base import UnixTimestampField


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
