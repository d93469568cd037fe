"""An alias moves on evidence, through real workers, on a learnable rule (tests/dates.py: free-form
dates → ISO 8601): an adapter that learned the rule is promoted over one trained for two steps,
and the undertrained one is then refused back, with its interval.

One test, because each step needs the adapters the first one trains, and training is the
expensive part (two short jobs on two CPU cores); the promotions reuse one custom evaluation.
"""

import time

import pytest

from jobs.models import Adapter, File, FineTuneJob
from jobs.models.aliases import Alias, AliasMove
from tests.dates import LEARNS_THE_RULE, RULE_ROWS, date_rows
from tests.helpers import api_client_for, finished, jsonl, upload, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

# The good adapter learns the rule in 20 steps; the worse one sees the same rows for two steps
# only and answers like the base.
TRAINING_ROWS = RULE_ROWS
GOOD_JOB = LEARNS_THE_RULE
WORSE_JOB = {**GOOD_JOB, "max_steps": 2}


def uploaded(api, rows: list[dict], name: str, purpose: str = "fine-tune") -> File:
    response = upload(api, jsonl(rows), name=name, purpose=purpose)
    assert response.status_code == 200, response.content
    return File.objects.get(pk=response.json()["id"])


def test_the_adapter_that_learned_the_rule_is_promoted_and_a_worse_one_refused(
    tenant_a, celery_worker, settings
):
    # Learning the rule in 20 steps at this learning rate costs the adapter 3 of the suite's 8
    # general probes (measured), which the default share (0.10) refuses: the gate's probe rule
    # is tests/test_promotion_gate.py's; this test judges the intervals on learnable data.
    settings.LOFT_PROMOTION_MAX_PROBES_LOST = 0.5
    started = time.monotonic()
    api = api_client_for(tenant_a.secret)
    training = uploaded(api, date_rows(TRAINING_ROWS, seed=1), "dates.jsonl")
    held_out = uploaded(api, date_rows(8, seed=2), "dates-held-out.jsonl")
    pinned = uploaded(api, date_rows(20, seed=3), "dates-pinned.jsonl", purpose="eval")

    def launch(suffix: str, hyperparameters: dict) -> FineTuneJob:
        response = api.post(
            "/v1/fine_tuning/jobs",
            {
                "model": "HuggingFaceTB/SmolLM2-135M-Instruct",
                "training_file": training.id,
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

    worse_job, good_job = launch("worse", WORSE_JOB), launch("good", GOOD_JOB)
    for job in (worse_job, good_job):
        job = wait_for(job, finished, timeout=900, what=f"the {job.suffix} job")
        assert job.status == "succeeded", job.error
    worse, good = Adapter.objects.get(job=worse_job), Adapter.objects.get(job=good_job)
    trained = time.monotonic()

    # The alias serves the worse adapter, measured on the pinned dates file.
    response = api.post(
        "/v1/aliases",
        {"name": "dates", "adapter": worse.id, "eval_files": [pinned.id]},
        format="json",
    )
    assert response.status_code == 201, response.content

    # --- 1. the good adapter: evaluated in the background (202), then promoted on evidence
    def promote(adapter: Adapter):
        return api.post("/v1/aliases/dates/promote", {"adapter": adapter.id}, format="json")

    first = promote(good)
    assert first.status_code == 202, first.content
    response = wait_for(
        lambda: promote(good),
        lambda r: r.status_code != 202,
        timeout=900,
        interval=2,
        what="the promotion's evaluation",
        explain=lambda r: f"{r.status_code} {r.content[:500]!r} {celery_worker.output()}",
    )
    assert response.status_code == 200, response.content
    body = response.json()
    evidence = body["move"]["evidence"]
    [entry] = evidence["files"]
    print(f"promoted: {entry} probes {evidence['probes']}")
    assert body["adapter"] == good.id and body["move"]["kind"] == "promoted"
    assert entry["evaluation"] in first.json()["evaluations"]
    assert entry["rows"] == 20 and entry["candidate"] >= 0.8 > entry["current"]
    assert entry["interval"][0] > 0 and entry["significant"] is True
    assert evidence["probes"]["count"] > 0
    assert Alias.objects.get(name="dates").adapter_id == good.id

    # --- 2. the worse adapter back: the same evaluation holds both, and its drop is refused
    refused = promote(worse)
    assert refused.status_code == 409, refused.content
    body = refused.json()
    [entry] = body["evidence"]["files"]
    print(f"refused: {body['error']['message']}")
    assert body["error"]["code"] == "promotion_refused"
    assert entry["interval"][1] < 0 and entry["dropped"] is True
    assert f"{entry['interval'][0]:+.3f}" in body["error"]["message"]
    assert Alias.objects.get(name="dates").adapter_id == good.id
    kinds = list(AliasMove.objects.order_by("created_at", "id").values_list("kind", flat=True))
    assert kinds == ["created", "promoted", "refused"]
    print(f"training {trained - started:.0f} s, promotions {time.monotonic() - trained:.0f} s")
