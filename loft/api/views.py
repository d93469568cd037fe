from rest_framework import exceptions, mixins, status
from rest_framework.response import Response

from loft.api.base import TenantScopedViewSet
from loft.api.serializers import ApiKeySerializer
from loft.auth import ONLY_KEY_MANAGERS, may_manage_keys
from loft.models import ApiKey


class ApiKeyViewSet(
    mixins.ListModelMixin, mixins.RetrieveModelMixin, mixins.DestroyModelMixin, TenantScopedViewSet
):
    """The organization's API keys. Every member and key may list them; creating one (its
    secret is returned once, in ``value``) and revoking one is for owners and for keys with the
    manage_keys scope."""

    queryset = ApiKey.objects.all()
    serializer_class = ApiKeySerializer
    object_name = "API key"

    def _refuse_unless_may_manage_keys(self) -> None:
        if not may_manage_keys(self.request, self.org):
            raise exceptions.PermissionDenied(ONLY_KEY_MANAGERS)

    def create(self, request):
        self._refuse_unless_may_manage_keys()
        serializer = self.get_serializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        created_by = request.user if getattr(request.user, "pk", None) else None
        key, secret = ApiKey.issue(
            self.org,
            serializer.validated_data.get("name", ""),
            created_by,
            scope=serializer.validated_data.get("scope", ApiKey.Scope.STANDARD),
        )
        body = {**self.get_serializer(key).data, "value": secret}
        return Response(body, status=status.HTTP_201_CREATED)

    def destroy(self, request, pk=None):
        key = self.get_object()  # another organization's key: 404, as everywhere
        self._refuse_unless_may_manage_keys()
        key.revoke()
        return Response({"id": key.id, "object": "api_key.deleted", "deleted": True})
