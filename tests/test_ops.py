"""Operations: a live worker's heartbeat on /ops/, the admin's cancel and retry on real jobs,
the staff-only walls, and JSON logs naming the job and the organization."""

import json
import logging

import pytest
from prometheus_client.parser import text_string_to_metric_families

from jobs.models import WorkerHeartbeat
from loft.observability import JsonFormatter, log_fields
from tests.helpers import WorkerProcess, admin_action, banana_file, finished, submit, wait_for

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.mark.slow
def test_a_live_workers_heartbeat_shows_on_the_ops_page_with_device_and_memory(
    staff_client, tmp_path, private_queue
):
    worker = WorkerProcess(
        tmp_path, "watched", private_queue, LOFT_WORKER_HEARTBEAT_SECONDS="1"
    ).start()
    try:
        row = wait_for(
            lambda: WorkerHeartbeat.objects.filter(hostname__startswith="watched@").first(),
            timeout=30,
            what="the worker's first heartbeat",
        )
        first_seen = row.last_seen
        row = wait_for(
            lambda: WorkerHeartbeat.objects.filter(pk=row.pk, last_seen__gt=first_seen).first(),
            timeout=10,
            what="a second heartbeat within the interval",
        )
        assert row.pid == worker.process.pid
        assert row.queues == [private_queue]
        assert row.device.startswith("cpu") and row.memory_used_bytes > 50 * 2**20
        assert row.memory_total_bytes > row.memory_used_bytes

        page = staff_client.get("/ops/")
        assert page.status_code == 200
        html = page.content.decode()
        assert row.hostname in html and "online" in html and row.device in html
        assert "MB" in html  # memory used / total, as sizes
        assert staff_client.get("/ops/live").status_code == 200

        metrics = {
            family.name: family
            for family in text_string_to_metric_families(
                staff_client.get("/metrics").content.decode()
            )
        }
        assert metrics["loft_workers_online"].samples[0].value >= 1
    finally:
        worker.stop()
    # A clean shutdown says so at once.
    row.refresh_from_db()
    assert row.stopped_at is not None
    assert "stopped" in staff_client.get("/ops/live").content.decode()
    # The worker's own log lines are JSON.
    lines = [line for line in worker.log.read_text().splitlines() if line.startswith("{")]
    assert any(json.loads(line)["message"].endswith(" ready.") for line in lines)


@pytest.mark.slow
def test_the_admins_cancel_stops_a_running_job(staff_client, tenant_a, tmp_path, private_queue):
    """(Retry, and cancel on a waiting job: tests/test_chaos.py, after the time limit.)"""
    worker = WorkerProcess(tmp_path, "cancelled", private_queue).start()
    try:
        running = submit(tenant_a, banana_file(tenant_a), max_steps=200, checkpoint_every=1000)
        wait_for(running, lambda j: j.progress.get("step", 0) >= 1, what="the first step")
        admin_action(staff_client, "cancel", running)
        running = wait_for(running, finished, timeout=60, what="the running job to stop")
    finally:
        worker.stop()
    assert running.status == "cancelled" and running.progress["step"] < 200
    assert [a.outcome for a in running.attempts.all()] == ["cancelled"]


def test_staff_only_pages_answer_403_to_members_and_send_anonymous_visitors_to_sign_in(
    client, tenant_a
):
    client.force_login(tenant_a.user)
    for path in ("/ops/", "/ops/live", "/metrics", "/admin/", "/admin/jobs/finetunejob/"):
        assert client.get(path).status_code == 403, path
    assert client.get("/admin/login/").status_code == 403
    client.logout()
    assert client.get("/ops/")["Location"].startswith("/login")
    assert client.get("/admin/")["Location"].startswith("/admin/login/")
    assert client.get("/metrics").status_code == 403


def test_an_empty_ops_page_still_reads_well(staff_client):
    html = staff_client.get("/ops/").content.decode()
    assert "No job failed in the last 24 hours." in html
    assert "No jobs in the last 24 hours." in html


def test_json_log_lines_carry_the_bound_ids_and_the_callers_extras(caplog):
    logger = logging.getLogger("loft.test")
    with caplog.at_level(logging.INFO), log_fields(job_id="ftjob-1", org_id="org-1"):
        logger.info("step %d", 3, extra={"loss": 0.5})
    logger.info("outside")
    record = caplog.records[0]
    line = json.loads(JsonFormatter().format(record))
    assert line["message"] == "step 3" and line["loss"] == 0.5
    assert line["job_id"] == "ftjob-1" and line["org_id"] == "org-1"
    assert line["level"] == "INFO" and line["logger"] == "loft.test"


def test_each_request_is_logged_as_json_with_its_route_status_time_and_organization(
    api_a, tenant_a, caplog
):
    with caplog.at_level(logging.INFO, logger="loft.requests"):
        assert api_a.get("/v1/files").status_code == 200
    record = next(r for r in caplog.records if r.name == "loft.requests")
    line = json.loads(JsonFormatter().format(record))
    assert line["path"] == "/v1/files" and line["status"] == 200
    assert line["org_id"] == tenant_a.org.id and line["duration_ms"] >= 0
    assert "files" in line["route"]
