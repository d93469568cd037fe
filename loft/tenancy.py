"""Tenant scoping in one place.

Every tenant-owned model subclasses ``TenantOwnedModel``; every query a request makes for such
rows goes through ``Model.objects.for_org(org)`` (API views do it in ``TenantScopedViewSet``).
An id that belongs to another tenant is then simply not found: 404, never 403, in lists too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from django.db import models
from django.http import HttpRequest

from loft.observability import bind_log_fields

if TYPE_CHECKING:
    from loft.models import Organization

SESSION_ORG_KEY = "loft_org_id"


class TenantQuerySet(models.QuerySet):
    def for_org(self, org: Organization | None) -> TenantQuerySet:
        if org is None:
            return self.none()
        return self.filter(org=org)


class TenantOwnedModel(models.Model):
    org = models.ForeignKey("loft.Organization", on_delete=models.CASCADE, related_name="+")

    objects = TenantQuerySet.as_manager()

    class Meta:
        abstract = True


def current_org(request: HttpRequest) -> Organization | None:
    """The organization a request acts for: the API key's, or the signed-in member's."""
    from loft.models import ApiKey, Membership

    auth = getattr(request, "auth", None)
    if isinstance(auth, ApiKey):
        bind_log_fields(org_id=auth.org_id)
        return auth.org
    user = getattr(request, "user", None)
    if user is None or not user.is_authenticated:
        return None
    memberships = Membership.objects.filter(user=user, org__is_active=True).select_related("org")
    chosen = request.session.get(SESSION_ORG_KEY) if hasattr(request, "session") else None
    membership = (chosen and memberships.filter(org_id=chosen).first()) or memberships.order_by(
        "created_at"
    ).first()
    if membership is None:
        return None
    bind_log_fields(org_id=membership.org_id)
    return membership.org


def org_or_404(request: HttpRequest) -> Organization:
    """The request's organization, or a 404 for a signed-in person who belongs to none."""
    from django.http import Http404

    org = current_org(request)
    if org is None:
        raise Http404("You are not a member of an organization.")
    return org


def current_org_context(request: HttpRequest) -> dict:
    """Template context processor: ``org`` for the page header and navigation."""
    return {"org": current_org(request)}
