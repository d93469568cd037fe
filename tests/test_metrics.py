"""``/metrics``: Prometheus text that prometheus_client's own parser reads, for staff or a
scraper's token only."""

import pytest
from django.conf import settings
from django.utils import timezone
from prometheus_client.parser import text_string_to_metric_families

from jobs import ops
from jobs.models import File, FineTuneJob, InferenceUsage
from jobs.tasks import training_queue
from tests.helpers import chat_rows, jsonl, upload

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("private_queue")]


def families(text: str) -> dict:
    return {family.name: family for family in text_string_to_metric_families(text)}


def test_metrics_show_jobs_by_status_queues_durations_and_uploads(client, staff, api_a, tenant_a):
    file_id = upload(api_a, jsonl(chat_rows(8))).json()["id"]
    submitted = [
        FineTuneJob.submit(
            org=tenant_a.org,
            training_file=File.objects.get(pk=file_id),
            hyperparameters={"max_steps": 1, "batch_size": 2, "max_seq_length": 128},
        )
        for _ in range(2)
    ]
    # One of them finished, its time spent phase by phase (worker/training.py PhaseClock).
    timings = {"attempt": 1, "queue": 0.5, "setup": 2.0, "training": 20.0, "evaluation": 7.0}
    FineTuneJob.objects.filter(pk=submitted[0].pk).update(
        status="succeeded", finished_at=timezone.now(), timings={**timings, "upload": 1.0}
    )
    client.force_login(staff)
    response = client.get("/metrics")
    assert response.status_code == 200
    found = families(response.content.decode())
    jobs = {s.labels["status"]: s.value for s in found["loft_jobs"].samples}
    assert jobs["queued"] == 1 and jobs["succeeded"] == 1
    queues = {s.labels["queue"] for s in found["loft_queue_depth"].samples}
    # Each known worker class's training queue too (here the embedded one's, under the
    # test's private prefix).
    assert queues >= {
        "inference",
        "default",
        "webhooks",
        training_queue(settings.LOFT_WORKER_CLASS),
    }
    assert "loft_job_duration_seconds" in found
    phases = found["loft_job_phase_seconds"].samples
    buckets = [s for s in phases if s.name.endswith("_bucket")]
    training = {s.labels["le"]: s.value for s in buckets if s.labels["phase"] == "training"}
    assert training["15"] == 0 and training["30"] == 1 and training["+Inf"] == 1
    sums = {s.labels["phase"]: s.value for s in phases if s.name.endswith("_sum")}
    assert sums == {"queue": 0.5, "setup": 2.0, "training": 20.0, "evaluation": 7.0, "upload": 1.0}
    assert found["loft_uploaded_bytes"].samples[0].value > 0
    assert found["loft_training_tokens_per_second"].samples[0].value == 0
    assert "loft_workers_online" in found
    # The upload above was timed, under its route rather than its path.
    latency = found["loft_http_request_duration_seconds"].samples
    routes = {s.labels["route"] for s in latency if s.name.endswith("_count")}
    assert any("files" in route for route in routes), routes


def test_metrics_refuse_anyone_but_staff_or_the_token(client, tenant_a, settings):
    assert client.get("/metrics").status_code == 403
    client.force_login(tenant_a.user)  # an owner of an organization, not an operator
    assert client.get("/metrics").status_code == 403
    client.logout()
    settings.LOFT_METRICS_TOKEN = "scrape-me"
    assert client.get("/metrics", HTTP_AUTHORIZATION="Bearer wrong").status_code == 403
    assert client.get("/metrics", HTTP_AUTHORIZATION="Bearer scrape-me").status_code == 200


def test_request_timings_name_only_a_fixed_set_of_methods(client, staff_client):
    for method in ["BREW", "PROPFIND", "X" * 40]:
        assert client.generic(method, "/healthz").status_code == 405
    client.get("/healthz")
    found = families(staff_client.get("/metrics").content.decode())
    latency = found["loft_http_request_duration_seconds"].samples
    methods = {s.labels["method"] for s in latency}
    assert {"GET", "other"} <= methods
    assert methods <= {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "other"}


def test_metrics_count_answered_inference_requests_and_their_tokens(staff_client, tenant_a):
    before = families(staff_client.get("/metrics").content.decode())
    assert before["loft_inference_requests"].samples[0].value == 0
    InferenceUsage.record(tenant_a.org.id, "support-bot", "ft-abc", "support-bot", 100, 20)
    InferenceUsage.record(tenant_a.org.id, "SmolLM2-135M-Instruct", None, None, 5, 1)

    found = families(staff_client.get("/metrics").content.decode())
    requests = found["loft_inference_requests"]
    assert requests.type == "counter"
    assert [(s.name, s.value) for s in requests.samples] == [("loft_inference_requests_total", 2)]
    tokens = {s.labels["kind"]: s.value for s in found["loft_inference_tokens"].samples}
    assert tokens == {"prompt": 105, "completion": 21}
    # Per organization, on the operators' page only (as trained tokens).
    row = next(t for t in ops.tenants() if t.org == tenant_a.org)
    assert row.inference_tokens_month == 126
    assert "126" in staff_client.get("/ops/live").content.decode()
