"""``/v1/webhook_endpoints``: OpenAI's webhook endpoint API, plus each endpoint's deliveries.

The paths and fields are those of the official ``openai`` client's ``client.webhooks``
(``create(url=, name=, event_types=)``, ``list``, ``retrieve``, ``delete``), so it manages Loft's
endpoints unchanged. ``GET …/{id}/deliveries`` is Loft's own: every event sent, with its tries.
"""

from __future__ import annotations

from django.conf import settings
from django.db import transaction
from drf_spectacular.utils import extend_schema, inline_serializer
from rest_framework import mixins, serializers, status
from rest_framework.decorators import action
from rest_framework.response import Response

from loft.api.base import ObjectTypeField, TenantScopedViewSet, UnixTimestampField
from loft.api.errors import LoftAPIError
from loft.models import EVENTS, Organization, WebhookDelivery, WebhookEndpoint
from loft.webhooks import UnsafeWebhookURL, check_url


class WebhookEndpointSerializer(serializers.ModelSerializer):
    object = ObjectTypeField("webhook_endpoint")
    event_types = serializers.ListField(
        child=serializers.ChoiceField(choices=EVENTS),
        allow_empty=False,
        required=False,
        help_text="The events to send; all of them when left out.",
    )
    signing_secret_hint = serializers.CharField(source="secret_hint", read_only=True)
    created_at = UnixTimestampField()

    class Meta:
        model = WebhookEndpoint
        # Nothing else is writable: the org, id and secret are the server's, whatever is sent.
        fields = ["id", "object", "url", "name", "event_types", "signing_secret_hint", "created_at"]
        read_only_fields = ["id", "object", "signing_secret_hint", "created_at"]

    def validate_url(self, url: str) -> str:
        try:
            check_url(url)
        except UnsafeWebhookURL as exc:
            raise serializers.ValidationError(str(exc), code="invalid_url") from None
        return url

    def validate_event_types(self, event_types: list[str]) -> list[str]:
        return list(dict.fromkeys(event_types))


class WebhookEndpointWithSecretSerializer(WebhookEndpointSerializer):
    """The endpoint as created: the only time its signing secret is shown."""

    signing_secret = serializers.CharField(source="secret", read_only=True)

    class Meta(WebhookEndpointSerializer.Meta):
        fields = [*WebhookEndpointSerializer.Meta.fields, "signing_secret"]


class WebhookDeliverySerializer(serializers.ModelSerializer):
    object = ObjectTypeField("webhook_delivery")
    response_codes = serializers.SerializerMethodField()
    created_at = UnixTimestampField()
    next_attempt_at = UnixTimestampField()
    delivered_at = UnixTimestampField()

    class Meta:
        model = WebhookDelivery
        fields = [
            "id",
            "object",
            "endpoint_id",
            "event_id",
            "event_type",
            "status",
            "attempts",
            "response_codes",
            "last_response_code",
            "last_error",
            "attempts_log",
            "payload",
            "created_at",
            "next_attempt_at",
            "delivered_at",
        ]
        read_only_fields = fields

    def get_response_codes(self, delivery: WebhookDelivery) -> list[int | None]:
        return [attempt["response_code"] for attempt in delivery.attempts_log]


class WebhookEndpointViewSet(
    mixins.CreateModelMixin,
    mixins.ListModelMixin,
    mixins.RetrieveModelMixin,
    TenantScopedViewSet,
):
    """The organization's webhook endpoints. Creating one returns its signing secret, once."""

    queryset = WebhookEndpoint.objects.all()
    serializer_class = WebhookEndpointSerializer
    object_name = "webhook endpoint"

    @extend_schema(responses={201: WebhookEndpointWithSecretSerializer})
    def create(self, request):
        serializer = self.get_serializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        limit = settings.LOFT_WEBHOOK_MAX_ENDPOINTS
        with transaction.atomic():
            # The organization's row locked: two creations at once cannot both take the last place.
            Organization.objects.select_for_update().filter(pk=self.org.pk).first()
            if WebhookEndpoint.objects.for_org(self.org).count() >= limit:
                raise LoftAPIError(
                    f"An organization may have at most {limit} webhook endpoints; "
                    "delete one before adding another.",
                    code="too_many_webhook_endpoints",
                )
            endpoint = serializer.save(org=self.org)
        body = WebhookEndpointWithSecretSerializer(endpoint).data
        return Response(body, status=status.HTTP_201_CREATED)

    @extend_schema(
        responses={
            200: inline_serializer(
                "DeletedWebhookEndpoint",
                {
                    "id": serializers.CharField(),
                    "object": serializers.CharField(default="webhook_endpoint.deleted"),
                    "deleted": serializers.BooleanField(),
                },
            )
        }
    )
    def destroy(self, request, pk=None):
        self.get_object().delete()
        return Response({"id": pk, "object": "webhook_endpoint.deleted", "deleted": True})

    @extend_schema(responses=WebhookDeliverySerializer(many=True))
    @action(detail=True, methods=["get"], serializer_class=WebhookDeliverySerializer)
    def deliveries(self, request, pk=None):
        """The endpoint's deliveries, newest first, each with every attempt and its answer."""
        endpoint = self.get_object()
        page = self.paginate_queryset(endpoint.deliveries.all())
        return self.get_paginated_response(self.get_serializer(page, many=True).data)
