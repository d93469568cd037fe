from rest_framework import mixins, status
from rest_framework.response import Response

from loft.api.base import TenantScopedViewSet
from loft.api.serializers import ApiKeySerializer
from loft.models import ApiKey


class ApiKeyViewSet(
    mixins.ListModelMixin, mixins.RetrieveModelMixin, mixins.DestroyModelMixin, TenantScopedViewSet
):
    """The organization's API keys. Creating one returns its secret once, in ``value``."""

    queryset = ApiKey.objects.all()
    serializer_class = ApiKeySerializer
    object_name = "API key"

    def create(self, request):
        serializer = self.get_serializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        created_by = request.user if getattr(request.user, "pk", None) else None
        key, secret = ApiKey.issue(self.org, serializer.validated_data.get("name", ""), created_by)
        body = {**self.get_serializer(key).data, "value": secret}
        return Response(body, status=status.HTTP_201_CREATED)

    def destroy(self, request, pk=None):
        key = self.get_object()
        key.revoke()
        return Response({"id": key.id, "object": "api_key.deleted", "deleted": True})
