"""Authentication: API keys (``Authorization: Bearer <key>``) and the browser's sign-in, each
with a counter of failures against guessing; and who may manage an organization's keys."""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import logging

import redis
from django import forms
from django.conf import settings
from django.contrib.admin.forms import AdminAuthenticationForm
from django.contrib.auth.forms import AuthenticationForm
from drf_spectacular.extensions import OpenApiAuthenticationExtension
from rest_framework import authentication, exceptions, permissions

from loft.models import API_KEY_VISIBLE_CHARS, ApiKey, Organization
from loft.tenancy import current_org

logger = logging.getLogger(__name__)

# An address longer than this in X-Forwarded-For is not an address; it is cut before counting.
LONGEST_ADDRESS = 45


def client_address(request) -> str:
    """The address of the client, as far as Loft can trust it.

    REMOTE_ADDR, unless it is one of ``LOFT_TRUSTED_PROXIES``: then X-Forwarded-For, read from
    the right (each proxy appends the address it saw), past every trusted hop. The entries
    left of the first untrusted one are whatever the client wrote, so they are never read."""
    address = request.META.get("REMOTE_ADDR", "") or "unknown"
    forwarded = request.META.get("HTTP_X_FORWARDED_FOR", "")
    hops = [hop.strip() for hop in forwarded.split(",") if hop.strip()]
    while _is_trusted_proxy(address) and hops:
        address = hops.pop()[:LONGEST_ADDRESS]
    return address


def _is_trusted_proxy(address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in settings.LOFT_TRUSTED_PROXIES)


@functools.cache
def _redis() -> redis.Redis:
    return redis.Redis.from_url(settings.REDIS_URL, socket_timeout=1)


class FailureCounter:
    """Failures counted in Redis (shared by every web process) under one key for a window:
    past the limit, the caller waits until the window is over. If Redis is down, nothing is
    counted, rather than refusing everyone."""

    def __init__(self, key: str, limit: int, window_seconds: int):
        self.key, self.limit, self.window_seconds = key, limit, window_seconds

    def wait_seconds(self) -> int:
        """0 while under the limit; else how long until the window is over."""
        if not self.limit:
            return 0
        try:
            count = int(_redis().get(self.key) or 0)
            wait = _redis().ttl(self.key) if count >= self.limit else 0
        except redis.RedisError as error:
            logger.warning("could not read the failure counter %s: %s", self.key, error)
            return 0
        return max(int(wait), 1) if count >= self.limit else 0

    def count(self) -> None:
        if not self.limit:
            return
        try:
            with _redis().pipeline() as pipe:
                pipe.incr(self.key).expire(self.key, self.window_seconds, nx=True).execute()
        except redis.RedisError as error:
            logger.warning("could not count a failure under %s: %s", self.key, error)


def _digest(text: str) -> str:
    # Keeps what a client sent (a username, part of a key) out of Redis' key names.
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def wrong_keys(request, secret: str) -> FailureCounter:
    """Wrong API keys from one address that start alike (the visible part of a key): a client
    that keeps sending a revoked or mistyped key is slowed down, and only that client, not
    everyone behind the same proxy or NAT. (Keys are 256 random bits: guessing one is hopeless
    at any speed, so a valid key is always let in, whatever the counter says.)"""
    visible = secret[:API_KEY_VISIBLE_CHARS]
    return FailureCounter(
        f"loft:wrong-keys:{client_address(request)}:{_digest(visible)}",
        settings.LOFT_AUTH_FAILURES_PER_MINUTE,
        60,
    )


def failed_sign_ins(request, username: str) -> FailureCounter:
    """Failed sign-ins from one address for one username: past the limit, that address waits
    for the window to end, right password or not, so passwords cannot be guessed at speed.
    (Counted per address too, not per username alone: anyone could lock a person out.)"""
    return FailureCounter(
        f"loft:failed-sign-ins:{client_address(request)}:{_digest(username)}",
        settings.LOFT_LOGIN_FAILURE_LIMIT,
        settings.LOFT_LOGIN_FAILURE_WINDOW_SECONDS,
    )


class SignInThrottle:
    """For Django's sign-in forms: refuses once too many sign-ins failed, counts failures."""

    def clean(self):
        counter = failed_sign_ins(self.request, self.data.get("username", ""))
        wait = counter.wait_seconds()
        if wait:
            minutes = -(-wait // 60)
            raise forms.ValidationError(
                f"Too many failed sign-ins for this username from your address; try again in "
                f"{minutes} minute{'s' if minutes > 1 else ''}.",
                code="throttled",
            )
        try:
            return super().clean()
        except forms.ValidationError:
            counter.count()
            raise


class SignInForm(SignInThrottle, AuthenticationForm):
    """/login"""


class AdminSignInForm(SignInThrottle, AdminAuthenticationForm):
    """/admin/login/"""


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
            self._refuse_if_guessing(request, secret)
            shown = f"{secret[:8]}…" if secret else "(empty)"
            raise exceptions.AuthenticationFailed(
                f"Incorrect API key provided: {shown} Create a key in Loft's account page "
                "or with `manage.py create_api_key`.",
                code="invalid_api_key",
            )
        key.record_use()
        return ApiKeyPrincipal(key), key

    @staticmethod
    def _refuse_if_guessing(request, secret: str) -> None:
        counter = wrong_keys(request, secret)
        wait = counter.wait_seconds()
        if wait:
            raise exceptions.Throttled(
                wait=wait,
                detail=f"Too many wrong API keys from your address; try again in {wait} s.",
                code="rate_limit_exceeded",
            )
        counter.count()

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


ONLY_KEY_MANAGERS = (
    "Only owners of the organization, and API keys created with the manage_keys scope, "
    "can create or revoke API keys."
)


def may_manage_keys(request, org: Organization) -> bool:
    """Creating and revoking an organization's keys is for its owners, and for keys created
    with the manage_keys scope: a leaked everyday key cannot mint itself successors."""
    key = getattr(request, "auth", None)
    if isinstance(key, ApiKey):
        return key.can_manage_keys
    return org.is_owner(request.user)


class ApiKeyAuthenticationScheme(OpenApiAuthenticationExtension):
    """Tells the OpenAPI schema that /v1 takes ``Authorization: Bearer <key>``."""

    target_class = ApiKeyAuthentication
    name = "apiKey"

    def get_security_definition(self, auto_schema):
        return {"type": "http", "scheme": "bearer", "description": "A Loft API key, sk-loft-…"}
