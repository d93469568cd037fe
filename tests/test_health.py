"""/healthz answers 503 when a part is down; anyone hears only that, operators hear which part
and why, and how many workers are live."""

import time

import pytest
from django.test import Client

from loft import health

pytestmark = pytest.mark.django_db


@pytest.fixture
def fresh_worker_count():
    """Each test counts the workers anew, not from an earlier test's cached count."""
    health._worker_count = None
    yield
    health._worker_count = None


@pytest.mark.slow  # the session's Celery worker
def test_all_parts_ok_with_a_live_worker(celery_worker, staff_client, fresh_worker_count):
    response = staff_client.get("/healthz")
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


def test_anyone_hears_only_the_status_and_operators_hear_the_parts(
    staff_client, settings, fresh_worker_count
):
    assert Client().get("/healthz").json() == {"status": "ok"}
    assert set(staff_client.get("/healthz").json()) >= {"database", "broker", "storage", "workers"}
    settings.LOFT_METRICS_TOKEN = "scrape-me"
    as_scraper = Client().get("/healthz", HTTP_AUTHORIZATION="Bearer scrape-me").json()
    assert "workers" in as_scraper
    assert Client().get("/healthz", HTTP_AUTHORIZATION="Bearer wrong").json() == {"status": "ok"}


def test_the_worker_count_is_pinged_for_operators_only_and_kept_briefly(
    staff_client, fresh_worker_count
):
    started = time.monotonic()
    Client().get("/healthz")
    assert time.monotonic() - started < health.WORKER_PING_SECONDS, "anyone's call pings no one"

    started = time.monotonic()
    staff_client.get("/healthz")
    assert time.monotonic() - started >= health.WORKER_PING_SECONDS, "the first count pings"
    started = time.monotonic()
    staff_client.get("/healthz")
    assert time.monotonic() - started < health.WORKER_PING_SECONDS, "the next one is kept"


def test_it_answers_503_naming_the_broker_when_the_broker_is_stopped(
    embedded_stack, staff_client, fresh_worker_count
):
    if "broker" not in embedded_stack.children:
        pytest.skip("the broker is an external service here; this test stops the embedded one")
    embedded_stack.stop_service("broker")
    try:
        anyone = Client().get("/healthz")
        response = staff_client.get("/healthz")
    finally:
        embedded_stack.start_service("broker")
    assert anyone.status_code == 503 and anyone.json() == {"status": "error"}
    body = response.json()
    assert response.status_code == 503
    assert body["status"] == "error"
    assert body["failing"] == ["broker"]
    assert body["broker"].startswith("error")
    assert body["database"] == "ok" and body["storage"] == "ok"
    assert body["workers"] == 0
    assert Client().get("/healthz").status_code == 200


def test_it_answers_503_naming_storage_when_s3_is_unreachable(settings, staff_client):
    health.storage._probe_client.cache_clear()
    settings.S3_ENDPOINT_URL = "http://127.0.0.1:9"  # discard port: nothing listens
    try:
        anyone = Client().get("/healthz")
        response = staff_client.get("/healthz")
    finally:
        health.storage._probe_client.cache_clear()
    assert anyone.status_code == 503 and anyone.json() == {"status": "error"}
    assert "127.0.0.1" not in anyone.content.decode()
    assert response.status_code == 503
    assert response.json()["failing"] == ["storage"]


def test_it_needs_no_authentication_and_only_answers_get():
    assert Client().post("/healthz").status_code == 405
