"""Tenancy: organizations (the tenants), their members, API keys and webhook endpoints."""

from __future__ import annotations

import base64
import hashlib
import secrets
from datetime import timedelta

from django.conf import settings
from django.db import models
from django.db.models import Q
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
    def lock(cls, org_id: str) -> None:
        """Hold this organization's row until the transaction ends: what its quotas and
        idempotency keys check is then not changed by a parallel request in between."""
        list(cls.objects.select_for_update().filter(pk=org_id).values_list("pk"))

    @classmethod
    def get_or_create_by_slug(cls, slug: str) -> tuple[Organization, bool]:
        slug = slugify(slug)
        return cls.objects.get_or_create(slug=slug, defaults={"name": slug})

    def add_member(self, user, role: str = "member") -> Membership:
        membership, _ = Membership.objects.update_or_create(
            org=self, user=user, defaults={"role": role}
        )
        return membership

    def is_owner(self, user) -> bool:
        return (
            Membership.objects.for_org(self)
            .filter(user_id=getattr(user, "pk", None), role=Membership.Role.OWNER)
            .exists()
        )

    def has_member_called(self, invitee: str) -> bool:
        """Is someone of this organization known by this username or e-mail address?"""
        return (
            Membership.objects.for_org(self)
            .filter(Q(user__username=invitee) | Q(user__email__iexact=invitee))
            .exists()
        )

    def invite(self, invitee: str, invited_by) -> Invitation:
        """Invite whoever has this username or e-mail address, whether or not they have an
        account yet: a pending invitation to the same person is kept, not repeated."""
        invitation, _ = Invitation.objects.get_or_create(
            org=self,
            invitee=invitee,
            status=Invitation.Status.PENDING,
            defaults={"invited_by": invited_by},
        )
        return invitation


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
    class Scope(models.TextChoices):
        STANDARD = "standard", "The API, except creating and revoking keys"
        MANAGE_KEYS = "manage_keys", "The API, and creating and revoking the organization's keys"

    id = models.CharField(primary_key=True, max_length=40, default=new_api_key_id, editable=False)
    name = models.CharField(max_length=100, blank=True)
    # A leaked key must not be able to mint more: only keys made for that purpose may.
    scope = models.CharField(max_length=20, choices=Scope.choices, default=Scope.STANDARD)
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
    def issue(
        cls, org: Organization, name: str = "", created_by=None, scope: str = Scope.STANDARD
    ) -> tuple[ApiKey, str]:
        """Create a key. The secret is returned once and never stored, only its hash."""
        secret = API_KEY_PREFIX + secrets.token_urlsafe(32)
        key = cls.objects.create(
            org=org,
            name=name,
            scope=scope,
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

    @property
    def can_manage_keys(self) -> bool:
        return self.scope == self.Scope.MANAGE_KEYS

    def revoke(self) -> None:
        if self.revoked_at is None:
            self.revoked_at = timezone.now()
            self.save(update_fields=["revoked_at"])

    def record_use(self) -> None:
        now = timezone.now()
        if self.last_used_at is None or now - self.last_used_at >= API_KEY_LAST_USED_PRECISION:
            ApiKey.objects.filter(pk=self.pk).update(last_used_at=now)
            self.last_used_at = now


def new_invitation_token() -> str:
    return secrets.token_urlsafe(24)


class Invitation(TenantOwnedModel):
    """An owner's invitation to join the organization, addressed to a username or an e-mail
    address. The person it names sees it once signed in, and accepts or declines it: nobody is
    added to an organization without their consent, and the owner learns nothing about
    whether such a person has an account."""

    class Status(models.TextChoices):
        PENDING = "pending"
        ACCEPTED = "accepted"
        DECLINED = "declined"

    token = models.CharField(
        max_length=40, unique=True, default=new_invitation_token, editable=False
    )
    invitee = models.CharField(
        max_length=254, help_text="A username or an e-mail address, as the owner typed it."
    )
    invited_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.PENDING)
    created_at = models.DateTimeField(auto_now_add=True)
    answered_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.UniqueConstraint(
                fields=["org", "invitee"],
                condition=Q(status="pending"),
                name="one_pending_invitation_per_invitee",
            )
        ]

    def __str__(self) -> str:
        return f"{self.invitee} to {self.org} ({self.status})"

    @classmethod
    def pending_for(cls, user) -> models.QuerySet[Invitation]:
        """The pending invitations addressed to this person, by username or by e-mail."""
        addressed = Q(invitee=user.username)
        if user.email:
            addressed |= Q(invitee__iexact=user.email)
        return (
            cls.objects.filter(addressed, status=cls.Status.PENDING, org__is_active=True)
            .select_related("org", "invited_by")
            .order_by("created_at")
        )

    def accept(self, user) -> Membership:
        """Join as a member (someone already in the organization keeps their role)."""
        membership = Membership.objects.for_org(self.org).filter(user=user).first()
        if membership is None:
            membership = self.org.add_member(user, role=Membership.Role.MEMBER)
        self._answer(self.Status.ACCEPTED)
        return membership

    def decline(self) -> None:
        self._answer(self.Status.DECLINED)

    def _answer(self, status: str) -> None:
        self.status, self.answered_at = status, timezone.now()
        self.save(update_fields=["status", "answered_at"])


# --- Webhooks -------------------------------------------------------------------------------

WEBHOOK_SECRET_PREFIX = "whsec_"
# The events a tenant can subscribe to: OpenAI's names for a fine-tuning job's end, and Loft's
# for an alias's promotion, or its refusal, by a person or a continual policy.
JOB_EVENTS = ("fine_tuning.job.succeeded", "fine_tuning.job.failed", "fine_tuning.job.cancelled")
ALIAS_EVENTS = ("alias.promoted", "alias.promotion_refused")
EVENTS = JOB_EVENTS + ALIAS_EVENTS


def new_webhook_endpoint_id() -> str:
    return make_id("wh")


def new_webhook_delivery_id() -> str:
    return make_id("whmsg")


def new_webhook_secret() -> str:
    """Standard Webhooks' format, which OpenAI's client decodes: ``whsec_`` + base64 key."""
    return WEBHOOK_SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def all_events() -> list[str]:
    return list(EVENTS)


def all_job_events() -> list[str]:
    """The default of loft/migrations/0002 (a migration names it for good)."""
    return list(JOB_EVENTS)


class WebhookEndpoint(TenantOwnedModel):
    """A URL a tenant registered to hear about its jobs and aliases; deliveries are signed
    with ``secret``."""

    id = models.CharField(
        primary_key=True, max_length=40, default=new_webhook_endpoint_id, editable=False
    )
    url = models.URLField(max_length=2000)
    name = models.CharField(max_length=200, blank=True)
    event_types = models.JSONField(default=all_events)
    # Kept in the clear, unlike API keys: signing needs the key itself, not a hash of it.
    secret = models.CharField(max_length=100, default=new_webhook_secret, editable=False)
    enabled = models.BooleanField(default=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.url} ({self.org})"

    @property
    def secret_hint(self) -> str:
        return f"{WEBHOOK_SECRET_PREFIX}…{self.secret[-4:]}"


class WebhookDelivery(TenantOwnedModel):
    """One event on its way to one endpoint, with every attempt to send it.

    The row is the truth and a Celery message only a hint: an attempt first claims the row with
    a conditional UPDATE, so duplicate messages never send an event twice at the same time.
    """

    class Status(models.TextChoices):
        PENDING = "pending"
        SUCCEEDED = "succeeded"
        FAILED = "failed"

    id = models.CharField(
        primary_key=True, max_length=40, default=new_webhook_delivery_id, editable=False
    )
    endpoint = models.ForeignKey(
        WebhookEndpoint, on_delete=models.CASCADE, related_name="deliveries"
    )
    event_id = models.CharField(max_length=40)
    event_type = models.CharField(max_length=100)
    payload = models.JSONField(help_text="The event exactly as it is sent, less the signature.")
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.PENDING)
    attempts = models.PositiveIntegerField(default=0)
    last_response_code = models.PositiveSmallIntegerField(
        null=True, blank=True, help_text="Empty when the last attempt got no HTTP response."
    )
    last_error = models.TextField(blank=True)
    attempts_log = models.JSONField(
        default=list,
        help_text="Every attempt: at (unix), response_code, error, duration_ms, response (start).",
    )
    next_attempt_at = models.DateTimeField(null=True, blank=True, default=timezone.now)
    created_at = models.DateTimeField(auto_now_add=True)
    delivered_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        indexes = [models.Index(fields=["status", "next_attempt_at"], name="webhook_due")]

    def __str__(self) -> str:
        return f"{self.event_type} → {self.endpoint_id} ({self.status})"

    def claim(self, lease: timedelta) -> bool:
        """Take the attempt that is due; False if it is not due, done, or another worker has it.

        The claim pushes ``next_attempt_at`` past the lease, so a worker that dies mid-attempt
        leaves a delivery that is due again once the lease runs out.
        """
        now = timezone.now()
        claimed = WebhookDelivery.objects.filter(
            pk=self.pk, status=self.Status.PENDING, next_attempt_at__lte=now
        ).update(next_attempt_at=now + lease)
        return claimed == 1

    def record_attempt(self, attempt: dict, retry_delays: list[int]) -> None:
        """Log one attempt; a 2xx answer delivers it, else it waits its turn or gives up."""
        code = attempt["response_code"]
        now = timezone.now()
        self.attempts += 1
        self.attempts_log = [*self.attempts_log, attempt]
        self.last_response_code = code
        self.last_error = attempt["error"]
        if code is not None and 200 <= code < 300:
            self.status, self.delivered_at, self.next_attempt_at = self.Status.SUCCEEDED, now, None
        elif self.attempts > len(retry_delays):
            self.status, self.next_attempt_at = self.Status.FAILED, None
        else:
            self.next_attempt_at = now + timedelta(seconds=retry_delays[self.attempts - 1])
        self.save(
            update_fields=[
                "attempts",
                "attempts_log",
                "last_response_code",
                "last_error",
                "status",
                "delivered_at",
                "next_attempt_at",
            ]
        )
