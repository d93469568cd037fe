"""The periodic tasks beat runs: abandoned multipart uploads aborted, objects no row owns
swept (and only those), the monthly usage roll-up; and the schedule wiring them."""

import time
from datetime import timedelta

import pytest
from django.conf import settings
from django.utils import timezone

from jobs.models import (
    BaseModel,
    BaseScores,
    Checkpoint,
    File,
    FineTuneJob,
    InferenceUsage,
    MonthlyUsage,
    UsageRecord,
    month_start,
)
from loft import storage
from loft.celery import app
from worker import maintenance

pytestmark = pytest.mark.django_db


def test_every_scheduled_task_exists_and_goes_to_the_maintenance_queue():
    names = {entry["task"] for entry in settings.CELERY_BEAT_SCHEDULE.values()}
    assert {
        "worker.tasks.reap_stale_jobs",
        "worker.tasks.abort_abandoned_uploads",
        "worker.tasks.sweep_orphan_objects",
        "worker.tasks.roll_up_usage",
        "worker.tasks.forget_unused_base_scores",
    } <= names
    app.loader.import_default_modules()
    assert names <= set(app.tasks)
    for entry in settings.CELERY_BEAT_SCHEDULE.values():
        assert entry["options"]["queue"] == settings.LOFT_MAINTENANCE_QUEUE


def test_an_abandoned_multipart_upload_is_aborted(tenant_a):
    client, bucket = storage.client(), settings.S3_BUCKET
    key = f"orgs/{tenant_a.org.id}/files/file-abandoned/data"
    upload_id = client.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
    client.upload_part(Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=1, Body=b"x" * 100)

    def still_open():
        return any(u == upload_id for _, u, _ in storage.open_multipart_uploads())

    assert still_open()
    assert maintenance.abort_abandoned_uploads(older_than=timedelta(hours=1)) == 0
    assert still_open()  # too young to be called abandoned
    time.sleep(1.5)  # S3 reports when an upload began to the second
    assert maintenance.abort_abandoned_uploads(older_than=timedelta(seconds=1)) >= 1
    assert not still_open()


def test_the_sweep_deletes_old_objects_no_row_owns_and_keeps_the_rest(tenant_a, tenant_b):
    org, other = tenant_a.org, tenant_b.org
    owned = File.objects.create(
        org=org, filename="kept.jsonl", purpose="fine-tune", bytes=4, s3_key="x"
    )
    keys = {
        "owned": f"orgs/{org.id}/files/{owned.id}/data",
        "no_row": f"orgs/{org.id}/files/file-ghost/data",
        "other_tenants_path": f"orgs/{other.id}/files/{owned.id}/data",
        "unknown_kind": f"orgs/{org.id}/scratch/thing/data",
    }
    for key in keys.values():
        storage.put_bytes(key, b"data")

    assert maintenance.sweep_orphan_objects(prefix=f"orgs/{org.id}/") == 0  # all too young
    time.sleep(1.5)  # S3 dates objects to the second
    old = timedelta(seconds=1)
    deleted = maintenance.sweep_orphan_objects(old, prefix=f"orgs/{org.id}/")
    deleted += maintenance.sweep_orphan_objects(old, prefix=f"orgs/{other.id}/")
    assert deleted == 2
    left = set(storage.list_keys(f"orgs/{org.id}/")) | set(storage.list_keys(f"orgs/{other.id}/"))
    assert left == {keys["owned"], keys["unknown_kind"]}


def test_the_sweep_deletes_a_live_jobs_checkpoints_that_no_row_records(tenant_a):
    """An attempt that died, or was fenced off, between its upload and its row leaves files
    under a job that still exists; only the recorded checkpoint's stay."""
    org = tenant_a.org
    training = File.objects.create(
        org=org, filename="t.jsonl", purpose="fine-tune", bytes=4, s3_key="x"
    )
    job = FineTuneJob.objects.create(
        org=org, base_model=BaseModel.default(), training_file=training
    )
    recorded = f"{job.s3_prefix}checkpoints/attempt-2/step-4/"
    Checkpoint.objects.create(job=job, step=4, attempt=2, s3_prefix=recorded)
    keys = {
        "recorded": f"{recorded}manifest.json",
        "stale_attempt": f"{job.s3_prefix}checkpoints/attempt-1/step-4/adapter_model.safetensors",
        "unrecorded_step": f"{job.s3_prefix}checkpoints/attempt-2/step-6/manifest.json",
        "not_a_checkpoint": f"{job.s3_prefix}notes/readme.txt",
    }
    for key in keys.values():
        storage.put_bytes(key, b"data")
    time.sleep(1.5)  # S3 dates objects to the second
    assert maintenance.sweep_orphan_objects(timedelta(seconds=1), prefix=job.s3_prefix) == 2
    assert set(storage.list_keys(job.s3_prefix)) == {keys["recorded"], keys["not_a_checkpoint"]}


def test_kept_base_results_nobody_read_for_a_month_are_deleted(tenant_a):
    def kept(key: str, days_unused: int, used: bool) -> None:
        long_ago = timezone.now() - timedelta(days=days_unused)
        row = BaseScores.objects.create(
            key=key, kind="probes", base_model=BaseModel.default(), inputs={}, result={}
        )
        BaseScores.objects.filter(pk=row.pk).update(
            created_at=long_ago if not used else long_ago - timedelta(days=90),
            last_used_at=long_ago if used else None,
        )

    kept("old-never-read", 40, used=False)
    kept("read-long-ago", 31, used=True)
    kept("read-lately", 2, used=True)  # made long ago, read two days ago
    kept("new", 0, used=False)
    assert maintenance.forget_unused_base_scores() == 2
    assert sorted(BaseScores.objects.values_list("key", flat=True)) == ["new", "read-lately"]


def test_the_monthly_roll_up_sums_each_organizations_ledger_and_can_run_again(tenant_a, tenant_b):
    this_month = month_start()
    last_month = month_start(this_month - timedelta(days=1))
    for org, tokens, seconds in ((tenant_a.org, 100, 1.5), (tenant_a.org, 50, 0.5)):
        UsageRecord.objects.create(org=org, trained_tokens=tokens, compute_seconds=seconds)
    old = UsageRecord.objects.create(org=tenant_b.org, trained_tokens=7, compute_seconds=1)
    UsageRecord.objects.filter(pk=old.pk).update(created_at=last_month + timedelta(hours=1))

    for _ in range(2):
        maintenance.roll_up_usage()
    lines = {(line.org_id, line.month): line for line in MonthlyUsage.objects.all()}
    assert len(lines) == 2
    a = lines[(tenant_a.org.id, this_month.date())]
    assert (a.jobs, a.trained_tokens, a.compute_seconds) == (2, 150, 2.0)
    b = lines[(tenant_b.org.id, last_month.date())]
    assert (b.jobs, b.trained_tokens) == (1, 7)
    assert timezone.now().date() >= a.month


def test_the_roll_up_adds_the_inference_ledger_even_for_an_organization_without_jobs(
    tenant_a, tenant_b
):
    this_month = month_start()
    UsageRecord.objects.create(org=tenant_a.org, trained_tokens=100, compute_seconds=1)
    for org, prompt, completion in (
        (tenant_a.org, 10, 2),
        (tenant_a.org, 5, 1),
        (tenant_b.org, 7, 3),
    ):
        InferenceUsage.record(org.id, "support-bot", "ft-abc", "support-bot", prompt, completion)

    for _ in range(2):
        assert maintenance.roll_up_usage() == 2
    lines = {line.org_id: line for line in MonthlyUsage.objects.filter(month=this_month.date())}
    a, b = lines[tenant_a.org.id], lines[tenant_b.org.id]
    assert (a.jobs, a.trained_tokens, a.inference_prompt_tokens, a.inference_completion_tokens) == (
        1,
        100,
        15,
        3,
    )
    assert (b.jobs, b.trained_tokens, b.inference_prompt_tokens, b.inference_completion_tokens) == (
        0,
        0,
        7,
        3,
    )


def test_lost_hints_are_sent_again_once_and_only_when_the_broker_lacks_them(
    tenant_a, private_queue, django_capture_on_commit_callbacks
):
    import redis

    from jobs.models import BaseModel, Evaluation

    evaluation = Evaluation.objects.create(
        org=tenant_a.org, kind="custom", status="queued", base_model=BaseModel.seed_bundled()
    )
    broker = redis.Redis.from_url(settings.CELERY_BROKER_URL)
    assert maintenance.resend_lost_hints(grace=timedelta(hours=1)) == 0  # too young to judge
    # Hints go out when the sweep's transaction commits (at once in a worker's autocommit).
    with django_capture_on_commit_callbacks(execute=True):
        assert maintenance.resend_lost_hints(grace=timedelta(0)) == 1
    assert evaluation.id in broker.lrange(private_queue, 0, -1)[0].decode()
    # Now the broker holds it: nothing is sent twice.
    assert maintenance.resend_lost_hints(grace=timedelta(0)) == 0
    assert broker.llen(private_queue) == 1
