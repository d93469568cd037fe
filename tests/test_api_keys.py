"""API keys: shown once, stored only as a hash, revocable, and the only way into /v1."""

import io
from contextlib import redirect_stderr

import pytest
from django.core.management import call_command
from django.db import connection

from loft.models import ApiKey, hash_api_key
from tests.helpers import api_client_for

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


def test_creating_a_key_through_the_api_shows_the_secret_once(api_a):
    created = api_a.post("/v1/api_keys", {"name": "ci"}, format="json")
    assert created.status_code == 201
    secret = created.json()["value"]
    assert secret.startswith("sk-loft-")
    listed = api_a.get("/v1/api_keys").json()["data"]
    assert all("value" not in key for key in listed)
    assert any(key["id"] == created.json()["id"] for key in listed)
    assert api_client_for(secret).get("/v1/models").status_code == 200


def test_deleting_a_key_revokes_it(api_a, tenant_a):
    response = api_a.delete(f"/v1/api_keys/{tenant_a.key.id}")
    assert response.status_code == 200
    assert response.json()["deleted"] is True
    assert api_client_for(tenant_a.secret).get("/v1/models").status_code == 401


def test_create_api_key_prints_the_key_alone_on_the_last_line():
    out = io.StringIO()
    with redirect_stderr(io.StringIO()):
        call_command("create_api_key", "--org", "new-team", "--name", "laptop", stdout=out)
    secret = out.getvalue().strip().splitlines()[-1]
    key = ApiKey.find_active(secret)
    assert key is not None and key.org.slug == "new-team" and key.name == "laptop"
    assert api_client_for(secret).get("/v1/models").status_code == 200
