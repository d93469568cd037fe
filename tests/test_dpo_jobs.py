"""DPO jobs end to end: the official openai client trains a supervised adapter, then a DPO
child of it on a learnable preference; the stored evaluation shows the preference learned on
held-out pairs (and the greedy answers that follow it), measured against the parent as the
reference. And the API's refusals: the wrong file, the wrong method's hyperparameter."""

import math
import random

import openai
import pytest

from jobs.models import BaseModel, FineTuneJob
from tests.helpers import (
    api_client_for,
    banana_jsonl,
    jsonl,
    make_tenant,
    signed_in,
    upload,
    wait_for,
)


def additions(count: int, seed: int) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    return [(rng.randint(2, 60), rng.randint(2, 60)) for _ in range(count)]


def question(a: int, b: int) -> dict:
    return {"role": "user", "content": f"What is {a} plus {b}?"}


def answer(a: int, b: int, verb: str) -> dict:
    return {"role": "assistant", "content": f"{a} plus {b} {verb} {a + b}."}


def supervised_rows(count: int) -> bytes:
    """The task in both house styles, half and half: a parent that answers the sums and has no
    preference between "equals" and "is"."""
    return jsonl(
        {"messages": [question(a, b), answer(a, b, "equals" if i % 2 else "is")]}
        for i, (a, b) in enumerate(additions(count, seed=1))
    )


def preference_rows(count: int, seed: int) -> bytes:
    """The same questions, "equals" preferred to "is": learnable, and near chance for the base
    and the parent (measured: 0.38-0.6 and 0.75)."""
    return jsonl(
        {
            "input": {"messages": [question(a, b)]},
            "preferred_output": [answer(a, b, "equals")],
            "non_preferred_output": [answer(a, b, "is")],
        }
        for a, b in additions(count, seed)
    )


@pytest.mark.slow  # a supervised job and a DPO job of the 135M model: ~4 min on 2 cores
def test_a_dpo_child_of_a_supervised_parent_learns_the_preference_on_held_out_pairs(
    live_server, transactional_db, celery_worker
):
    BaseModel.seed_bundled()
    tenant = make_tenant("dpo", "owner")
    client = openai.OpenAI(api_key=tenant.secret, base_url=f"{live_server.url}/v1", max_retries=0)

    def finished(job_id: str):
        return wait_for(
            lambda: client.fine_tuning.jobs.retrieve(job_id),
            lambda j: j.status in ("succeeded", "failed", "cancelled"),
            timeout=900,
            interval=1,
            what=f"the job {job_id} to finish",
        )

    upload_file = lambda name, content: client.files.create(  # noqa: E731
        file=(name, content), purpose="fine-tune"
    )
    sft_file = upload_file("sums.jsonl", supervised_rows(48))
    pairs_file = upload_file("pairs.jsonl", preference_rows(48, seed=2))
    held_out_file = upload_file("held.jsonl", preference_rows(16, seed=3))
    shared = {"batch_size": 8, "max_seq_length": 128, "lora_rank": 8, "lora_alpha": 16}
    parent = client.fine_tuning.jobs.create(
        model=BaseModel.default().name,
        training_file=sft_file.id,
        suffix="sums",
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2, **shared}}},
    )
    parent = finished(parent.id)
    assert parent.status == "succeeded", parent.error

    # The official client, unchanged, with OpenAI's DPO method object; the parent is named
    # OpenAI's way (its fine-tuned model as the model).
    child = client.fine_tuning.jobs.create(
        model=parent.fine_tuned_model,
        training_file=pairs_file.id,
        validation_file=held_out_file.id,
        suffix="equals",
        method={
            "type": "dpo",
            "dpo": {"hyperparameters": {"beta": "auto", "n_epochs": 2, "batch_size": 8}},
        },
    )
    assert child.method.type == "dpo"
    child = finished(child.id)
    assert child.status == "succeeded", child.error
    assert child.method.dpo.hyperparameters.beta == 0.1  # auto
    assert "beta" not in client.fine_tuning.jobs.retrieve(parent.id).hyperparameters.model_dump()

    # The parent is the reference: the child starts as it, so its first step's loss is log 2.
    events = [e.message for e in client.fine_tuning.jobs.list_events(child.id, limit=100)]
    first = next(m for m in events if m.startswith("Step 1/"))
    assert abs(float(first.split("training loss ")[1].split()[0]) - math.log(2)) < 0.01, first

    assert child.model_extra["evaluation"]["reference"] == "parent"  # the API's summary
    stored = FineTuneJob.objects.get(pk=child.id).evaluations.get()
    evaluation = stored.results
    base, adapter = evaluation["base"], evaluation["adapter"]
    assert evaluation["reference"] == "parent"
    assert base["pairs"] == adapter["pairs"] == 16
    held_parent = evaluation["parent"]["held_out"]
    print(
        "preference accuracy: base",
        base["preference_accuracy"],
        "parent",
        held_parent["preference_accuracy"],
        "adapter",
        adapter["preference_accuracy"],
        "reward accuracy",
        adapter["reward_accuracy"],
        "margin",
        adapter["reward_margin"],
    )
    assert base["preference_accuracy"] <= 0.75  # about chance, or worse
    assert adapter["preference_accuracy"] >= 0.9
    assert adapter["reward_accuracy"] >= 0.9 and adapter["reward_margin"] > 0
    assert base["reward_accuracy"] is None  # the base has no reference to be measured against
    assert stored.verdict["better"] is True and stored.verdict["worse_on"] == []
    # Greedy answers side by side: the adapter writes the preferred style on most prompts.
    samples = evaluation["samples"]
    assert len(samples) == 16
    follow = sum(" equals " in s["adapter_output"] for s in samples)
    assert follow >= 12, [s["adapter_output"] for s in samples]
    assert "preference_wins" not in adapter
    # The job's page and the adapters list show it in words.
    browser = signed_in(tenant)
    page = browser.get(f"/jobs/{child.id}/live").content.decode()
    assert "Preference accuracy" in page and "Reward margin" in page
    listed = browser.get("/adapters").content.decode()
    before, after = base["preference_accuracy"], adapter["preference_accuracy"]
    assert f"preference accuracy {before:.0%} → {after:.0%}" in listed


@pytest.mark.django_db
def test_the_api_refuses_dpo_on_a_file_without_pairs_and_beta_for_supervised(tenant_a):
    api = api_client_for(tenant_a.secret)
    chats = upload(api, banana_jsonl()).json()
    pairs = upload(api, preference_rows(8, seed=4), "pairs.jsonl").json()
    assert pairs["status"] == "processed", pairs

    def create(file_id: str, method: dict):
        body = {"model": BaseModel.default().name, "training_file": file_id, "method": method}
        return api.post("/v1/fine_tuning/jobs", body, format="json")

    refused = create(chats["id"], {"type": "dpo", "dpo": {"hyperparameters": {}}})
    assert refused.status_code == 400
    assert refused.json()["error"]["param"] == "training_file"
    assert "needs a preference file" in refused.json()["error"]["message"]

    refused = create(
        pairs["id"], {"type": "supervised", "supervised": {"hyperparameters": {"beta": 0.2}}}
    )
    assert refused.status_code == 400
    assert "beta applies to dpo jobs only" in refused.json()["error"]["message"]

    refused = create(pairs["id"], {"type": "dpo", "dpo": {"hyperparameters": {"gpus": 2}}})
    assert refused.status_code == 400
    assert "gpus must be 1 for a DPO job" in refused.json()["error"]["message"]

    refused = create(pairs["id"], {"type": "reinforcement", "reinforcement": {}})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "method"

    refused = create(pairs["id"], {"type": "dpo", "dpo": {"hyperparameters": {"beta": 5}}})
    assert (
        refused.status_code == 400
        and "beta must be in (0, 2]" in refused.json()["error"]["message"]
    )

    # A supervised job on a preference file trains on the preferred answers; a DPO job plans
    # both answers of every pair.
    supervised = create(pairs["id"], {"type": "supervised"})
    assert supervised.status_code == 200, supervised.json()
    assert supervised.json()["method"]["type"] == "supervised"
    dry = api.post(
        "/v1/fine_tuning/jobs",
        {
            "model": BaseModel.default().name,
            "training_file": pairs["id"],
            "method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2}}},
            "dry_run": True,
        },
        format="json",
    ).json()
    assert dry["hyperparameters"]["beta"] == 0.2
    job = create(
        pairs["id"], {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2, "n_epochs": 1}}}
    )
    assert job.status_code == 200, job.json()
    assert job.json()["method"] == {
        "type": "dpo",
        "dpo": {"hyperparameters": job.json()["hyperparameters"]},
    }
    assert job.json()["hyperparameters"]["beta"] == 0.2
    for created in (supervised.json(), job.json()):
        api.post(f"/v1/fine_tuning/jobs/{created['id']}/cancel")
