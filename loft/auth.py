"""API authentication: ``Authorization: Bearer <key>``; the browser uses Django sessions."""

from __future__ import annotations

import functools
import logging

import redis
from django.conf import settings
from drf_spectacular.extensions import OpenApiAuthenticationExtension
from rest_framework import authentication, exceptions, permissions

from loft.models import ApiKey
from loft.tenancy import current_org

logger = logging.getLogger(__name__)


class KeyGuessing:
    """Wrong API keys counted per client address for a minute, in Redis (shared by every web
    process): past ``LOFT_AUTH_FAILURES_PER_MINUTE`` the address gets 429 until the minute is
    over, whatever key it sends, so keys cannot be guessed at speed. (Keys are 256 random
    bits; this keeps the logs and the database quiet as much as it protects them.) Behind a
    proxy, REMOTE_ADDR must be the client's: set it there. If Redis is down, nothing is
    counted, rather than refusing everyone."""

    WINDOW_SECONDS = 60

    @staticmethod
    @functools.cache
    def _redis():
        return redis.Redis.from_url(settings.REDIS_URL, socket_timeout=1)

    @staticmethod
    def _key(request) -> str:
        return f"loft:wrong-keys:{request.META.get('REMOTE_ADDR', 'unknown')}"

    @classmethod
    def refuse_if_over(cls, request) -> None:
        limit = settings.LOFT_AUTH_FAILURES_PER_MINUTE
        if not limit:
            return
        try:
            key = cls._key(request)
            count = int(cls._redis().get(key) or 0)
            wait = cls._redis().ttl(key) if count >= limit else 0
        except redis.RedisError as error:
            logger.warning("could not read the wrong-key counter: %s", error)
            return
        if count >= limit:
            wait = max(int(wait), 1)
            raise exceptions.Throttled(
                wait=wait,
                detail=f"Too many wrong API keys from your address; try again in {wait} s.",
                code="rate_limit_exceeded",
            )

    @classmethod
    def count(cls, request) -> None:
        try:
            key = cls._key(request)
            with cls._redis().pipeline() as pipe:
                pipe.incr(key).expire(key, cls.WINDOW_SECONDS, nx=True).execute()
        except redis.RedisError as error:
            logger.warning("could not count a wrong key: %s", error)


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
        KeyGuessing.refuse_if_over(request)
        key = ApiKey.find_active(secret) if secret else None
        if key is None:
            KeyGuessing.count(request)
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
