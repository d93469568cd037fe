"""API keys: shown once, stored only as a hash, revocable, and the only way into /v1; created
and revoked only by owners and by keys made for that (the manage_keys scope)."""

import io
from contextlib import redirect_stderr

import pytest
from django.core.management import CommandError, call_command
from django.db import connection

from loft.models import ApiKey, Membership, hash_api_key
from tests.helpers import api_client_for, signed_in

pytestmark = pytest.mark.django_db


def test_the_secret_is_not_stored_anywhere_in_the_row(tenant_a):
    with connection.cursor() as cursor:
        cursor.execute("SELECT * FROM loft_apikey WHERE id = %s", [tenant_a.key.id])
        row = cursor.fetchone()
    stored = " ".join(str(value) for value in row)
    assert tenant_a.secret not in stored
    assert tenant_a.secret[len(tenant_a.key.prefix) :] not in stored
    assert hash_api_key(tenant_a.secret) in stored
    assert tenant_a.secret.startswith(tenant_a.key.prefix)


def test_a_valid_key_lists_models_and_records_its_use(api_a, tenant_a):
    response = api_a.get("/v1/models")
    assert response.status_code == 200
    tenant_a.key.refresh_from_db()
    assert tenant_a.key.last_used_at is not None


def test_a_revoked_key_gets_401_in_openais_error_shape(tenant_a):
    tenant_a.key.revoke()
    response = api_client_for(tenant_a.secret).get("/v1/models")
    assert response.status_code == 401
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == "invalid_api_key"
    assert error["type"] == "invalid_request_error"
    assert "Incorrect API key" in error["message"]
    assert tenant_a.secret not in error["message"]


@pytest.mark.parametrize("header", [None, "Bearer ", "Bearer sk-loft-madeup", "Basic Zm9vOmJhcg=="])
def test_a_missing_or_unknown_key_gets_401(header):
    from rest_framework.test import APIClient

    client = APIClient()
    if header is not None:
        client.credentials(HTTP_AUTHORIZATION=header)
    response = client.get("/v1/models")
    assert response.status_code == 401
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_a_key_of_a_disabled_organization_is_refused(tenant_a, api_a):
    tenant_a.org.is_active = False
    tenant_a.org.save()
    assert api_a.get("/v1/models").status_code == 401


def key_manager_of(tenant):
    """A client with a key of the tenant's organization created with the manage_keys scope."""
    _, secret = ApiKey.issue(tenant.org, name="keys", scope=ApiKey.Scope.MANAGE_KEYS)
    return api_client_for(secret)


def test_creating_a_key_through_the_api_shows_the_secret_once(tenant_a, api_a):
    created = key_manager_of(tenant_a).post("/v1/api_keys", {"name": "ci"}, format="json")
    assert created.status_code == 201
    secret = created.json()["value"]
    assert secret.startswith("sk-loft-")
    assert created.json()["scope"] == "standard"
    listed = api_a.get("/v1/api_keys").json()["data"]
    assert all("value" not in key for key in listed)
    assert any(key["id"] == created.json()["id"] for key in listed)
    assert api_client_for(secret).get("/v1/models").status_code == 200


def test_deleting_a_key_revokes_it(tenant_a):
    response = key_manager_of(tenant_a).delete(f"/v1/api_keys/{tenant_a.key.id}")
    assert response.status_code == 200
    assert response.json()["deleted"] is True
    assert api_client_for(tenant_a.secret).get("/v1/models").status_code == 401


def test_an_everyday_key_can_neither_create_nor_revoke_keys(api_a, tenant_a):
    """A leaked key must not mint itself successors, nor revoke its owners' keys."""
    created = api_a.post("/v1/api_keys", {"name": "successor"}, format="json")
    assert created.status_code == 403
    error = created.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert "manage_keys" in error["message"]
    other, _ = ApiKey.issue(tenant_a.org, name="other")
    assert api_a.delete(f"/v1/api_keys/{other.id}").status_code == 403
    other.refresh_from_db()
    assert other.is_active
    assert ApiKey.objects.for_org(tenant_a.org).count() == 2
    # Reading the list stays open to every key.
    assert api_a.get("/v1/api_keys").status_code == 200


def test_a_manage_keys_key_can_make_another_of_its_scope_and_a_bad_scope_is_named(tenant_a):
    manager = key_manager_of(tenant_a)
    created = manager.post("/v1/api_keys", {"name": "ci", "scope": "manage_keys"}, format="json")
    assert created.status_code == 201 and created.json()["scope"] == "manage_keys"
    bad = manager.post("/v1/api_keys", {"name": "ci", "scope": "everything"}, format="json")
    assert bad.status_code == 400
    assert bad.json()["error"]["param"] == "scope"


def test_through_a_session_only_owners_create_and_revoke_keys(tenant_a, member_a):
    member = signed_in(member_a)
    assert member.post("/v1/api_keys", {"name": "m"}, "application/json").status_code == 403
    assert member.delete(f"/v1/api_keys/{tenant_a.key.id}").status_code == 403
    owner = signed_in(tenant_a)
    created = owner.post("/v1/api_keys", {"name": "o"}, "application/json")
    assert created.status_code == 201
    assert owner.delete(f"/v1/api_keys/{created.json()['id']}").status_code == 200


def test_create_api_key_prints_the_key_alone_on_the_last_line():
    out = io.StringIO()
    with redirect_stderr(io.StringIO()):
        call_command("create_api_key", "--org", "new-team", "--name", "laptop", stdout=out)
    secret = out.getvalue().strip().splitlines()[-1]
    key = ApiKey.find_active(secret)
    assert key is not None and key.org.slug == "new-team" and key.name == "laptop"
    assert api_client_for(secret).get("/v1/models").status_code == 200


def test_create_api_key_with_owner_makes_that_user_an_owner(django_user_model):
    """The README's first run: `createsuperuser`, then this, and the superuser signs in to the
    organization (tests/test_deployment.py runs the README's own lines)."""
    admin = django_user_model.objects.create_superuser("root", password="pw-for-tests-1")
    with redirect_stderr(io.StringIO()) as said:
        call_command("create_api_key", "--org", "my-team", "--owner", "root", stdout=io.StringIO())
    membership = Membership.objects.get(user=admin)
    assert (membership.org.slug, membership.role) == ("my-team", Membership.Role.OWNER)
    assert "root is an owner of my-team." in said.getvalue()
    key = ApiKey.objects.get(org=membership.org)
    assert key.created_by == admin and key.scope == ApiKey.Scope.STANDARD


def test_create_api_key_refuses_an_unknown_owner_and_creates_nothing():
    with pytest.raises(CommandError, match="There is no user named 'nobody'"):
        call_command("create_api_key", "--org", "ghost-team", "--owner", "nobody")
    assert not ApiKey.objects.filter(org__slug="ghost-team").exists()
