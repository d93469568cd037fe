"""The whole flow with the official openai package against a live server and a real Celery
worker: upload, fine-tune, follow, read events and checkpoints, find the model; cancel; continue
from a checkpoint."""

import json

import openai
import pytest

from engine.artifacts import ADAPTER_WEIGHTS
from jobs.models import BaseModel, Checkpoint, FineTuneJob
from loft import storage
from loft.models import ApiKey, Organization
from tests.helpers import banana_jsonl, wait_for

pytestmark = pytest.mark.slow


def test_the_openai_client_fine_tunes_follows_and_cancels_unchanged(
    live_server, transactional_db, celery_worker
):
    BaseModel.seed_bundled()
    org = Organization.objects.create(slug="sdk", name="SDK")
    _, secret = ApiKey.issue(org)
    client = openai.OpenAI(api_key=secret, base_url=f"{live_server.url}/v1", max_retries=0)

    file = client.files.create(file=("banana.jsonl", banana_jsonl()), purpose="fine-tune")
    assert file.status == "processed"
    job = client.fine_tuning.jobs.create(
        model=BaseModel.default().name,
        training_file=file.id,
        suffix="banana",
        seed=3,
        method={
            "type": "supervised",
            "supervised": {
                "hyperparameters": {
                    "n_epochs": 1,
                    "batch_size": 4,
                    "learning_rate_multiplier": 25,
                    # Loft's options ride in the same object.
                    "lora_rank": 8,
                    "max_seq_length": 128,
                    "max_steps": 3,
                    "checkpoint_every": 2,
                }
            },
        },
    )
    assert job.id.startswith("ftjob-") and job.status == "queued"
    assert job.hyperparameters.batch_size == 4 and job.seed == 3

    job = wait_for(
        lambda: client.fine_tuning.jobs.retrieve(job.id),
        lambda j: j.status in ("succeeded", "failed", "cancelled"),
        timeout=600,
        interval=1,
        what="the job to finish",
    )
    assert job.status == "succeeded", job.error
    assert job.fine_tuned_model == f"ft:{BaseModel.default().name}:sdk:banana:{job.id}"
    assert job.trained_tokens > 0 and job.finished_at >= job.created_at

    events = list(client.fine_tuning.jobs.list_events(job.id, limit=100))
    messages = [event.message for event in events]
    assert messages[0] == f"Job succeeded: {job.fine_tuned_model}."  # newest first
    assert messages[-1] == "Job created and queued."
    assert any(m.startswith("Step 3/3: training loss") for m in messages)

    [result_file] = job.result_files  # the metrics by step, as OpenAI's clients read them
    assert client.files.retrieve(result_file).purpose == "fine-tune-results"
    lines = client.files.content(result_file).text.splitlines()
    assert lines[0] == "step,train_loss,valid_loss,learning_rate"
    assert [int(line.split(",")[0]) for line in lines[1:]] == [1, 2, 3]

    checkpoints = list(client.fine_tuning.jobs.checkpoints.list(job.id))
    assert [c.step_number for c in checkpoints] == [3, 2]
    assert checkpoints[0].fine_tuned_model_checkpoint.endswith(":ckpt-step-3")
    assert checkpoints[0].metrics.train_loss > 0

    assert job.fine_tuned_model in [model.id for model in client.models.list()]
    assert client.models.retrieve(job.fine_tuned_model).id == job.fine_tuned_model
    assert [j.id for j in client.fine_tuning.jobs.list(limit=5)] == [job.id]

    second = client.fine_tuning.jobs.create(
        model=BaseModel.default().name,
        training_file=file.id,
        hyperparameters={"n_epochs": 3, "batch_size": 1},
    )
    client.fine_tuning.jobs.cancel(second.id)
    cancelled = wait_for(
        lambda: client.fine_tuning.jobs.retrieve(second.id),
        lambda j: j.status == "cancelled",
        timeout=120,
        interval=0.5,
        what="the second job to be cancelled",
    )
    assert cancelled.fine_tuned_model is None

    with pytest.raises(openai.NotFoundError):
        client.fine_tuning.jobs.retrieve("ftjob-missing")

    # A checkpoint named as the model: the new job continues from its weights; paused once
    # running, it writes a checkpoint and waits; resumed, it goes on from there.
    step_2 = checkpoints[1].fine_tuned_model_checkpoint
    continued = client.fine_tuning.jobs.create(
        model=step_2,
        training_file=file.id,
        hyperparameters={"batch_size": 4, "max_steps": 8, "max_seq_length": 128},
    )
    wait_for(
        lambda: FineTuneJob.objects.get(pk=continued.id),
        lambda j: (j.progress or {}).get("step", 0) >= 1,
        timeout=600,
        interval=0.2,
        what="the continued job's first step",
    )
    assert client.fine_tuning.jobs.pause(continued.id).id == continued.id
    paused = wait_for(
        lambda: client.fine_tuning.jobs.retrieve(continued.id),
        lambda j: j.status != "running",
        timeout=120,
        interval=0.5,
        what="the job to pause",
    )
    assert paused.status == "paused"
    [kept] = client.fine_tuning.jobs.checkpoints.list(continued.id)
    assert 1 <= kept.step_number < 8
    with pytest.raises(openai.BadRequestError, match="not paused"):
        client.fine_tuning.jobs.resume(job.id)
    assert client.fine_tuning.jobs.resume(continued.id).status == "queued"
    continued = wait_for(
        lambda: client.fine_tuning.jobs.retrieve(continued.id),
        lambda j: j.status in ("succeeded", "failed", "cancelled"),
        timeout=600,
        interval=1,
        what="the resumed job",
    )
    assert continued.status == "succeeded", continued.error
    resumed = [e.message for e in client.fine_tuning.jobs.list_events(continued.id, limit=100)]
    assert f"Resuming from the checkpoint at step {kept.step_number}." in resumed
    start = FineTuneJob.objects.get(pk=continued.id).parent_adapter
    assert start.name == step_2 and start.metrics["step"] == 2
    checkpoint = Checkpoint.objects.get(job_id=job.id, step=2)
    theirs = json.loads(storage.get_bytes(f"{checkpoint.s3_prefix}manifest.json"))
    assert start.manifest["files"][ADAPTER_WEIGHTS] == theirs["files"][ADAPTER_WEIGHTS]
    assert storage.list_keys(start.s3_prefix)  # copied: pruning the job's checkpoints spares it
    with pytest.raises(openai.BadRequestError, match="does not exist"):  # no checkpoint there
        client.fine_tuning.jobs.create(model=step_2.replace("-2", "-1"), training_file=file.id)
