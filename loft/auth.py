"""API authentication: ``Authorization: Bearer <key>``; the browser uses Django sessions."""

from __future__ import annotations

from drf_spectacular.extensions import OpenApiAuthenticationExtension
from rest_framework import authentication, exceptions, permissions

from loft.models import ApiKey
from loft.tenancy import current_org


class ApiKeyPrincipal:
    """The ``request.user`` of a request made with an API key: the key acts, not a person."""

    is_authenticated = True
    is_anonymous = False
    is_active = True
    is_staff = False
    is_superuser = False
    pk = None

    def __init__(self, key: ApiKey):
        self.key = key
        self.username = f"api-key:{key.prefix}"

    def __str__(self) -> str:
        return self.username


class ApiKeyAuthentication(authentication.BaseAuthentication):
    keyword = "Bearer"

    def authenticate(self, request):
        header = authentication.get_authorization_header(request).decode("latin-1")
        if not header:
            return None
        keyword, _, secret = header.partition(" ")
        if keyword.lower() != self.keyword.lower():
            return None
        secret = secret.strip()
        key = ApiKey.find_active(secret) if secret else None
        if key is None:
            shown = f"{secret[:8]}…" if secret else "(empty)"
            raise exceptions.AuthenticationFailed(
                f"Incorrect API key provided: {shown} Create a key in Loft's account page "
                "or with `manage.py create_api_key`.",
                code="invalid_api_key",
            )
        key.record_use()
        return ApiKeyPrincipal(key), key

    def authenticate_header(self, request) -> str:
        # Without a challenge header DRF would answer 403 instead of 401 to a missing key.
        return 'Bearer realm="loft"'


class IsOrganizationMember(permissions.BasePermission):
    """The request acts for an active organization: by its API key or the member's session."""

    message = "You are not a member of an active organization."

    def has_permission(self, request, view) -> bool:
        if not (request.user and request.user.is_authenticated):
            return False
        return current_org(request) is not None


class ApiKeyAuthenticationScheme(OpenApiAuthenticationExtension):
    """Tells the OpenAPI schema that /v1 takes ``Authorization: Bearer <key>``."""

    target_class = ApiKeyAuthentication
    name = "apiKey"

    def get_security_definition(self, auto_schema):
        return {"type": "http", "scheme": "bearer", "description": "A Loft API key, sk-loft-…"}
