"""The evaluation loop on a learnable rule (tests/dates.py: free-form dates → ISO 8601), through
real workers: a short QLoRA job lifts held-out exact match from the base's level to ≥ 80 %; an
adapter trained on shuffled answers is flagged by the promotion gate; a custom evaluation ranks
both adapters and the base on an eval file; the playground answers with adapter and base.

One test, because the later steps need the adapters the first ones train, and training is the
expensive part (a few minutes on two CPU cores); each step says what it checks. And, without
training, what a tenant reads when an evaluation or a merge fails on the worker.
"""

import json
import random

import pytest
from django.conf import settings

from jobs.models import Adapter, BaseModel, Evaluation, File, FineTuneJob
from loft import storage
from tests.dates import INSTRUCTION, date_rows
from tests.helpers import (
    WorkerProcess,
    api_client_for,
    chat_rows,
    finished,
    jsonl,
    signed_in,
    stored_adapter,
    upload,
    wait_for,
)
from worker.evaluations import run_evaluation
from worker.merging import run_merge

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

# Small enough for CI on two cores, large enough to learn the rule: measured on the engine with
# these settings, held-out exact match 0 % (base) → 90 % (adapter) after 20 steps.
TRAINING_ROWS = 320
HELD_OUT_ROWS = 40
DATES_JOB = {
    "quantization": "nf4",  # QLoRA
    "lora_rank": 16,
    "lora_alpha": 32,
    "learning_rate_multiplier": 15,  # × 2e-4 = 3e-3: few steps, a simple rule
    "n_epochs": 1,
    "batch_size": 16,
    "warmup_ratio": 0.1,
    "max_seq_length": 64,
    "checkpoint_every": 1000,
}
# Shuffled answers need fewer steps to make an adapter confidently wrong. LoRA on the
# full-precision base, so that the custom evaluation serves adapters of both precisions.
SHUFFLED_JOB = {**DATES_JOB, "max_steps": 8, "quantization": "none"}


def shuffled_answers(rows: list[dict], seed: int = 0) -> list[dict]:
    """The same questions with each other's answers: well-formed dates, all of them wrong."""
    answers = [row["messages"][-1]["content"] for row in rows]
    random.Random(seed).shuffle(answers)
    return [
        {"messages": row["messages"][:-1] + [{"role": "assistant", "content": answer}]}
        for row, answer in zip(rows, answers, strict=True)
    ]


def uploaded(client, rows: list[dict], name: str, purpose: str = "fine-tune") -> File:
    response = upload(client, jsonl(rows), name=name, purpose=purpose)
    assert response.status_code == 200, response.content
    return File.objects.get(pk=response.json()["id"])


def scores_of(evaluation: Evaluation) -> tuple[dict, dict]:
    return evaluation.results["base"], evaluation.results["adapter"]


def test_the_evaluation_loop_on_a_learnable_rule(tenant_a, tenant_b, celery_worker, tmp_path):
    api = api_client_for(tenant_a.secret)
    training = date_rows(TRAINING_ROWS, seed=1)
    held_out = uploaded(api, date_rows(HELD_OUT_ROWS, seed=2), "dates-held-out.jsonl")
    rule_file = uploaded(api, training, "dates.jsonl")
    shuffled_file = uploaded(api, shuffled_answers(training), "dates-shuffled.jsonl")

    def launch(file: File, suffix: str, hyperparameters: dict) -> FineTuneJob:
        response = api.post(
            "/v1/fine_tuning/jobs",
            {
                "model": "HuggingFaceTB/SmolLM2-135M-Instruct",
                "training_file": file.id,
                "validation_file": held_out.id,
                "suffix": suffix,
                "method": {
                    "type": "supervised",
                    "supervised": {"hyperparameters": hyperparameters},
                },
            },
            format="json",
        )
        assert response.status_code == 200, response.content
        return FineTuneJob.objects.get(pk=response.json()["id"])

    rule_job = launch(rule_file, "dates", DATES_JOB)
    shuffled_job = launch(shuffled_file, "shuffled", SHUFFLED_JOB)

    # --- 1. the rule is learned: held-out exact match from the base's level to >= 80 %
    rule_job = wait_for(rule_job, finished, timeout=900, what="the dates job")
    assert rule_job.status == "succeeded", rule_job.error
    evaluation = rule_job.evaluations.get()
    base, adapter = scores_of(evaluation)
    print(
        f"dates: exact match base {base['exact_match']:.2f} -> adapter {adapter['exact_match']:.2f}"
    )
    assert base["generations"] == adapter["generations"] == HELD_OUT_ROWS
    assert adapter["exact_match"] >= 0.8, evaluation.results["worst"]
    assert base["exact_match"] < 0.5
    assert adapter["loss"] < base["loss"]
    assert evaluation.verdict["better"] is True
    job_body = api.get(f"/v1/fine_tuning/jobs/{rule_job.id}").json()
    assert job_body["evaluation"]["base"]["exact_match"] == base["exact_match"]
    assert job_body["evaluation"]["adapter"]["exact_match"] == adapter["exact_match"]
    # The forgetting check ran on the probe set for both models.
    forgetting = evaluation.results["forgetting"]
    assert forgetting["probes"] > 0 and 0 <= forgetting["adapter"]["answered"] <= 1
    rule_adapter = Adapter.objects.get(job=rule_job)

    # --- 2. the promotion gate: shuffled answers make an adapter worse than its base, flagged
    shuffled_job = wait_for(shuffled_job, finished, timeout=900, what="the shuffled job")
    assert shuffled_job.status == "succeeded", shuffled_job.error
    flagged = shuffled_job.evaluations.get()
    assert flagged.verdict["better"] is False, flagged.results["base"]
    assert flagged.verdict["worse_on"]
    shuffled_adapter = Adapter.objects.get(job=shuffled_job)
    assert api.get(f"/v1/adapters/{shuffled_adapter.id}").json()["flagged_worse_than_base"]
    assert not api.get(f"/v1/adapters/{rule_adapter.id}").json()["flagged_worse_than_base"]
    shown = api.get(f"/v1/fine_tuning/jobs/{shuffled_job.id}").json()["evaluation"]
    assert shown["verdict"]["better"] is False
    # Each adapter is served on the base precision it was trained on.
    assert shown["base_precision"] == {
        "trained_on": "none",
        "served_on": "none",
        "adapter": {"none": flagged.results["adapter"]},
    }
    assert api.get(f"/v1/adapters/{shuffled_adapter.id}").json()["base_quantization"] == "none"
    assert api.get(f"/v1/adapters/{rule_adapter.id}").json()["base_quantization"] == "nf4"
    assert job_body["evaluation"]["base_precision"]["served_on"] == "nf4"

    # --- 3. a custom evaluation: both adapters and the base on an eval file, in the background
    eval_file = uploaded(api, date_rows(20, seed=3), "dates-eval.jsonl", purpose="eval")
    response = api.post(
        "/v1/evaluations",
        {"file": eval_file.id, "models": [rule_adapter.name, shuffled_adapter.id]},
        format="json",
    )
    assert response.status_code == 200, response.content
    created = response.json()
    assert created["status"] == "queued" and created["kind"] == "custom"
    custom = wait_for(
        lambda: Evaluation.objects.get(pk=created["id"]),
        lambda evaluation: evaluation.status in Evaluation.FINISHED,
        interval=0.5,
        what=f"evaluation {created['id']} to finish",
    )
    assert custom.status == "succeeded", custom.error
    body = api.get(f"/v1/evaluations/{custom.id}").json()
    by_model = {entry["model"]: entry for entry in body["models"]}
    assert list(by_model) == [
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        rule_adapter.name,
        shuffled_adapter.name,
    ]
    assert by_model[rule_adapter.name]["exact_match"] >= 0.8
    assert (
        by_model[rule_adapter.name]["exact_match"] > by_model[shuffled_adapter.name]["exact_match"]
    )
    assert len(body["samples"][0]["outputs"]) == 3
    # Another tenant sees none of it.
    assert api_client_for(tenant_b.secret).get(f"/v1/evaluations/{custom.id}").status_code == 404
    assert api_client_for(tenant_b.secret).get("/v1/evaluations").json()["data"] == []

    # The leaderboard of the eval file ranks the adapter that learned the rule first.
    browser = signed_in(tenant_a)
    page = browser.get(f"/datasets/{eval_file.id}/leaderboard").content.decode()
    assert page.index(rule_adapter.name) < page.index(shuffled_adapter.name)
    report = browser.get(f"/evaluations/{evaluation.id}").content.decode()
    assert "General knowledge" in report and "Side by side" in report
    assert "Loaded on the full-precision base instead" in report

    # --- 4. the playground: adapter and base answer the same message on an inference worker
    inference = WorkerProcess(tmp_path, name="inference-worker", queue="inference").start()
    try:
        ask = {
            "model": rule_adapter.name,
            "messages": [
                {"role": "system", "content": INSTRUCTION},
                {"role": "user", "content": "March 5, 2021"},
            ],
            "max_tokens": 16,
            "temperature": 0,
        }
        answer = api.post("/v1/chat/completions", ask, format="json")
        assert answer.status_code == 200, answer.content
        completion = answer.json()
        assert completion["object"] == "chat.completion"
        assert completion["choices"][0]["message"]["content"].strip() == "2021-03-05"
        assert completion["usage"]["completion_tokens"] > 0

        base_name = "HuggingFaceTB/SmolLM2-135M-Instruct"
        streamed = api.post(
            "/v1/chat/completions", {**ask, "model": base_name, "stream": True}, format="json"
        )
        assert streamed["Content-Type"].startswith("text/event-stream")
        events = b"".join(streamed.streaming_content).decode().split("\n\n")
        assert events[-2] == "data: [DONE]"
        chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
        base_text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
        assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
        assert chunks[0]["model"] == base_name
        assert base_text.strip() != "2021-03-05" or base["exact_match"] > 0

        # The browser page without JavaScript: both answers at once.
        page = browser.post(
            f"/adapters/{rule_adapter.id}/playground",
            {"system": INSTRUCTION, "prompt": "July 4, 1990", "max_tokens": 16, "temperature": 0},
        ).content.decode()
        assert page.count("<pre") >= 2 and "1990-07-04" in page
    finally:
        inference.stop()


def test_a_failed_evaluation_or_merge_tells_the_tenant_a_sentence_not_storage_internals(
    tenant_a, tmp_path, private_queue
):
    """Their objects gone from storage: the worker's tasks (run here, in process) end them
    failed with a sentence; the endpoint, bucket and keys stay in the operators' log."""
    internals = ("orgs/", settings.S3_BUCKET, settings.S3_ENDPOINT_URL, "NoSuchKey", "404")

    adapter = stored_adapter(tenant_a, tmp_path)
    file = uploaded(api_client_for(tenant_a.secret), chat_rows(4), "eval.jsonl", purpose="eval")
    storage.delete_object(file.s3_key)
    evaluation = Evaluation.submit(
        org=tenant_a.org,
        file=file,
        base_model=BaseModel.default(),
        adapters=[adapter],
        options={"max_generations": 1, "max_new_tokens": 4},
    )
    run_evaluation(evaluation.id)
    evaluation.refresh_from_db()
    assert evaluation.status == "failed" and evaluation.error["code"] == "storage_unavailable"
    assert not [word for word in internals if word in evaluation.error["message"]]

    storage.delete_prefix(adapter.s3_prefix)
    assert adapter.request_merge()
    run_merge(adapter.id)
    adapter.refresh_from_db()
    assert adapter.merged_status == "failed" and "unavailable" in adapter.merged_error
    assert not [word for word in internals if word in adapter.merged_error]
