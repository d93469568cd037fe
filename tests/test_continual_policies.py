"""Continual policies (jobs/continual.py): set by API or on the Traffic page; when due, one run
per alias builds a training file from the alias's traffic, submits a child job of the alias's
adapter, and puts the child through the alias's gate. Without a worker: the child job's end and
the gate's evaluations are written as rows, as the worker leaves them (the whole loop with real
training: tests/test_continual_loop.py)."""

from datetime import timedelta

import pytest
from django.conf import settings
from django.utils import timezone

from jobs import continual
from jobs.models import ContinualPolicy, FineTuneJob, PolicyRun
from jobs.models.aliases import Alias
from loft.models import WebhookDelivery, WebhookEndpoint
from tests.helpers import signed_in, stored_completion
from tests.test_aliases_api import adapter_of, eval_file, finished_evaluation, scored

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("private_queue")]


@pytest.fixture
def cast(tenant_a, tmp_path):
    """Tenant A's two adapters of one base, an eval file, and the alias "support" on the first,
    the file pinned."""
    current = adapter_of(tenant_a, tmp_path, "current")
    candidate = adapter_of(tenant_a, tmp_path, "candidate")
    file = eval_file(tenant_a)
    Alias.create_for(tenant_a.org, "support", current, [file], actor="test")
    return current, candidate, file


def corrected(org, count: int, start: int = 0) -> None:
    """``count`` stored completions of the alias "support", each corrected."""
    for i in range(start, start + count):
        question = [{"role": "user", "content": f"What is {i} + {i}?"}]
        completion = stored_completion(org, alias="support", messages=question, content="?")
        completion.give_feedback(None, str(2 * i))


def test_a_policy_is_set_read_changed_and_stopped_by_api(api_a, cast):
    assert api_a.get("/v1/aliases/support/policy").status_code == 404
    refused = api_a.post("/v1/aliases/support/policy", {}, format="json")
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "every_completions"
    bad = api_a.post(
        "/v1/aliases/support/policy",
        {"every_completions": 10, "hyperparameters": {"n_epochs": 0}},
        format="json",
    )
    assert bad.status_code == 400 and "n_epochs" in bad.json()["error"]["message"]
    too_often = api_a.post("/v1/aliases/support/policy", {"every_seconds": 5}, format="json")
    assert too_often.status_code == 400 and too_often.json()["error"]["param"] == "every_seconds"

    body = {"every_completions": 50, "hyperparameters": {"n_epochs": 2}}
    created = api_a.post("/v1/aliases/support/policy", body, format="json").json()
    assert created["object"] == "alias.policy" and created["every_completions"] == 50
    assert created["hyperparameters"] == {"n_epochs": 2} and created["new_feedback"] == 0
    changed = api_a.post(
        "/v1/aliases/support/policy", {"every_seconds": 3600, "enabled": False}, format="json"
    ).json()
    assert changed["every_completions"] is None and changed["every_seconds"] == 3600
    assert changed["enabled"] is False and changed["counting_since"] == created["counting_since"]
    assert api_a.get("/v1/aliases/support/policy").json() == changed
    assert api_a.get("/v1/aliases/support/policy/runs").json() == {"object": "list", "data": []}
    assert api_a.delete("/v1/aliases/support/policy").json()["deleted"] is True
    assert api_a.get("/v1/aliases/support/policy").status_code == 404


def test_a_due_policy_starts_one_run_with_a_traffic_file_and_a_child_job(api_a, tenant_a, cast):
    current, _, _ = cast
    org = tenant_a.org
    api_a.post(
        "/v1/aliases/support/policy",
        {"every_completions": 3, "hyperparameters": {"n_epochs": 2}},
        format="json",
    )
    corrected(org, 2)
    assert continual.advance_all() == {"started": 0, "running": 0}  # 2 of 3: not yet
    corrected(org, 1, start=2)
    assert continual.advance_all()["started"] == 1
    run = PolicyRun.objects.get()
    assert run.status == "training" and run.parent_adapter == current.id
    assert "3 new rated or corrected completions" in run.trigger
    assert run.training_file.report["traffic"]["alias"] == "support"
    job = run.job
    assert job.parent_adapter_id == current.id and job.training_file_id == run.training_file_id
    assert job.status == FineTuneJob.Status.VALIDATING_FILES  # the file is built by a worker
    assert job.requested_hyperparameters == {"n_epochs": 2}
    assert job.metadata == {"alias": "support", "policy_run": run.id}
    # Idempotent: more feedback while the run is on starts nothing; the next counts from the
    # start of this one.
    corrected(org, 3, start=3)
    assert continual.advance_all() == {"started": 0, "running": 1}
    assert PolicyRun.objects.count() == 1 and FineTuneJob.objects.count() == 1
    listed = api_a.get("/v1/aliases/support/policy/runs").json()["data"]
    assert [(r["id"], r["status"], r["job"]) for r in listed] == [(run.id, "training", job.id)]
    assert api_a.get("/v1/aliases/support/policy").json()["new_feedback"] == 3

    # The job fails (here: its file did): the run ends, saying why, and the next one may start.
    job.status, job.error = "failed", {"message": "The file failed validation: no rows."}
    job.save()
    assert continual.advance_all() == {"started": 1, "running": 1}
    run.refresh_from_db()
    assert run.status == "failed" and "no rows" in run.reason and run.finished_at


def test_an_interval_policy_waits_for_its_time_and_for_new_feedback(tenant_a, cast):
    alias = Alias.objects.get(name="support")
    policy = ContinualPolicy.set_for(alias, every_completions=None, every_seconds=3600)
    later = timezone.now() + timedelta(hours=2)
    assert continual.advance_all(later)["started"] == 0  # nothing new to learn
    corrected(tenant_a.org, 1)
    assert continual.advance_all(timezone.now())["started"] == 0  # not time yet
    assert continual.advance_all(later)["started"] == 1
    assert "since the last run" in PolicyRun.objects.get().trigger
    policy.refresh_from_db()
    assert policy.counting_since == later


def finished_child(run: PolicyRun, adapter) -> None:
    """The run's child job succeeded with ``adapter``, as a worker leaves it."""
    job = run.job
    adapter.job, adapter.parent_id = job, run.parent_adapter
    adapter.save()
    job.status = FineTuneJob.Status.SUCCEEDED
    job.save()


@pytest.mark.parametrize("passes", [True, False], ids=["promoted", "refused"])
def test_a_run_promotes_its_child_through_the_gate_or_leaves_the_alias_and_says_why(
    api_a, tenant_a, cast, passes
):
    current, candidate, file = cast
    org = tenant_a.org
    WebhookEndpoint.objects.create(org=org, url="http://127.0.0.1:9/hook")
    ContinualPolicy.set_for(
        Alias.objects.get(name="support"), every_completions=1, every_seconds=None
    )
    corrected(org, 1)
    continual.advance_all()
    run = PolicyRun.objects.get()
    finished_child(run, candidate)
    continual.advance_all()
    run.refresh_from_db()
    assert run.status == "evaluating" and run.child_adapter == candidate.id
    assert Alias.objects.get(name="support").adapter_id == current.id  # evaluations queued

    now = scored(36) if passes else scored(10)  # of 40 rows, against the current's 20
    finished_evaluation(tenant_a, file, current, candidate, scored(20), now)
    continual.advance_all()
    run.refresh_from_db()
    alias = Alias.objects.get(name="support")
    event = WebhookDelivery.objects.get(event_type__startswith="alias.")
    assert event.payload["data"]["to_adapter"] == candidate.id
    assert event.payload["data"]["actor"] == "continual policy of support"
    page = signed_in(tenant_a).get(f"/adapters/{candidate.id}").content.decode()
    traffic = signed_in(tenant_a).get("/deployments/support/traffic").content.decode()
    assert run.status in traffic
    if passes:
        assert run.status == "promoted" and alias.adapter_id == candidate.id
        assert run.move.kind == "promoted" and "A gain on" in run.reason
        assert event.event_type == "alias.promoted"
        assert "Flagged" not in page
    else:
        assert run.status == "refused" and alias.adapter_id == current.id
        assert run.reason.startswith("The gate kept support where it was.")
        assert "drops by 0.250" in run.reason and run.move.kind == "refused"
        assert event.event_type == "alias.promotion_refused"
        assert event.payload["data"]["evidence"]["passed"] is False
        assert "Flagged: the promotion gate of" in page and "drops by 0.250" in page
    [shown] = api_a.get("/v1/aliases/support/policy/runs").json()["data"]
    assert shown["status"] == run.status and shown["child_adapter"] == candidate.id
    assert shown["move"] == f"aliasmove-{run.move_id}" and shown["reason"] == run.reason


def test_the_traffic_page_sets_and_stops_the_policy(tenant_a, cast):
    browser = signed_in(tenant_a)
    page = browser.get("/deployments/support/traffic").content.decode()
    assert "Continual training" in page and "Start" in page
    response = browser.post(
        "/deployments/support/traffic/policy", {"every_completions": "", "every_hours": ""}
    )
    assert "Say when to train" in browser.get(response.url).content.decode()
    browser.post("/deployments/support/traffic/policy", {"every_completions": "25"})
    policy = ContinualPolicy.objects.get()
    assert (policy.every_completions, policy.every_seconds) == (25, None)
    browser.post("/deployments/support/traffic/policy", {"every_hours": "12"})
    policy.refresh_from_db()
    assert (policy.every_completions, policy.every_seconds) == (None, 12 * 3600)
    assert "every 12 h" in browser.get("/deployments/support/traffic").content.decode()
    browser.post("/deployments/support/traffic/policy", {"stop": "1"})
    assert not ContinualPolicy.objects.exists()


def test_beat_runs_the_policies_every_minute():
    entry = settings.CELERY_BEAT_SCHEDULE["advance-continual-policies"]
    assert entry["task"] == "worker.tasks.advance_continual_policies"
    assert entry["schedule"] == settings.LOFT_CONTINUAL_EVERY_SECONDS == 60
