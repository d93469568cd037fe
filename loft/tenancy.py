"""Tenant scoping in one place.

Every tenant-owned model subclasses ``TenantOwnedModel``; every query a request makes for such
rows goes through ``Model.objects.for_org(org)`` (API views do it in ``TenantScopedViewSet``).
An id that belongs to another tenant is then simply not found: 404, never 403, in lists too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING
from urllib.parse import urlencode

from django.db import models
from django.http import Http404, HttpRequest
from django.shortcuts import redirect
from django.urls import reverse

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


class NoOrganization(Http404):
    """A signed-in person who belongs to no active organization asked for one of its pages."""


def org_or_404(request: HttpRequest) -> Organization:
    """The request's organization. A signed-in person who belongs to none is sent to the page
    that says so (``NoOrganizationMiddleware``); anything else that catches Http404 sees one."""
    org = current_org(request)
    if org is None:
        raise NoOrganization("You are not a member of an organization.")
    return org


class NoOrganizationMiddleware:
    """Turns ``NoOrganization`` into a redirect to /account/organization, which says why the
    page is not there and what to do: answer an invitation, or (staff) create or join one."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        return self.get_response(request)

    def process_exception(self, request, exception):
        if not isinstance(exception, NoOrganization):
            return None
        target = reverse("account-organization")
        if request.method == "GET":
            target += "?" + urlencode({"next": request.get_full_path()})
        return redirect(target)


def current_org_context(request: HttpRequest) -> dict:
    """Template context processor: ``org`` for the page header and navigation."""
    return {"org": current_org(request)}
