"""Tenancy: organizations (the tenants), their members, and their API keys."""

from __future__ import annotations

import hashlib
import secrets
from datetime import timedelta

from django.conf import settings
from django.db import models
from django.utils import timezone
from django.utils.text import slugify

from loft.ids import make_id
from loft.tenancy import TenantOwnedModel

API_KEY_PREFIX = "sk-loft-"
# How many characters of a key stay visible so a person can tell their keys apart.
API_KEY_VISIBLE_CHARS = len(API_KEY_PREFIX) + 6
# Recording every use would be a write per request; a minute's precision is enough.
API_KEY_LAST_USED_PRECISION = timedelta(minutes=1)


def new_org_id() -> str:
    return make_id("org")


def new_api_key_id() -> str:
    return make_id("key")


class Organization(models.Model):
    id = models.CharField(primary_key=True, max_length=40, default=new_org_id, editable=False)
    name = models.CharField(max_length=200)
    slug = models.SlugField(max_length=60, unique=True)
    is_active = models.BooleanField(
        default=True, help_text="An inactive organization's keys and members are refused."
    )
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return self.slug

    @classmethod
    def get_or_create_by_slug(cls, slug: str) -> tuple[Organization, bool]:
        slug = slugify(slug)
        return cls.objects.get_or_create(slug=slug, defaults={"name": slug})

    def add_member(self, user, role: str = "member") -> Membership:
        membership, _ = Membership.objects.update_or_create(
            org=self, user=user, defaults={"role": role}
        )
        return membership


class Membership(TenantOwnedModel):
    class Role(models.TextChoices):
        OWNER = "owner"
        MEMBER = "member"

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE)
    role = models.CharField(max_length=10, choices=Role.choices, default=Role.MEMBER)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["org", "user"], name="one_membership_per_org")
        ]

    def __str__(self) -> str:
        return f"{self.user} in {self.org} ({self.role})"


def hash_api_key(secret: str) -> str:
    # Keys are 256 random bits, so a fast hash is enough: nobody can brute-force the preimage,
    # and a lookup by hash stays one indexed query. Passwords would need a slow hash; keys don't.
    return hashlib.sha256(secret.encode()).hexdigest()


class ApiKey(TenantOwnedModel):
    id = models.CharField(primary_key=True, max_length=40, default=new_api_key_id, editable=False)
    name = models.CharField(max_length=100, blank=True)
    prefix = models.CharField(
        max_length=20, help_text="The first characters of the key, for telling keys apart."
    )
    secret_hash = models.CharField(max_length=64, unique=True, editable=False)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL
    )
    created_at = models.DateTimeField(auto_now_add=True)
    last_used_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.prefix}… ({self.name or 'unnamed'})"

    @classmethod
    def issue(cls, org: Organization, name: str = "", created_by=None) -> tuple[ApiKey, str]:
        """Create a key. The secret is returned once and never stored, only its hash."""
        secret = API_KEY_PREFIX + secrets.token_urlsafe(32)
        key = cls.objects.create(
            org=org,
            name=name,
            prefix=secret[:API_KEY_VISIBLE_CHARS],
            secret_hash=hash_api_key(secret),
            created_by=created_by,
        )
        return key, secret

    @classmethod
    def find_active(cls, secret: str) -> ApiKey | None:
        """The live key with this secret, or None if it is unknown, revoked or its org disabled."""
        return (
            cls.objects.select_related("org")
            .filter(secret_hash=hash_api_key(secret), revoked_at__isnull=True, org__is_active=True)
            .first()
        )

    @property
    def is_active(self) -> bool:
        return self.revoked_at is None

    def revoke(self) -> None:
        if self.revoked_at is None:
            self.revoked_at = timezone.now()
            self.save(update_fields=["revoked_at"])

    def record_use(self) -> None:
        now = timezone.now()
        if self.last_used_at is None or now - self.last_used_at >= API_KEY_LAST_USED_PRECISION:
            ApiKey.objects.filter(pk=self.pk).update(last_used_at=now)
            self.last_used_at = now
