"""Faults on real services, each bounded in time, and the histories they leave checked for
Loft's promises: no job lost, none run twice at once, none finished twice, no half-written
object ever used. After Celery's own failover smoke tests (kill a worker; the task completes)
and Jepsen's habit of checking the recorded history rather than the happy path.

`make test` runs the short form (one kill run); `make chaos` the long one
(``LOFT_CHAOS_RUNS=5``), printing the figures RELIABILITY.md quotes. ``LOFT_CHAOS_SEED`` picks
the kill steps; ``LOFT_CHAOS_REPORT`` names a JSON file the figures are added to.
"""

import json
import os
import random
import signal
import time

import pytest
import redis
import requests
from django.conf import settings
from django.db import connection

from engine.base_models import model_folder, tokenizer_folder
from jobs.models import Adapter, File, FineTuneJob, JobAttempt, UsageRecord
from loft import storage
from tests.helpers import (
    SMOLLM2,
    BeatProcess,
    WorkerProcess,
    admin_action,
    banana_file,
    chat_rows,
    finished,
    jsonl,
    objects_of,
    submit,
    wait_for,
)

pytestmark = [pytest.mark.slow, pytest.mark.chaos, pytest.mark.django_db(transaction=True)]

RUNS = int(os.environ.get("LOFT_CHAOS_RUNS", "1"))
SEED = int(os.environ.get("LOFT_CHAOS_SEED", "20261128"))

# Workers in these tests evaluate briefly: the faults are the point, not the scores.
QUICK_EVALUATION = {"LOFT_EVAL_MAX_GENERATIONS": "2", "LOFT_EVAL_FORGETTING_PROBES": "0"}


def report(name: str, **figures) -> dict:
    """Print the figures; add them to LOFT_CHAOS_REPORT when set (make chaos)."""
    print(f"\nchaos {name}: {json.dumps(figures)}")
    path = os.environ.get("LOFT_CHAOS_REPORT")
    if path:
        with open(path, "a") as out:
            out.write(json.dumps({"test": name, "seed": SEED, **figures}) + "\n")
    return figures


def supervised(private_queue: str, **env) -> dict:
    """The environment of workers and beat in these tests: a private queue for everything,
    the reaper every second, a lease of three seconds."""
    return {
        "LOFT_TRAINING_QUEUE": settings.LOFT_TRAINING_QUEUE,  # the private prefix
        "LOFT_MAINTENANCE_QUEUE": private_queue,
        "LOFT_REAPER_EVERY_SECONDS": "1",
        "LOFT_RESEND_EVERY_SECONDS": "1",
        "LOFT_RESEND_GRACE_SECONDS": "2",
        "LOFT_LEASE_SECONDS": "3",
        "LOFT_HEARTBEAT_SECONDS": "1",
        **QUICK_EVALUATION,
        **env,
    }


def check_history(job: FineTuneJob) -> dict:
    """The promises, read from what the job recorded: it succeeded exactly once, with one
    adapter and one usage line, and its attempts never overlapped in time."""
    job.refresh_from_db()
    messages = [event.message for event in job.events.all()]
    attempts = list(job.attempts.order_by("number"))
    overlaps = sum(
        1
        for earlier, later in zip(attempts, attempts[1:], strict=False)
        if earlier.ended_at is None or earlier.ended_at > later.started_at
    )
    return {
        "succeeded": job.status == "succeeded",
        "successes": sum(m.startswith("Job succeeded") for m in messages),
        "adapters": Adapter.objects.filter(job=job).count(),
        "usage_lines": UsageRecord.objects.filter(job=job).count(),
        "attempts": len(attempts),
        "overlaps": overlaps,
        "numbers_in_order": [a.number for a in attempts] == list(range(1, len(attempts) + 1)),
    }


def assert_exactly_once(history: dict, job: FineTuneJob) -> None:
    assert history["succeeded"], (job.status, job.error, [e.message for e in job.events.all()])
    assert history["successes"] == history["adapters"] == history["usage_lines"] == 1, history
    assert history["overlaps"] == 0 and history["numbers_in_order"], history


def test_sigkilled_workers_lose_no_job_and_never_run_one_twice_at_once(
    tenant_a, tmp_path, private_queue, staff_client
):
    """Each run: a job trains; at a seeded random step its worker is SIGKILLed; the periodic
    reaper (a real beat) re-queues it; the next worker resumes it from its last checkpoint.
    That worker is the next run's victim, as a supervisor's restarted worker would be."""
    rng = random.Random(SEED)
    env = supervised(private_queue)
    file = banana_file(tenant_a, rows=40)
    beat = BeatProcess(tmp_path, **env).start()
    worker = WorkerProcess(tmp_path, "chaos-0", private_queue, **env).start()
    histories, kills, resumed = [], 0, 0
    try:
        for run in range(RUNS):
            kill_after = rng.randint(3, 5)  # past the first checkpoint (step 2), before the end
            job = submit(tenant_a, file, max_steps=6, checkpoint_every=2)
            wait_for(
                job,
                lambda j, k=kill_after: j.progress.get("step", 0) >= k or finished(j),
                what=f"step {kill_after}",
            )
            checkpointed = job.checkpoints.first()
            worker.kill()
            kills += 1
            worker = WorkerProcess(tmp_path, f"chaos-{run + 1}", private_queue, **env).start()
            job = wait_for(job, finished, what="the job to finish after the kill")
            history = check_history(job)
            assert_exactly_once(history, job)
            assert history["attempts"] >= 2, history
            assert [a.outcome for a in job.attempts.all()][:-1] == [JobAttempt.LOST] * (
                history["attempts"] - 1
            )
            assert checkpointed is not None, "the kill was to come after a checkpoint"
            assert job.metrics["resumed_from_step"] >= checkpointed.step
            resumed += 1
            histories.append(history)
    finally:
        worker.stop()
        beat.stop()
    # The last job's history, as an operator sees it in the admin.
    page = staff_client.get(f"/admin/jobs/finetunejob/{job.id}/change/").content.decode()
    assert ">lost<" in page and f"chaos-{RUNS}@" in page
    # The workers logged their jobs as JSON lines naming the job and its organization.
    lines = [json.loads(line) for line in worker.log.read_text().splitlines() if line[:1] == "{"]
    about_job = [line for line in lines if line.get("job_id") == job.id]
    assert about_job and all(line["org_id"] == tenant_a.org.id for line in about_job)
    report(
        "kill-9",
        runs=RUNS,
        kills=kills,
        jobs=len(histories),
        succeeded_once=sum(h["successes"] == 1 for h in histories),
        resumed_from_checkpoint=resumed,
        overlapping_attempts=sum(h["overlaps"] for h in histories),
        losses=RUNS - sum(h["succeeded"] and h["successes"] == 1 for h in histories),
    )


def transactions_left_open() -> int:
    """Sessions of the test database inside a transaction they are not running a query of."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND state LIKE 'idle in transaction%%'"
        )
        return cursor.fetchone()[0]


def pause(worker: WorkerProcess) -> None:
    """SIGSTOP the worker, as a long GC pause or a frozen VM would, at a moment it holds no
    transaction open: frozen inside one, it would hold the job's row lock, and the reaper
    and every other attempt would wait for it (a database's idle-in-transaction timeout is
    what ends that in production), which is not the fault this test is about."""
    for _ in range(100):
        os.killpg(worker.process.pid, signal.SIGSTOP)
        time.sleep(0.2)  # a query it had sent finishes on the server meanwhile
        if transactions_left_open() == 0:
            return
        os.killpg(worker.process.pid, signal.SIGCONT)
        time.sleep(0.05)
    raise AssertionError("the worker never paused outside a transaction")


def job_record(job: FineTuneJob) -> dict:
    """Everything of a job an attempt writes, as the database holds it now."""
    job.refresh_from_db()
    return {
        "status": job.status,
        "progress": job.progress,
        "metrics": job.metrics,
        "trained_tokens": job.trained_tokens,
        "compute_seconds": job.compute_seconds,
        "events": list(job.events.values_list("id", "message")),
        "checkpoints": list(job.checkpoints.values_list("step", "attempt", "s3_prefix")),
        "attempts": list(job.attempts.values_list("number", "worker", "ended_at", "outcome")),
        "adapters": list(Adapter.objects.filter(job=job).values_list("id", "s3_prefix")),
        "usage": list(UsageRecord.objects.filter(job=job).values_list("id", "trained_tokens")),
        # An object written over keeps its key but not its date.
        "checkpoint_objects": sorted(storage.list_objects(f"{job.s3_prefix}checkpoints/")),
    }


def test_a_paused_worker_past_its_lease_is_fenced_off_and_changes_nothing(
    tenant_a, tmp_path, private_queue
):
    """A worker frozen mid-training (SIGSTOP) past its lease: the reaper re-queues the job and
    another worker resumes and finishes it. Then the frozen worker wakes (SIGCONT) and carries
    on where it was: every write it tries (progress, events, a checkpoint, its end) is
    refused, and the job's record is what it was before it woke, less any part of a checkpoint
    it had begun to upload (deleted again when its record is refused)."""
    env = supervised(private_queue)
    file = banana_file(tenant_a, rows=24)
    beat = BeatProcess(tmp_path, **env).start()
    frozen = WorkerProcess(tmp_path, "frozen", private_queue, **env).start()
    successor = WorkerProcess(tmp_path, "successor", private_queue, **env)
    paused = False
    try:
        job = submit(tenant_a, file, max_steps=6, checkpoint_every=2)
        wait_for(job, lambda j: j.progress.get("step", 0) >= 3 or finished(j), what="step 3")
        pause(frozen)
        paused = True
        successor.start()
        job = wait_for(job, finished, what="the job to finish on the successor")
        before = job_record(job)
        os.killpg(frozen.process.pid, signal.SIGCONT)
        paused = False
        wait_for(
            lambda: "attempt 1 of the job ended" in frozen.log.read_text(errors="replace"),
            timeout=120,
            what="the frozen attempt to come to its end",
            explain=lambda _: frozen.output(),
        )
        after = job_record(job)
    finally:
        if paused:
            os.killpg(frozen.process.pid, signal.SIGCONT)
        frozen.stop()
        successor.stop()
        beat.stop()
    history = check_history(job)
    assert_exactly_once(history, job)
    # Frozen mid-upload, the attempt may have left part of a checkpoint it never recorded; on
    # waking its record is refused and it deletes those files. Nothing else may change.
    recorded = {prefix for _, _, prefix in before["checkpoints"]}
    expected = {
        **before,
        "checkpoint_objects": [
            (key, date)
            for key, date in before["checkpoint_objects"]
            if "/attempt-1/" not in key or key.rsplit("/", 1)[0] + "/" in recorded
        ],
    }
    assert after == expected
    outcomes = [(a.number, a.worker.split("@")[0], a.outcome) for a in job.attempts.all()]
    assert outcomes == [(1, "frozen", JobAttempt.LOST), (2, "successor", "succeeded")]
    assert job.metrics["resumed_from_step"] >= 2
    # It did try: each refused write is in its log, and the last line says who holds the job.
    log = frozen.log.read_text(errors="replace")
    refused = log.count(f"attempt 1 no longer holds job {job.id}")
    assert refused >= 1, frozen.output()
    assert "attempt 1 of the job ended; the job is succeeded (attempt 2)" in log
    # No file of the frozen attempt is left among the checkpoints the job keeps.
    kept = {prefix for _, _, prefix in after["checkpoints"]}
    assert {key.rsplit("/", 1)[0] + "/" for key, _ in after["checkpoint_objects"]} == kept
    report(
        "sigstop",
        runs=1,
        pauses=1,
        jobs=1,
        succeeded_once=int(history["successes"] == 1),
        refused_writes_logged=refused,
        changes_after_waking=int(after != expected),
        overlapping_attempts=history["overlaps"],
    )


def test_a_broker_restart_and_flush_lose_no_job(tenant_a, tmp_path, private_queue, embedded_stack):
    """The broker restarts and forgets every message while one job runs and another waits:
    the sweep re-sends each unfinished job's hint from PostgreSQL, and both finish once."""
    env = supervised(private_queue)
    file = banana_file(tenant_a, rows=24)
    beat = BeatProcess(tmp_path, **env).start()
    worker = WorkerProcess(tmp_path, "broker-chaos", private_queue, **env).start()
    try:
        running = submit(tenant_a, file, max_steps=4, checkpoint_every=2)
        wait_for(running, lambda j: j.progress.get("step", 0) >= 1, what="the first step")
        waiting = submit(tenant_a, file, max_steps=2)
        assert redis.Redis.from_url(settings.CELERY_BROKER_URL).llen(private_queue) >= 1
        embedded_stack.stop_service("broker")
        embedded_stack.start_service("broker")
        redis.Redis.from_url(settings.CELERY_BROKER_URL).flushall()  # every message forgotten
        jobs = [wait_for(job, finished, what="a job to finish") for job in (running, waiting)]
    finally:
        worker.stop()
        beat.stop()
    histories = [check_history(job) for job in jobs]
    for job, history in zip(jobs, histories, strict=True):
        assert_exactly_once(history, job)
    resent = sum(any("hint" in e.message for e in job.events.all()) for job in jobs)
    report(
        "broker-restart-and-flush",
        jobs=len(jobs),
        resent=resent,
        losses=sum(not h["succeeded"] for h in histories),
        duplicates=sum(max(0, h["successes"] - 1) for h in histories),
    )


class UploadThatStopsS3:
    """A multipart upload body of about 24 MiB, read by the HTTP client block by block; once
    10 MiB have gone (the first 8 MiB part is in S3 by then), it stops S3."""

    BOUNDARY = "loft-chaos-boundary"

    def __init__(self, stop_s3):
        self.row = jsonl(chat_rows(1))
        self.rows = 24 * 2**20 // len(self.row)
        head = (
            f'--{self.BOUNDARY}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\n'
            f'fine-tune\r\n--{self.BOUNDARY}\r\nContent-Disposition: form-data; name="file"; '
            f'filename="big.jsonl"\r\nContent-Type: application/octet-stream\r\n\r\n'
        ).encode()
        tail = f"\r\n--{self.BOUNDARY}--\r\n".encode()
        self.length = len(head) + self.rows * len(self.row) + len(tail)
        self.chunks = iter(
            [head, *([self.row * 1000] * (self.rows // 1000)), self.row * (self.rows % 1000), tail]
        )
        self.buffer, self.sent, self.stop_s3, self.stopped = b"", 0, stop_s3, False

    def __len__(self) -> int:
        return self.length

    def read(self, size: int = -1) -> bytes:
        while len(self.buffer) < max(size, 1):
            chunk = next(self.chunks, None)
            if chunk is None:
                break
            self.buffer += chunk
        size = len(self.buffer) if size < 0 else size
        out, self.buffer = self.buffer[:size], self.buffer[size:]
        self.sent += len(out)
        if self.sent > 10 * 2**20 and not self.stopped:
            self.stopped = True
            self.stop_s3()
        return out


def test_s3_stopped_during_an_upload_answers_503_and_leaves_no_row_nor_object(
    tenant_a, live_server, embedded_stack
):
    body = UploadThatStopsS3(lambda: embedded_stack.stop_service("storage"))
    files_before = File.objects.count()
    try:
        response = requests.post(
            f"{live_server.url}/v1/files",
            data=body,
            headers={
                "Authorization": f"Bearer {tenant_a.secret}",
                "Content-Type": f"multipart/form-data; boundary={body.BOUNDARY}",
            },
            timeout=120,
        )
    finally:
        if body.stopped:
            embedded_stack.start_service("storage")
    assert body.stopped, "S3 was to stop midway"
    assert response.status_code == 503, response.text
    assert response.json()["error"]["code"] == "storage_unavailable"
    assert File.objects.count() == files_before
    storage.client.cache_clear()
    assert objects_of(tenant_a.org) == []
    report(
        "s3-down-during-upload",
        uploads=1,
        rows_left=File.objects.count() - files_before,
        objects_left=len(objects_of(tenant_a.org)),
    )


def test_s3_stopped_during_a_checkpoint_makes_the_job_retry_and_no_partial_checkpoint_is_used(
    tenant_a, tmp_path, private_queue, embedded_stack
):
    env = supervised(private_queue, LOFT_STORAGE_RETRY_SECONDS="5", LOFT_MAX_ATTEMPTS="5")
    file = banana_file(tenant_a, rows=24)
    worker = WorkerProcess(tmp_path, "s3-chaos", private_queue, **env).start()
    try:
        job = submit(tenant_a, file, max_steps=4, checkpoint_every=2)
        wait_for(job, lambda j: j.progress.get("step", 0) >= 1, what="the first step")
        embedded_stack.stop_service("storage")
        try:
            wait_for(
                job,
                lambda j: j.attempts.filter(outcome=JobAttempt.STORAGE).exists(),
                timeout=120,
                what="the attempt to give way to storage",
            )
        finally:
            embedded_stack.start_service("storage")
            storage.client.cache_clear()
        job = wait_for(job, finished, what="the retried job")
    finally:
        worker.stop()
    history = check_history(job)
    assert_exactly_once(history, job)
    assert history["attempts"] >= 2
    # The tenant read that storage was unavailable; where it lives is for the operators' log.
    gave_way = [e.message for e in job.events.all() if "storage was unavailable" in e.message]
    assert gave_way, [e.message for e in job.events.all()]
    internals = ("orgs/", settings.S3_BUCKET, settings.S3_ENDPOINT_URL)
    assert not [m for m in gave_way for word in internals if word in m], gave_way
    # Every checkpoint a row points at is whole: its manifest is there, listing its files.
    for checkpoint in job.checkpoints.all():
        manifest = json.loads(storage.get_bytes(f"{checkpoint.s3_prefix}manifest.json"))
        keys = set(storage.list_keys(checkpoint.s3_prefix))
        assert {checkpoint.s3_prefix + name for name in manifest["files"]} <= keys
    report(
        "s3-down-during-checkpoint",
        jobs=1,
        attempts=history["attempts"],
        losses=int(not history["succeeded"]),
    )


def test_a_job_that_kills_its_worker_every_time_fails_after_k_attempts_and_leaves_the_queue_empty(
    tenant_a, tmp_path, private_queue
):
    job = submit(tenant_a, banana_file(tenant_a), max_steps=50, checkpoint_every=100)
    env = supervised(private_queue)
    for attempt in (1, 2):
        worker = WorkerProcess(tmp_path, f"fragile{attempt}", private_queue, **env)
        worker.start()
        try:
            wait_for(
                job,
                lambda j, n=attempt: j.status == "running" and j.attempt == n,
                what=f"attempt {attempt}",
            )
            worker.kill()
        finally:
            worker.stop()
        time.sleep(3.5)  # let the lease run out
        assert FineTuneJob.reap_stale(lease_seconds=3, max_attempts=2) == [job.id]
    job.refresh_from_db()
    assert job.status == "failed"
    assert job.error["code"] == "worker_lost"
    assert "stopped 2 times" in job.error["message"]
    broker = redis.Redis.from_url(settings.CELERY_BROKER_URL)
    assert broker.llen(private_queue) == 0
    report(
        "poison-job",
        attempts=job.attempt,
        failed_with_reason=job.error["code"] == "worker_lost",
        queue_left=broker.llen(private_queue),
    )


TIME_LIMIT_SECONDS = 15


def test_the_time_limit_checkpoints_the_job_and_an_operators_retry_resumes_it(
    tenant_a, tmp_path, private_queue, staff_client, cache
):
    """A worker whose time limit is 15 s: the job checkpoints the steps it did and fails with
    the reason. The admin's Retry queues it again; a worker without that limit resumes it
    from the checkpoint and it succeeds, its ledger line updated rather than doubled."""
    # The limit counts the attempt's setup too: the base is converted beforehand (once a run),
    # so that the limit falls among the training steps, wherever this test runs in the suite.
    tokenizer_folder(SMOLLM2, cache)
    model_folder(SMOLLM2, cache)
    limited = WorkerProcess(
        tmp_path,
        "limited",
        private_queue,
        **supervised(private_queue, LOFT_JOB_SOFT_TIME_LIMIT_SECONDS=str(TIME_LIMIT_SECONDS)),
    ).start()
    try:
        # Ten epochs of the banana rows pack into steps of about a second here: 40 of them
        # outlast the limit, so the limit, not the end, stops the first attempt.
        job = submit(
            tenant_a, banana_file(tenant_a), n_epochs=10, max_steps=40, checkpoint_every=1000
        )
        job = wait_for(job, finished, timeout=180, what="the time limit")
    finally:
        limited.stop()
    assert job.status == "failed" and job.error["code"] == "time_limit", job.error
    assert "time limit reached" in job.error["message"].lower()
    step = job.progress["step"]
    assert 0 < step < 40, step
    assert job.checkpoints.first().step == step  # saved on the way out
    assert f"checkpoint at step {step}" in job.error["message"]

    # Cancel, on a job no worker has taken: cancelled at once. Retry: only the failed job.
    waiting = submit(tenant_a, job.training_file, max_steps=4)
    admin_action(staff_client, "cancel", waiting)
    waiting.refresh_from_db()
    assert waiting.status == "cancelled"
    page = admin_action(staff_client, "retry", job, waiting).content.decode()
    assert "Queued 1 job(s) again" in page and "1 could not be retried" in page
    job.refresh_from_db()
    assert job.status == "queued" and job.error is None and job.finished_at is None

    worker = WorkerProcess(tmp_path, "unlimited", private_queue, **supervised(private_queue))
    worker.start()
    try:
        job = wait_for(job, finished, what="the retried job")
    finally:
        worker.stop()
    history = check_history(job)
    assert_exactly_once(history, job)
    assert job.metrics["resumed_from_step"] == step
    assert [(a.number, a.outcome) for a in job.attempts.all()] == [(1, "failed"), (2, "succeeded")]
    assert any(e.message.startswith("Retried by operator") for e in job.events.all())
    report(
        "time-limit-then-retry",
        jobs=1,
        checkpointed_at_step=step,
        resumed_at_step=job.metrics["resumed_from_step"],
    )
