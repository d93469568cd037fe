"""Adapters move on evidence, and learn from their traffic, through real workers — the whole
loop of promotion and continual training on two learnable rules (tests/dates.py: dates → ISO
8601, rule A; tests/times.py: times → 24-hour HH:MM, rule B):

1. an adapter that learned rule A is promoted on the alias "helper" over one trained for two
   steps, and the undertrained one is then refused back, with its interval;
2. the alias takes on rule B: B's eval file is pinned beside A's, and B's questions are
   asked of the alias with ``store: true``, and every answer corrected through feedback;
3. the alias's continual policy, run as beat runs it, builds a training file of the
   corrections, trains a child with replay of A's rows, and promotes it through the gate on
   both tasks' pinned eval files: the child learned B and kept A.

One test, because each step needs what the one before trained, and training is the expensive
part on two CPU cores. The same child without replay forgets A: bench/continual.py measures
it (bench/results/continual-*), not this suite.
"""

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from django.db import connection

from jobs import continual
from jobs.models import Adapter, AliasMove, Evaluation, File, FineTuneJob, PolicyRun
from jobs.models.aliases import Alias
from tests.dates import LEARNS_THE_RULE, RULE_ROWS, date_rows
from tests.helpers import api_client_for, finished, jsonl, upload, wait_for
from tests.times import time_rows

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

BASE_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
HELD_OUT_ROWS = 20  # the A jobs' validation file: the rows the child's retention is scored on
EVAL_ROWS = 20  # each task's pinned eval file
TRAFFIC_ROWS = RULE_ROWS  # rule B's questions asked of the alias, each answer corrected
# The good adapter learns rule A in 20 steps; the worse one sees the same rows for two steps
# only and answers like the base.
GOOD_JOB = LEARNS_THE_RULE
WORSE_JOB = {**GOOD_JOB, "max_steps": 2}
# The policy's child: rule B needs more steps than A to be learned: its rows (and the replayed
# ones, replay_fraction left at its default) go three times, in batches of 8 (bench/continual.py
# --child measured one pass in batches of 8: B 0.70; two passes gave 0.52 to 0.96 on its
# held-out rows, depending on the CPU's kernels — too close to the 0.8).
CHILD_JOB = {**GOOD_JOB, "batch_size": 8, "n_epochs": 3}


def uploaded(api, rows: list[dict], name: str, purpose: str = "fine-tune") -> File:
    response = upload(api, jsonl(rows), name=name, purpose=purpose)
    assert response.status_code == 200, response.content
    return File.objects.get(pk=response.json()["id"])


def by_task(evidence: dict) -> tuple[dict, dict]:
    """The gate's entries for the dates file and the times file (it lists them by file id)."""
    files = {entry["file"]: entry for entry in evidence["files"]}
    return files["dates-eval.jsonl"], files["times-eval.jsonl"]


def ask_everything(secret: str, rows: list[dict]) -> list[str]:
    """Rule B's questions asked of "helper" with store: true, eight at a time; their ids."""

    def ask(row: dict) -> str:
        try:
            response = api_client_for(secret).post(
                "/v1/chat/completions",
                {
                    "model": "helper",
                    "messages": row["messages"][:2],  # the instruction and the time
                    "max_tokens": 4,
                    "temperature": 0,
                    "store": True,
                    "metadata": {"task": "times"},
                },
                format="json",
            )
            assert response.status_code == 200, response.content
            return response.json()["id"]
        finally:
            connection.close()  # this thread's

    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(ask, rows))


def test_adapters_are_promoted_on_evidence_and_learn_from_corrected_traffic_without_forgetting(
    tenant_a, celery_worker, inference_worker, settings
):
    # Learning rule A in 20 steps at this learning rate costs the adapter 3 of the suite's 8
    # general probes (measured), which the default share (0.10) refuses: the gate's probe rule
    # is tests/test_promotion_gate.py's; this test judges the tasks. And a drop of one answer
    # in 20 is 0.05: the tolerance here is the continual bar, 90 % of the parent's A kept.
    settings.LOFT_PROMOTION_MAX_PROBES_LOST = 0.5
    settings.LOFT_PROMOTION_MAX_DROP = 0.1
    started = time.monotonic()
    api = api_client_for(tenant_a.secret)
    training = uploaded(api, date_rows(RULE_ROWS, seed=1), "dates.jsonl")
    held_out = uploaded(api, date_rows(HELD_OUT_ROWS, seed=2), "dates-held-out.jsonl")
    a_pinned = uploaded(api, date_rows(EVAL_ROWS, seed=3), "dates-eval.jsonl", purpose="eval")
    b_pinned = uploaded(api, time_rows(EVAL_ROWS, seed=4), "times-eval.jsonl", purpose="eval")

    def launch(suffix: str, hyperparameters: dict) -> FineTuneJob:
        response = api.post(
            "/v1/fine_tuning/jobs",
            {
                "model": BASE_MODEL,
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

    # The alias serves the worse adapter, measured on rule A's eval file.
    response = api.post(
        "/v1/aliases",
        {"name": "helper", "adapter": worse.id, "eval_files": [a_pinned.id]},
        format="json",
    )
    assert response.status_code == 201, response.content

    # --- 1a. the good adapter: evaluated in the background (202), then promoted on evidence
    def promote(adapter: Adapter):
        return api.post("/v1/aliases/helper/promote", {"adapter": adapter.id}, format="json")

    first = promote(good)
    assert first.status_code == 202, first.content
    response = wait_for(
        lambda: promote(good),
        lambda r: r.status_code != 202,
        timeout=900,
        interval=2,
        what="the promotion's evaluations",
        explain=lambda r: f"{r.status_code} {r.content[:500]!r} {celery_worker.output()}",
    )
    assert response.status_code == 200, response.content
    body = response.json()
    evidence = body["move"]["evidence"]
    [a_entry] = evidence["files"]
    print(f"promoted: {a_entry} probes {evidence['probes']}")
    assert body["adapter"] == good.id and body["move"]["kind"] == "promoted"
    assert [a_entry["evaluation"]] == first.json()["evaluations"]
    assert a_entry["rows"] == EVAL_ROWS and a_entry["candidate"] >= 0.8 > a_entry["current"]
    assert a_entry["interval"][0] > 0 and a_entry["significant"] is True
    assert evidence["probes"]["count"] > 0

    # --- 1b. the worse adapter back: the same evaluations hold both, and its drop is refused
    refused = promote(worse)
    assert refused.status_code == 409, refused.content
    body = refused.json()
    [a_entry] = body["evidence"]["files"]
    print(f"refused: {body['error']['message']}")
    assert body["error"]["code"] == "promotion_refused"
    assert a_entry["interval"][1] < 0 and a_entry["dropped"] is True
    assert f"{a_entry['interval'][0]:+.3f}" in body["error"]["message"]
    assert Alias.objects.get(name="helper").adapter_id == good.id
    promoted = time.monotonic()

    # --- 2. the alias takes on rule B: its eval file pinned beside A's, the policy set, B's
    # questions asked of the alias and every answer corrected
    response = api.post(
        "/v1/aliases/helper/eval_files", {"eval_files": [a_pinned.id, b_pinned.id]}, format="json"
    )
    assert response.status_code == 200, response.content
    response = api.post(
        "/v1/aliases/helper/policy",
        {"every_completions": TRAFFIC_ROWS, "hyperparameters": CHILD_JOB},
        format="json",
    )
    assert response.status_code == 200, response.content
    questions = time_rows(TRAFFIC_ROWS, seed=5)
    ids = ask_everything(tenant_a.secret, questions)
    for completion_id, row in zip(ids, questions, strict=True):
        response = api.post(
            f"/v1/chat/completions/{completion_id}/feedback",
            {"correction": row["messages"][-1]["content"]},
            format="json",
        )
        assert response.status_code == 200, response.content
    assert api.get("/v1/aliases/helper/policy").json()["new_feedback"] == TRAFFIC_ROWS
    asked = time.monotonic()

    # --- 3. the policy, as beat runs it: traffic file, child job, the gate, the promotion
    def policy_tick() -> PolicyRun | None:
        continual.advance_all()
        return PolicyRun.objects.first()

    run = wait_for(
        policy_tick,
        lambda run: run is not None and run.status not in PolicyRun.ACTIVE,
        timeout=1800,
        interval=3,
        what="the policy's run",
        explain=lambda run: f"{run and (run.status, run.reason)} {celery_worker.output()}",
    )
    assert run.status == "promoted", run.reason
    child = Adapter.objects.get(pk=run.child_adapter)
    assert Alias.objects.get(name="helper").adapter_id == child.id
    assert child.parent_id == good.id == run.parent_adapter
    # One row per distinct question (some times come up twice), each with its correction.
    distinct = {row["messages"][1]["content"] for row in questions}
    assert run.training_file.report["traffic"]["rows"] == len(distinct)
    assert run.job.hyperparameters["replay_fraction"] == 0.5  # the default

    # The child's own evaluation: B learned on its held-out rows, A kept on the parent's.
    evaluation = Evaluation.objects.get(job=run.job, kind=Evaluation.Kind.JOB)
    b_learned = evaluation.results["adapter"]["normalized_exact_match"]
    [a_kept] = evaluation.retention()
    a_child, a_parent = (a_kept[who]["normalized_exact_match"] for who in ("child", "parent"))
    # And the gate's evidence on the pinned files: A kept, B gained.
    a_gate, b_gate = by_task(run.move.evidence)
    print(
        f"B held out {b_learned:.2f}; A held out: parent {a_parent:.2f}, child {a_child:.2f}; "
        f"gate: A {a_gate['current']:.2f} -> {a_gate['candidate']:.2f}, "
        f"B {b_gate['current']:.2f} -> {b_gate['candidate']:.2f}; "
        f"A jobs {trained - started:.0f} s, promotions {promoted - trained:.0f} s, "
        f"traffic {asked - promoted:.0f} s, policy run {time.monotonic() - asked:.0f} s"
    )
    assert a_kept["adapter"] == good.id and a_kept["rows"] == HELD_OUT_ROWS
    # The base answers none of B (0.00); the child's held-out rows are a tenth of the traffic
    # file (~30 rows, 0.03 a row). With two passes it read 0.96, 0.78 and 0.52 on three
    # machines; with three, 1.00 here and on the gate's pinned file: the 80 %, on both.
    assert b_learned >= 0.8 and b_gate["candidate"] >= 0.8
    assert a_child >= 0.9 * a_parent and a_parent >= 0.8
    assert b_gate["significant"] is True
    assert a_gate["candidate"] >= 0.9 * a_gate["current"]

    # The lineage tells it: two versions, the child scored on both tasks, moved by the policy.
    lineage = api.get(f"/v1/adapters/{child.id}/lineage").json()
    assert lineage["tasks"] == [good.id, child.id]
    assert lineage["versions"][1]["scores"][good.id]["normalized_exact_match"] == a_child
    assert lineage["versions"][1]["moves"][0]["actor"] == "continual policy of helper"
    kinds = list(AliasMove.objects.order_by("created_at", "id").values_list("kind", flat=True))
    assert kinds == ["created", "promoted", "refused", "pinned", "promoted"]
