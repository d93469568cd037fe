"""The OpenAPI schema is served, public, describes every /v1 route, and has a docs page."""

import pytest
from rest_framework.test import APIClient


@pytest.mark.django_db
def test_the_schema_is_served_and_describes_the_v1_routes():
    response = APIClient().get("/v1/openapi.json")
    assert response.status_code == 200
    schema = response.json()
    paths = schema["paths"]
    for path in [
        "/v1/files",
        "/v1/files/{id}",
        "/v1/files/{id}/content",
        "/v1/models",
        "/v1/models/{model}",
        "/v1/api_keys",
        "/v1/fine_tuning/jobs",
        "/v1/fine_tuning/jobs/{id}",
        "/v1/fine_tuning/jobs/{id}/cancel",
        "/v1/fine_tuning/jobs/{id}/events",
        "/v1/fine_tuning/jobs/{id}/checkpoints",
        "/v1/adapters",
        "/v1/adapters/{id}/download",
        "/v1/usage",
        "/v1/webhook_endpoints",
    ]:
        assert path in paths, sorted(paths)
    assert schema["components"]["securitySchemes"]["apiKey"]["scheme"] == "bearer"
    listed = paths["/v1/fine_tuning/jobs"]["get"]["responses"]["200"]["content"]
    ref = listed["application/json"]["schema"]["$ref"].rsplit("/", 1)[-1]
    assert {"object", "data", "has_more"} <= set(schema["components"]["schemas"][ref]["properties"])


@pytest.mark.django_db
def test_the_docs_page_is_served_with_its_own_assets(client):
    page = client.get("/docs")
    assert page.status_code == 200
    html = page.content.decode()
    assert "/v1/openapi.json" in html and "swagger-ui" in html
    assert "cdn." not in html and "unpkg" not in html
