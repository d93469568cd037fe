"""The OpenAPI schema is served and describes the /v1 routes."""

import pytest


@pytest.mark.django_db
def test_the_schema_is_served_to_an_authenticated_caller(api_a):
    response = api_a.get("/v1/openapi.json", HTTP_ACCEPT="application/json")
    assert response.status_code == 200
    paths = response.json()["paths"]
    for path in [
        "/v1/files",
        "/v1/files/{id}",
        "/v1/files/{id}/content",
        "/v1/models",
        "/v1/api_keys",
    ]:
        assert path in paths, sorted(paths)
