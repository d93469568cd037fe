"""Fine-tuning jobs on real Celery workers: QLoRA end to end, continuing from an adapter,
cancel within a step. A few short steps on short rows each. (Killed workers, a lost broker,
S3 down, the time limit: tests/test_chaos.py.)"""

import json
import time

import pytest
import torch
from django.conf import settings

from engine.base_models import load_base_model, load_tokenizer
from jobs.models import Adapter, BaseModel, FineTuneJob
from loft import storage
from tests.helpers import BANANA_ANSWER, banana_file, finished, submit, wait_for

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

    job = submit(tenant_a, banana_file(tenant_a), max_steps=3, checkpoint_every=2)
    job = wait_for(job, finished, what="the job to finish")
    assert job.status == "succeeded", (job.error, [e.message for e in job.events.all()])
    assert job.attempt == 1 and job.trained_tokens > 0
    assert job.progress["step"] == 3 and job.metrics["validation_loss"] is not None
    assert sorted(job.checkpoints.values_list("step", flat=True)) == [2, 3]

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
    assert "## Evaluation on held-out rows" in (folder / "README.md").read_text()

    # A second job on the same worker finds the base model still loaded; it continues from the
    # first job's adapter, and its adapter records that parent.
    second = FineTuneJob.submit(
        org=tenant_a.org,
        training_file=job.training_file,
        parent_adapter=adapter,
        hyperparameters={"max_steps": 1, "batch_size": 4, "max_seq_length": 128},
    )
    second = wait_for(second, finished, what="the second job")
    assert second.status == "succeeded", second.error
    assert any("already loaded" in e.message for e in second.events.all())
    child = Adapter.objects.get(job=second)
    assert child.parent == adapter
    assert "Continued from adapter" in storage.get_bytes(f"{child.s3_prefix}README.md").decode()


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
