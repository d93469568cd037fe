"""``/v1/evaluations``, the limits of inference requests and the playground: what they accept,
refuse and show, without a worker (the loop itself, through real workers, is
tests/test_evaluation_loop.py)."""

import time

import pytest

from jobs import inference, playground
from jobs.models import Adapter, BaseModel, Evaluation, FineTuneJob, Quota, QuotaExceeded
from jobs.usage import quota_meters, usage_of
from tests.helpers import (
    api_client_for,
    banana_file,
    chat_rows,
    jsonl,
    signed_in,
    stored_adapter,
    submit,
    upload,
)
from worker import serving
from worker.serving import submit_generation

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("private_queue")]


@pytest.fixture
def inference_queue(settings):
    """Playground requests go to a queue no worker consumes, and are given up quickly."""
    settings.LOFT_INFERENCE_QUEUE = "nobody-listens"
    settings.LOFT_INFERENCE_TIMEOUT_SECONDS = 2
    return settings.LOFT_INFERENCE_QUEUE


def eval_file(tenant, purpose: str = "eval") -> str:
    response = upload(
        api_client_for(tenant.secret), jsonl(chat_rows(4)), name="eval.jsonl", purpose=purpose
    )
    assert response.status_code == 200, response.content
    return response.json()["id"]


def test_a_custom_evaluation_is_queued_for_the_base_and_the_adapters_named(
    api_a, api_b, tenant_a, tmp_path
):
    adapter = stored_adapter(tenant_a, tmp_path)
    file_id = eval_file(tenant_a)
    response = api_a.post(
        "/v1/evaluations",
        {"file": file_id, "models": [adapter.name], "max_generations": 5},
        format="json",
    )
    assert response.status_code == 200, response.content
    body = response.json()
    assert body["object"] == "evaluation" and body["kind"] == "custom"
    assert body["status"] == "queued" and body["file"] == file_id
    assert [(m["model"], m["adapter"]) for m in body["models"]] == [
        (BaseModel.default().name, None),
        (adapter.name, adapter.id),
    ]
    assert body["options"] == {"max_generations": 5, "max_new_tokens": 64}
    assert api_a.get(f"/v1/evaluations/{body['id']}").json()["status"] == "queued"
    assert [e["id"] for e in api_a.get("/v1/evaluations").json()["data"]] == [body["id"]]
    # Tenants are walls: B sees no evaluation of A's, and cannot name A's adapter or file.
    assert api_b.get(f"/v1/evaluations/{body['id']}").status_code == 404
    assert api_b.get("/v1/evaluations").json()["data"] == []
    refused = api_b.post(
        "/v1/evaluations", {"file": file_id, "models": [adapter.id]}, format="json"
    ).json()["error"]
    assert refused["param"] == "file" and "No such File" in refused["message"]


@pytest.mark.parametrize(
    "change, param, words",
    [
        ({"status": "succeeded"}, "status", "Unknown parameter"),
        ({"models": []}, "models", ""),
        ({"models": ["ft:nothing:here"]}, "models", "does not exist"),
        ({"max_generations": -1}, "max_generations", ""),
        ({"purpose": "fine-tune"}, "file", "purpose 'eval'"),
        ({"other_tenant": True}, "models", "does not exist"),
        ({"two_bases": True}, "models", "one base model"),
    ],
)
def test_a_bad_evaluation_request_is_refused_by_name_and_creates_nothing(
    api_a, tenant_a, tenant_b, tmp_path, change, param, words
):
    adapter = stored_adapter(tenant_a, tmp_path)
    body = {"file": eval_file(tenant_a, change.pop("purpose", "eval")), "models": [adapter.id]}
    if change.pop("other_tenant", False):
        (tmp_path / "b").mkdir()
        body["models"] = [stored_adapter(tenant_b, tmp_path / "b").id]
    if change.pop("two_bases", False):
        other = BaseModel.objects.create(
            name="example/other-base", source="example/other-base", revision="main",
            parameters=1, context_length=512,
        )  # fmt: skip
        body["models"].append(
            Adapter.objects.create(
                org=tenant_a.org, name="ft:other", base_model=other, s3_prefix="x/"
            ).id
        )
    response = api_a.post("/v1/evaluations", {**body, **change}, format="json")
    assert response.status_code == 400, response.content
    error = response.json()["error"]
    assert error["param"] == param and words in error["message"]
    assert not Evaluation.objects.exists()


def test_evaluation_leaderboard_and_playground_pages_are_the_tenants_own(
    api_a, tenant_a, tenant_b, tmp_path, client
):
    adapter = stored_adapter(tenant_a, tmp_path)
    file_id = eval_file(tenant_a)
    created = api_a.post(
        "/v1/evaluations", {"file": file_id, "models": [adapter.id]}, format="json"
    ).json()
    pages = [
        f"/evaluations/{created['id']}",
        f"/datasets/{file_id}/leaderboard",
        f"/adapters/{adapter.id}/playground",
    ]
    client.force_login(tenant_a.user)
    for page in pages:
        assert client.get(page).status_code == 200, page
    assert "No model has been evaluated on this set yet" in client.get(pages[1]).content.decode()
    client.force_login(tenant_b.user)
    for page in pages:
        assert client.get(page).status_code == 404, page


def test_the_playground_refuses_a_conversation_that_leaves_no_room_for_the_answer(
    api_a, tenant_a, tmp_path, client, inference_queue
):
    adapter = stored_adapter(tenant_a, tmp_path)
    BaseModel.objects.filter(pk=adapter.base_model_id).update(context_length=100)
    url = "/v1/chat/completions"
    long = {"role": "user", "content": "Tell me more about the weather. " * 20}
    body = {"model": adapter.name, "messages": [long], "max_tokens": 64}
    response = api_a.post(url, body, format="json")
    assert response.status_code == 400, response.content
    error = response.json()["error"]
    assert error["code"] == "context_length_exceeded" and error["param"] == "messages"
    assert "context of 100 tokens, less max_tokens (64), leaves room for 36" in error["message"]
    assert int(error["message"].split("The messages are ")[1].split()[0]) > 36

    # A short question fits; it goes on to the (absent) worker.
    short = {"model": adapter.name, "messages": [{"role": "user", "content": "Hi"}]}
    assert api_a.post(url, {**short, "max_tokens": 8}, format="json").status_code == 503

    client.force_login(tenant_a.user)
    page = client.post(
        f"/adapters/{adapter.id}/playground", {"prompt": long["content"], "max_tokens": 64}
    )
    assert page.status_code == 200 and "leaves room for 36" in page.content.decode()


def test_an_organization_gets_429_past_its_running_inference_requests(
    api_a, api_b, tenant_a, tenant_b, tmp_path, settings, inference_queue
):
    settings.LOFT_INFERENCE_CONCURRENT_PER_ORG = 1
    adapter = stored_adapter(tenant_a, tmp_path)
    (tmp_path / "b").mkdir()
    adapter_b = stored_adapter(tenant_b, tmp_path / "b")
    hi = [{"role": "user", "content": "Hi"}]

    def ask(api, model):
        return api.post("/v1/chat/completions", {"model": model, "messages": hi}, format="json")

    running = inference.admit(tenant_a.org.id, 10)  # a request of A's, still answering
    refused = ask(api_a, adapter.name)
    assert refused.status_code == 429, refused.content
    assert refused["Retry-After"] == "5"
    error = refused.json()["error"]
    assert error["type"] == "rate_limit_error" and error["code"] == "rate_limit_exceeded"
    assert "already has 1 generation requests running" in error["message"]
    assert ask(api_b, adapter_b.name).status_code == 503, "B has places of its own"

    running.release()  # it ended: its place is given back
    assert ask(api_a, adapter.name).status_code == 503


def test_custom_evaluations_and_merges_hold_a_worker_and_count_toward_concurrent_jobs(
    api_a, tenant_a, tmp_path
):
    """Each waits for, then holds, a worker as a job does: past the limit, neither is queued,
    and the tenant reads which quota and why."""
    Quota.objects.create(org=tenant_a.org, max_concurrent_jobs=2)
    adapter = stored_adapter(tenant_a, tmp_path)
    file_id = eval_file(tenant_a)

    def evaluate():
        body = {"file": file_id, "models": [adapter.id]}
        return api_a.post("/v1/evaluations", body, format="json")

    assert evaluate().status_code == 200
    assert adapter.request_merge()
    assert quota_meters(tenant_a.org, usage_of(tenant_a.org)).concurrent_jobs.used == 2

    refused = evaluate()
    assert refused.status_code == 429, refused.content
    error = refused.json()["error"]
    assert (error["code"], error["param"]) == ("quota_exceeded", "concurrent_jobs")
    assert "2 of 2 jobs, evaluations and merges" in error["message"]
    assert Evaluation.objects.filter(org=tenant_a.org).count() == 1
    with pytest.raises(QuotaExceeded):
        submit(tenant_a, banana_file(tenant_a), max_steps=1)
    assert not FineTuneJob.objects.filter(org=tenant_a.org).exists()

    (tmp_path / "other").mkdir()
    other = stored_adapter(tenant_a, tmp_path / "other", name="other")
    page = signed_in(tenant_a).post(f"/adapters/{other.id}/merge", follow=True)
    assert "Quota concurrent_jobs reached" in page.content.decode()
    other.refresh_from_db()
    assert other.merged_status == Adapter.MergedStatus.NONE

    # Once the evaluation is done, there is room again.
    Evaluation.objects.filter(org=tenant_a.org).update(status=Evaluation.Status.SUCCEEDED)
    assert evaluate().status_code == 200


def test_merged_weights_count_toward_the_storage_quota(api_a, tenant_a, tmp_path):
    adapter = stored_adapter(tenant_a, tmp_path)
    before = usage_of(tenant_a.org).storage_bytes
    Adapter.objects.filter(pk=adapter.pk).update(
        merged_status=Adapter.MergedStatus.READY, merged_size_bytes=270_000_000
    )
    assert usage_of(tenant_a.org).storage_bytes == before + 270_000_000
    Quota.objects.create(org=tenant_a.org, max_storage_bytes=before + 1_000_000)
    refused = upload(api_a, jsonl(chat_rows(4)), name="more.jsonl")
    assert refused.status_code == 429 and refused.json()["error"]["param"] == "storage_bytes"


def test_the_worker_refuses_what_it_cannot_answer_before_any_compute(tenant_a, tmp_path):
    """Worker side (worker/serving.py), called here in-process: a request whose prompt no
    longer fits (the base's context changed after the web checked it) or whose adapter was
    deleted gets an error event, and no engine is started for it."""
    adapter = stored_adapter(tenant_a, tmp_path)
    story = [{"role": "user", "content": "Write a long story about a dragon."}]
    target = playground.Target.of_adapter(adapter)
    request = {
        "messages": story,
        "max_tokens": 64,
        "temperature": 0,
        "model": target.model,
        "base_model": adapter.base_model_id,
        "adapter": adapter.id,
        "alias": "",
        "quantization": "none",
        "answer_by": time.time() + 60,
    }
    BaseModel.objects.filter(pk=adapter.base_model_id).update(context_length=40)
    submit_generation("long", tenant_a.org.id, request)
    [event] = playground.read_events("long", time.time() + 5)
    assert event["code"] == "context_length_exceeded" and "context of 40 tokens" in event["message"]

    submit_generation("gone", tenant_a.org.id, {**request, "adapter": "adapter-deleted"})
    [event] = playground.read_events("gone", time.time() + 5)
    assert event["code"] == "model_not_found"
    assert not serving._engines
