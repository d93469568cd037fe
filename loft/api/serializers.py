from rest_framework import serializers

from loft.api.base import ObjectTypeField, UnixTimestampField
from loft.models import ApiKey


class ApiKeySerializer(serializers.ModelSerializer):
    object = ObjectTypeField("api_key")
    redacted_value = serializers.SerializerMethodField()
    created_at = UnixTimestampField()
    last_used_at = UnixTimestampField()
    revoked_at = UnixTimestampField()

    class Meta:
        model = ApiKey
        fields = [
            "id",
            "object",
            "name",
            "scope",
            "redacted_value",
            "created_at",
            "last_used_at",
            "revoked_at",
        ]
        read_only_fields = [
            "id",
            "object",
            "redacted_value",
            "created_at",
            "last_used_at",
            "revoked_at",
        ]

    def get_redacted_value(self, key: ApiKey) -> str:
        return f"{key.prefix}…"
