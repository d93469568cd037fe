"""Hosts that share nothing: a worker needs only PostgreSQL, the broker and object storage.

Two real workers, each with a LOFT_HOME of its own, run as a user who cannot read the web's: in
a mount namespace of each worker's own, an empty folder is mounted over the web's home. The
second cannot see the bundled model either (an empty folder over its package), so it can only
have the base from object storage, where the first one uploaded it. The first is SIGKILLed
mid-job; the second resumes the job from the checkpoint in object storage, with nothing but what
crossed through there.
"""

import json
import os
import subprocess
from pathlib import Path

import pytest
from django.conf import settings

from engine import artifacts
from engine.model_cache import bundled_gguf, part_key
from jobs.models import FineTuneJob, JobAttempt
from jobs.shared_models import part_prefix
from loft import storage
from tests.helpers import (
    SMOLLM2,
    Isolation,
    WorkerProcess,
    banana_file,
    finished,
    submit,
    wait_for,
)

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

NOBODY = 65534
AS_ROOT = os.geteuid() == 0
LEASE_SECONDS = 3


def worker_env() -> dict:
    """A private queue (the test's own prefix), a lease the test reaps after three seconds,
    and a brief evaluation: the hosts are the point, not the scores."""
    return {
        "LOFT_TRAINING_QUEUE": settings.LOFT_TRAINING_QUEUE,
        "LOFT_HEARTBEAT_SECONDS": "1",
        "LOFT_LEASE_SECONDS": str(LEASE_SECONDS),
        "LOFT_EVAL_MAX_GENERATIONS": "2",
        "LOFT_EVAL_FORGETTING_PROBES": "0",
    }


def as_nobody(*command: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["setpriv", "--reuid", str(NOBODY), "--regid", str(NOBODY), "--clear-groups", *command],
        capture_output=True,
        text=True,
    )


def logged(worker: WorkerProcess) -> list[str]:
    """The messages of the worker's JSON log lines."""
    lines = worker.log.read_text(errors="replace").splitlines()
    return [json.loads(line).get("message", "") for line in lines if line[:1] == "{"]


def uid_of(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1])


def test_a_job_resumes_on_a_host_that_shares_nothing_but_the_services(
    tenant_a, tmp_path, private_queue
):
    web_home = Path(os.environ["LOFT_HOME"])
    package = bundled_gguf(SMOLLM2.source).parent
    uid = NOBODY if AS_ROOT else None
    # Mounting needs root; then neither host sees the web's home, and the second no model.
    # (The web's home itself stays open: its PostgreSQL runs as a user of its own.)
    first_host = Isolation.fresh(uid, hidden=[web_home] if AS_ROOT else [])
    second_host = Isolation.fresh(uid, hidden=[web_home, package] if AS_ROOT else [])
    # The first host to need the base is to convert it: nothing is shared yet.
    storage.delete_prefix("models/")
    model_prefix = part_prefix(part_key(SMOLLM2, "model"))
    tokenizer_prefix = part_prefix(part_key(SMOLLM2, "tokenizer"))

    first = WorkerProcess(tmp_path, "first", private_queue, first_host, **worker_env())
    second = WorkerProcess(tmp_path, "second", private_queue, second_host, **worker_env())
    try:
        if AS_ROOT:  # the web's secrets are root's alone, wherever its home is seen
            denied = as_nobody("cat", str(web_home / "env"))
            assert denied.returncode != 0 and "Permission denied" in denied.stderr
        job, checkpoint = kill_the_first_mid_job(tenant_a, first, second, package, web_home)
        job = wait_for(
            job,
            finished,
            what="the job to finish on the second host",
            explain=lambda j: f"{[e.message for e in j.events.all()]}\n{second.output()}",
        )
        events = [event.message for event in job.events.all()]
        assert job.status == "succeeded", (job.error, events)
        assert f"Resuming from the checkpoint at step {checkpoint.step}." in events
        outcomes = [(a.worker.split("@")[0], a.outcome) for a in job.attempts.all()]
        assert outcomes == [("first", JobAttempt.LOST), ("second", "succeeded")]

        # The first host converted the base and uploaded it; the second downloaded and
        # verified both parts, and built nothing itself (it could not have: it has no
        # bundled model).
        first_log, second_log = logged(first), logged(second)
        assert any(line.startswith(f"uploaded {model_prefix}") for line in first_log)
        for prefix in (tokenizer_prefix, model_prefix):
            assert any(line.startswith(f"downloaded {prefix}") for line in second_log), prefix
        built = ("building it", "on this host", "uploaded")
        assert not [line for line in second_log if any(word in line for word in built)]
        manifest = json.loads(storage.get_bytes(f"{model_prefix}{artifacts.MANIFEST}"))
        fetched = second_host.home / "models" / part_key(SMOLLM2, "model")
        assert artifacts.build_manifest(fetched) == manifest
    finally:
        first.stop()
        second.stop()
        first_host.remove()
        second_host.remove()


def seen_inside(worker: WorkerProcess, folder: Path) -> str:
    """What ``ls -A folder`` lists in the worker's mount namespace."""
    return subprocess.run(
        ["nsenter", "--target", str(worker.process.pid), "--mount", "ls", "-A", str(folder)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout


def kill_the_first_mid_job(
    tenant, first: WorkerProcess, second: WorkerProcess, package: Path, web_home: Path
):
    """Start the first host, give it a job, start the second beside it, and SIGKILL the
    first once a checkpoint of the job is in object storage; the reaper re-queues the job.
    Returns the job and that checkpoint."""
    first.start()
    job = submit(tenant, banana_file(tenant), method="lora", max_steps=4, checkpoint_every=2)
    wait_for(job, lambda j: j.status == "running" or finished(j), what="the first to start")
    # Started while the first converts and trains, so that its own start overlaps.
    second.start()
    if AS_ROOT:
        assert uid_of(first.process.pid) == uid_of(second.process.pid) == NOBODY
        assert seen_inside(second, package) == "", "the second host sees the bundled model"
        assert seen_inside(first, package) != "", "the first host sees it"
        for host in (first, second):
            assert seen_inside(host, web_home) == "", f"{host.name} sees the web's home"
        assert any(web_home.iterdir())
    wait_for(
        job,
        lambda j: j.checkpoints.exists() or finished(j),
        what="a checkpoint in object storage",
        explain=lambda _: first.output(),
    )
    shared_model = part_prefix(part_key(SMOLLM2, "model"))
    assert storage.list_keys(f"{shared_model}{artifacts.MANIFEST}"), "the base is not shared"
    first.kill()
    job.refresh_from_db()
    assert not finished(job), "the first host finished the job before it was killed"
    wait_for(
        lambda: FineTuneJob.reap_stale(LEASE_SECONDS, max_attempts=5),
        timeout=30,
        what="the reaper to re-queue the job",
    )
    return job, job.checkpoints.first()
