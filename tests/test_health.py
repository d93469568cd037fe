"""/healthz names each part and answers 503 when one is down."""

import pytest
from django.test import Client

from loft import health

pytestmark = pytest.mark.django_db


@pytest.mark.slow  # the session's Celery worker
def test_all_parts_ok_with_a_live_worker(celery_worker):
    response = Client().get("/healthz")
    assert response.status_code == 200, response.json()
    body = response.json()
    assert body == {
        "status": "ok",
        "database": "ok",
        "broker": "ok",
        "storage": "ok",
        "workers": body["workers"],
    }
    assert body["workers"] >= 1


def test_it_answers_503_naming_the_broker_when_the_broker_is_stopped(embedded_stack):
    if "broker" not in embedded_stack.children:
        pytest.skip("the broker is an external service here; this test stops the embedded one")
    embedded_stack.stop_service("broker")
    try:
        response = Client().get("/healthz")
        body = response.json()
        assert response.status_code == 503
        assert body["status"] == "error"
        assert body["failing"] == ["broker"]
        assert body["broker"].startswith("error")
        assert body["database"] == "ok" and body["storage"] == "ok"
        assert body["workers"] == 0
    finally:
        embedded_stack.start_service("broker")
    assert Client().get("/healthz").status_code == 200


def test_it_answers_503_naming_storage_when_s3_is_unreachable(settings):
    health.storage._probe_client.cache_clear()
    settings.S3_ENDPOINT_URL = "http://127.0.0.1:9"  # discard port: nothing listens
    try:
        response = Client().get("/healthz")
    finally:
        health.storage._probe_client.cache_clear()
    assert response.status_code == 503
    assert response.json()["failing"] == ["storage"]


def test_it_needs_no_authentication_and_only_answers_get():
    assert Client().post("/healthz").status_code == 405
