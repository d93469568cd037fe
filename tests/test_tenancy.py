"""Tenants are walls: another tenant's id is not found, in detail views and lists alike."""

import pytest
from django.apps import apps
from rest_framework.test import APIClient

from loft.models import ApiKey
from loft.tenancy import TenantOwnedModel

pytestmark = pytest.mark.django_db


def test_org_bs_key_gets_404_for_org_as_key(api_b, tenant_a):
    response = api_b.get(f"/v1/api_keys/{tenant_a.key.id}")
    assert response.status_code == 404
    assert response.json()["error"]["message"] == f"No such API key: {tenant_a.key.id}"


def test_org_bs_member_signed_in_gets_404_for_org_as_objects(tenant_a, tenant_b):
    browser = APIClient()
    assert browser.login(username=tenant_b.user.username, password="pw-for-tests-1")
    assert browser.get(f"/v1/api_keys/{tenant_a.key.id}").status_code == 404
    assert browser.get(f"/v1/api_keys/{tenant_b.key.id}").status_code == 200


def test_org_b_cannot_revoke_org_as_key(api_b, tenant_a):
    assert api_b.delete(f"/v1/api_keys/{tenant_a.key.id}").status_code == 404
    tenant_a.key.refresh_from_db()
    assert tenant_a.key.is_active


def test_lists_hold_only_the_callers_rows(api_a, api_b, tenant_a, tenant_b):
    ids_b = {key["id"] for key in api_b.get("/v1/api_keys").json()["data"]}
    assert ids_b == {tenant_b.key.id}
    ids_a = {key["id"] for key in api_a.get("/v1/api_keys").json()["data"]}
    assert ids_a == {tenant_a.key.id}


def test_a_signed_in_user_without_an_organization_is_refused(django_user_model):
    django_user_model.objects.create_user("loner", password="pw-for-tests-1")
    browser = APIClient()
    browser.login(username="loner", password="pw-for-tests-1")
    response = browser.get("/v1/api_keys")
    assert response.status_code == 403
    assert "not a member" in response.json()["error"]["message"]


def test_every_model_with_an_org_goes_through_the_tenant_queryset():
    """A new tenant-owned model must subclass TenantOwnedModel to get ``for_org``. (A model with
    one row per organization, keyed by it, such as Quota, is reached through the org itself.)"""
    for model in apps.get_models():
        if model._meta.app_label not in {"loft", "jobs"}:
            continue
        fields = {field.name: field for field in model._meta.get_fields()}
        if "org" in fields and fields["org"].one_to_one:
            continue
        if "org" in fields and model.__name__ != "Organization":
            assert issubclass(model, TenantOwnedModel), model
            assert hasattr(model.objects, "for_org"), model


def test_pages_list_newest_first_with_after_and_limit(api_a, tenant_a):
    created = [ApiKey.issue(tenant_a.org, name=f"k{i}")[0].id for i in range(3)]
    first = api_a.get("/v1/api_keys", {"limit": 2}).json()
    assert [key["id"] for key in first["data"]] == created[::-1][:2]
    assert first["has_more"] is True
    rest = api_a.get("/v1/api_keys", {"limit": 2, "after": first["last_id"]}).json()
    assert rest["has_more"] is False
    assert len(rest["data"]) == 2  # the third created key and the fixture's key
    bad = api_a.get("/v1/api_keys", {"limit": 0})
    assert bad.status_code == 400
    assert bad.json()["error"]["param"] == "limit"
