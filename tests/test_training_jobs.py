"""Fine-tuning jobs on real Celery workers: QLoRA end to end, continuing from an adapter,
cancel within a step. A few short steps on short rows each. (Killed workers, a lost broker,
S3 down, the time limit: tests/test_chaos.py.) And the worker's side of a job without
training: its checkpoints (fenced, bounded, counted) and resuming from them."""

import json
import time

import pytest
import torch
from django.conf import settings

from engine import artifacts
from engine.base_models import load_base_model, load_tokenizer
from jobs.models import (
    Adapter,
    BaseModel,
    BaseScores,
    FineTuneJob,
    JobAttempt,
    UsageRecord,
    storage_bytes,
)
from loft import storage
from tests.helpers import (
    BANANA_ANSWER,
    WorkerProcess,
    banana_file,
    finished,
    signed_in,
    submit,
    wait_for,
)
from worker import training

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]


def greedy(model, tokenizer, prompt: str) -> str:
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)


def test_a_qlora_job_trains_an_adapter_that_changes_the_base_models_answers(
    celery_worker, tenant_a, tmp_path
):
    from peft import PeftModel

    job = submit(tenant_a, banana_file(tenant_a), max_steps=3, checkpoint_every=1)
    job = wait_for(job, finished, what="the job to finish")
    assert job.status == "succeeded", (job.error, [e.message for e in job.events.all()])
    assert job.attempt == 1 and job.trained_tokens > 0
    assert job.progress["step"] == 3 and job.metrics["validation_loss"] is not None
    # A checkpoint at every step, and the job keeps the newest two, in storage as in rows.
    checkpoints = list(job.checkpoints.order_by("step"))
    assert [c.step for c in checkpoints] == [2, 3]
    assert [c.s3_prefix for c in checkpoints] == [
        f"{job.s3_prefix}checkpoints/attempt-1/step-{step}/" for step in (2, 3)
    ]
    assert checkpoint_prefixes(job) == {c.s3_prefix for c in checkpoints}
    kept_bytes = sum(c.size_bytes for c in checkpoints)
    assert all(c.size_bytes > 0 for c in checkpoints)
    adapter_bytes = Adapter.objects.get(job=job).size_bytes
    results = job.result_file  # its metrics by step, a file of the tenant's like any other
    assert results.purpose == "fine-tune-results" and results.rows == 3
    assert storage_bytes(tenant_a.org) == (
        job.training_file.bytes + adapter_bytes + kept_bytes + results.bytes
    )

    adapter = Adapter.objects.get(job=job)
    assert adapter.name == f"ft:{job.base_model.name}:{tenant_a.org.slug}:test:{job.id}"
    assert adapter.s3_prefix.startswith(f"orgs/{tenant_a.org.id}/adapters/{adapter.id}/")
    expected = {
        "adapter_config.json",
        "adapter_model.safetensors",
        "README.md",
        "training_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "eval_report.json",
    }
    assert expected <= set(adapter.manifest["files"])
    assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in adapter.manifest["files"])

    folder = tmp_path / "adapter"
    storage.download_folder(adapter.s3_prefix, folder)
    spec = job.base_model.spec
    cache = settings.LOFT_HOME / "models"
    tokenizer = load_tokenizer(spec, cache)
    base = load_base_model(spec, cache, "none", "cpu")
    before = greedy(base, tokenizer, "Tell me about topic 99.")
    tuned = PeftModel.from_pretrained(base, str(folder))
    after = greedy(tuned, tokenizer, "Tell me about topic 99.")
    assert after != before, after
    assert "Banana" in after

    # The job evaluated base and adapter on the same held-out rows and kept both numbers.
    evaluation = job.evaluations.get()
    base_scores, adapter_scores = evaluation.results["base"], evaluation.results["adapter"]
    assert adapter_scores["loss"] < base_scores["loss"]
    assert adapter_scores["generations"] == base_scores["generations"] > 0
    assert adapter_scores["rouge_l"] > base_scores["rouge_l"], evaluation.results["samples"]
    assert evaluation.verdict["better"] is True and adapter.metrics["verdict"]["better"]
    sample = evaluation.results["samples"][0]
    assert "Banana" in sample["adapter_output"] and sample["reference"] == BANANA_ANSWER
    report = json.loads((folder / "eval_report.json").read_text())
    assert report["adapter"] == adapter_scores
    card = (folder / "README.md").read_text()
    assert "## Evaluation on held-out rows" in card

    # A QLoRA adapter is served on the 4-bit base it was trained on, says so in its manifest
    # and card, and is also scored on the full-precision base users may load it on.
    precision = evaluation.results["base_precision"]
    assert precision["trained_on"] == precision["served_on"] == "nf4"
    assert precision["adapter"]["nf4"] == adapter_scores
    full = precision["adapter"]["none"]
    assert full["generations"] == adapter_scores["generations"] and full["loss"] > 0
    assert precision["gap"]["loss"] == pytest.approx(full["loss"] - adapter_scores["loss"])
    assert adapter.manifest["base"]["quantization"] == adapter.base_quantization == "nf4"
    stored_manifest = json.loads(storage.get_bytes(f"{adapter.s3_prefix}manifest.json"))
    assert stored_manifest["base"]["quantization"] == "nf4"
    assert "Trained on the base in **4-bit NF4" in card and "BitsAndBytesConfig" in card
    assert "On the full-precision base instead" in card

    # Where its time went: every phase, adding up to the whole (one attempt).
    timings = job.timings
    assert set(timings) == {"attempt", *FineTuneJob.PHASES, "total"} and timings["attempt"] == 1
    assert all(timings[phase] >= 0 for phase in FineTuneJob.PHASES) and timings["training"] > 0
    phases = sum(timings[phase] for phase in FineTuneJob.PHASES)
    assert phases == pytest.approx(timings["total"], abs=0.5)
    # The file's examples as tokens, kept beside it for the next job on it.
    tokenized = storage.list_keys(f"{job.training_file.s3_prefix}tokenized/")
    assert len(tokenized) == 1 and tokenized[0].endswith(".safetensors")

    # A second job on the same worker finds the base model still loaded; it continues from the
    # first job's adapter, and its adapter records that parent.
    second = FineTuneJob.submit(
        org=tenant_a.org,
        training_file=job.training_file,
        parent_adapter=adapter,
        hyperparameters={
            "max_steps": 1,
            "batch_size": 4,
            "max_seq_length": 128,
            "method": "qlora",  # the API would choose the parent's precision
        },
    )
    second = wait_for(second, finished, what="the second job")
    assert second.status == "succeeded", second.error
    assert any("already loaded" in e.message for e in second.events.all())
    child = Adapter.objects.get(job=second)
    assert child.parent == adapter
    assert "Continued from adapter" in storage.get_bytes(f"{child.s3_prefix}README.md").decode()
    # Same file, same held-out rows, same 4-bit base: its evaluation read the base's results
    # the first one kept, on the held-out rows and on the probes, and they are the same.
    kept = BaseScores.objects.filter(base_model=job.base_model)
    assert sorted(kept.values_list("kind", "uses")) == [("held_out", 1), ("probes", 1)]
    assert second.evaluations.get().results["base"] == base_scores
    # Measured against its parent too: the parent on the same held-out rows, and, on the
    # parent's own held-out rows (its task), the parent and the child (retention). Same rows,
    # base and truncation as the first job's evaluation: the parent scores what it scored then.
    continual = second.evaluations.get()
    parent = continual.results["parent"]
    assert parent["adapter"] == adapter.id and parent["held_out"]["generations"] > 0
    assert parent["held_out"]["loss"] == pytest.approx(adapter_scores["loss"], rel=0.02)
    assert [m["adapter"] for m in continual.scores_by_model()] == [None, child.id, adapter.id]
    [task] = continual.retention()
    assert task["adapter"] == adapter.id and task["rows"] > 0
    assert task["child"]["generations"] == task["parent"]["generations"] > 0
    assert task["parent"]["loss"] == pytest.approx(adapter_scores["loss"], rel=0.02)
    assert task["child"]["loss"] != task["parent"]["loss"]
    page = signed_in(tenant_a).get(f"/jobs/{second.id}").content.decode()
    assert "What it kept of the earlier tasks" in page and adapter.name in page
    assert storage.list_keys(f"{job.training_file.s3_prefix}tokenized/") == tokenized


def test_a_worker_loads_the_base_model_as_it_starts(tenant_a, private_queue, tmp_path):
    """Warm start (worker/warm_start.py): a fresh worker loads the base the next job most
    likely wants (on an empty install: the default base, at the default method's precision)
    before any job asks, so its first job finds it loaded."""
    worker = WorkerProcess(
        tmp_path,
        queue=private_queue,
        LOFT_WORKER_PRELOAD="1",
        LOFT_TRAINING_QUEUE=settings.LOFT_TRAINING_QUEUE,
    ).start()
    try:
        wait_for(
            lambda: worker.log.read_text(errors="replace"),
            lambda log: "preloaded HuggingFaceTB/SmolLM2-135M-Instruct (none)" in log,
            timeout=180,
            what="the worker to preload the base model",
            explain=lambda log: log[-4000:],
        )
        job = submit(tenant_a, banana_file(tenant_a), method="lora", max_steps=1)
        job = wait_for(job, finished, what="the job to finish")
    finally:
        worker.stop()
    assert job.status == "succeeded", job.error
    assert any("base model already loaded" in e.message for e in job.events.all())


def test_cancelling_a_running_job_stops_it_within_seconds_of_the_next_step(celery_worker, tenant_a):
    job = submit(tenant_a, banana_file(tenant_a), max_steps=200, checkpoint_every=1000)
    wait_for(job, lambda j: j.progress.get("step", 0) >= 1, what="the first step")
    asked = time.monotonic()
    job.request_cancel()
    job = wait_for(job, finished, timeout=60, what="the job to stop")
    assert job.status == "cancelled"
    step_seconds = 5.0  # one step here takes well under this on the CPU
    assert time.monotonic() - asked < step_seconds + 5
    assert job.progress["step"] < 200


def test_a_queued_job_is_cancelled_at_once(tenant_a):
    job = FineTuneJob.objects.create(
        org=tenant_a.org, base_model=BaseModel.default(), training_file=banana_file(tenant_a)
    )
    job.request_cancel()
    assert job.status == "cancelled"
    assert job.claim("nobody") is None


def test_a_cancel_asked_while_an_attempt_gives_way_to_storage_ends_the_job_cancelled(tenant_a):
    """Cancelled while object storage was down: the attempt that gives way must not queue the
    job again, since a job that asked to stop is never claimed (it would wait forever)."""
    job = FineTuneJob.objects.create(
        org=tenant_a.org, base_model=BaseModel.default(), training_file=banana_file(tenant_a)
    )
    attempt = job.claim("worker-1")
    job.request_cancel()
    assert job.status == "running" and job.cancel_requested
    assert job.give_way(attempt, "object storage was unavailable.", max_attempts=5, retry_in=30)
    job.refresh_from_db()
    assert job.status == "cancelled" and job.finished_at is not None
    assert [(a.number, a.outcome) for a in job.attempts.all()] == [(1, JobAttempt.STORAGE)]
    assert list(job.events.values_list("message", flat=True))[-1] == "Job cancelled."
    assert UsageRecord.objects.filter(job=job).count() == 1
    assert job.claim("worker-2") is None


def job_held_by(tenant, attempts: int) -> FineTuneJob:
    """A job claimed ``attempts`` times, each attempt but the last taken back by the reaper."""
    job = FineTuneJob.objects.create(
        org=tenant.org, base_model=BaseModel.default(), training_file=banana_file(tenant)
    )
    for number in range(1, attempts + 1):
        if number > 1:
            FineTuneJob.objects.filter(pk=job.pk).update(heartbeat_at="2000-01-01T00:00Z")
            assert FineTuneJob.reap_stale(lease_seconds=1, max_attempts=10) == [job.id]
        assert job.claim(f"worker-{number}") == number
    return job


def checkpoint_folder(tmp_path, step: int):
    folder = tmp_path / f"local-step-{step}"
    folder.mkdir()
    (folder / "adapter_model.safetensors").write_bytes(bytes([step]) * 1000)
    (folder / "trainer_state.json").write_text(json.dumps({"step": step}))
    return folder


def checkpoint_prefixes(job: FineTuneJob) -> set[str]:
    """The checkpoint folders in storage (each holds its files and its manifest)."""
    keys = storage.list_keys(f"{job.s3_prefix}checkpoints/")
    return {key.rsplit("/", 1)[0] + "/" for key in keys}


def test_checkpoints_are_written_per_attempt_fenced_bounded_and_counted(tenant_a, tmp_path):
    """A checkpoint every step keeps only the newest two; a stale attempt (its job taken back
    and claimed again) records nothing and leaves nothing, and never writes over the current
    attempt's files; what is kept counts toward the organization's storage."""
    job = job_held_by(tenant_a, attempts=1)
    first = training.JobRun(job, 1, tmp_path, training.PhaseClock(job, 1, time.monotonic()))
    for step in (1, 2, 3):
        first.on_checkpoint(checkpoint_folder(tmp_path, step), step)
    kept = list(job.checkpoints.order_by("step"))
    assert [(c.step, c.attempt) for c in kept] == [(2, 1), (3, 1)]
    assert checkpoint_prefixes(job) == {c.s3_prefix for c in kept}
    assert {c.s3_prefix for c in kept} == {
        f"{job.s3_prefix}checkpoints/attempt-1/step-2/",
        f"{job.s3_prefix}checkpoints/attempt-1/step-3/",
    }
    assert not (tmp_path / "local-step-1").exists()  # uploaded, then off the worker's disk
    file_bytes = job.training_file.bytes
    assert storage_bytes(tenant_a.org) == file_bytes + sum(c.size_bytes for c in kept) > file_bytes

    # The reaper hands the job to attempt 2; attempt 1 wakes up and checkpoints step 4.
    FineTuneJob.objects.filter(pk=job.pk).update(heartbeat_at="2000-01-01T00:00Z")
    FineTuneJob.reap_stale(lease_seconds=1, max_attempts=10)
    assert job.claim("worker-2") == 2
    second = training.JobRun(job, 2, tmp_path, training.PhaseClock(job, 2, time.monotonic()))
    first.on_checkpoint(checkpoint_folder(tmp_path, 4), 4)
    assert sorted(job.checkpoints.values_list("step", flat=True)) == [2, 3]
    assert checkpoint_prefixes(job) == {c.s3_prefix for c in kept}
    # Attempt 2, resumed from step 2, checkpoints step 3 anew: attempt 1's step 3 goes.
    second.on_checkpoint(checkpoint_folder(tmp_path, 3), 3)
    latest = job.checkpoints.get(step=3)
    assert latest.attempt == 2
    assert latest.s3_prefix == f"{job.s3_prefix}checkpoints/attempt-2/step-3/"
    assert checkpoint_prefixes(job) == {
        f"{job.s3_prefix}checkpoints/attempt-1/step-2/",
        latest.s3_prefix,
    }


def stored_checkpoint(job: FineTuneJob, tmp_path, step: int):
    """A checkpoint of ``job`` at ``step``, recorded the way a worker records one."""
    folder = checkpoint_folder(tmp_path, step)
    prefix = f"{job.s3_prefix}checkpoints/attempt-{job.attempt}/step-{step}/"
    manifest = artifacts.build_manifest(folder)
    storage.upload_folder(folder, prefix, manifest)
    assert job.record_checkpoint(job.attempt, step, prefix, manifest, {}, keep=10) == []
    return prefix


def test_resume_skips_a_damaged_or_incomplete_checkpoint_for_the_newest_whole_one(
    tenant_a, tmp_path
):
    job = job_held_by(tenant_a, attempts=1)
    whole, damaged, incomplete = (stored_checkpoint(job, tmp_path, s) for s in (2, 4, 6))
    storage.put_bytes(f"{damaged}adapter_model.safetensors", b"not what the manifest says")
    storage.delete_object(f"{incomplete}trainer_state.json")

    folder, step, skipped = training.latest_usable_checkpoint(job, tmp_path / "work")
    assert (step, skipped) == (2, [6, 4])
    assert json.loads((folder / "trainer_state.json").read_text()) == {"step": 2}
    # Without its manifest, a checkpoint does not exist either.
    storage.delete_object(f"{whole}manifest.json")
    assert training.latest_usable_checkpoint(job, tmp_path / "again") == (None, 0, [6, 4, 2])


def test_resume_that_cannot_reach_storage_gives_way_rather_than_start_over(
    tenant_a, tmp_path, embedded_stack
):
    """Storage down while resuming is not a damaged checkpoint: the attempt must wait and
    resume from it later, not fall back to an older one or to step 0."""
    job = job_held_by(tenant_a, attempts=1)
    prefix = stored_checkpoint(job, tmp_path, 2)
    embedded_stack.stop_service("storage")
    try:
        with pytest.raises(storage.StorageError):
            training.latest_usable_checkpoint(job, tmp_path / "work")
    finally:
        embedded_stack.start_service("storage")
        storage.client.cache_clear()

    def storage_answers() -> bool:
        try:
            return bool(storage.get_bytes(f"{prefix}manifest.json"))
        except storage.StorageError:
            return False  # a restarted SeaweedFS answers 500 for a few seconds

    wait_for(storage_answers, timeout=60, what="storage to answer again")
    folder, step, skipped = training.latest_usable_checkpoint(job, tmp_path / "later")
    assert (step, skipped) == (2, [])
