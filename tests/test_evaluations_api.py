"""``/v1/evaluations`` and ``/v1/adapters/{id}/generate``: what they accept, refuse and show,
without a worker (the loop itself, through real workers, is tests/test_evaluation_loop.py)."""

import pytest

from jobs.models import Adapter, BaseModel, Evaluation
from tests.helpers import api_client_for, chat_rows, jsonl, stored_adapter, upload

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


def test_the_playground_refuses_bad_requests_by_name(api_a, api_b, tenant_a, tmp_path):
    adapter = stored_adapter(tenant_a, tmp_path)
    url = f"/v1/adapters/{adapter.id}/generate"
    user = {"role": "user", "content": "Hi"}
    for body, param in [
        ({}, "messages"),
        ({"messages": [{"role": "assistant", "content": "Hi"}]}, "messages"),
        ({"messages": [{"role": "wizard", "content": "Hi"}]}, "messages.role"),
        ({"messages": [user], "max_tokens": 100_000}, "max_tokens"),
        ({"messages": [user], "temperature": 5}, "temperature"),
        ({"messages": [user], "top_k": 3}, "top_k"),
    ]:
        response = api_a.post(url, body, format="json")
        assert response.status_code == 400, (body, response.content)
        assert response.json()["error"]["param"].startswith(param.split(".")[0]), response.json()
    assert api_b.post(url, {"messages": [user]}, format="json").status_code == 404


def test_without_an_inference_worker_the_playground_says_so_in_time(
    api_a, tenant_a, tmp_path, inference_queue
):
    adapter = stored_adapter(tenant_a, tmp_path)
    url = f"/v1/adapters/{adapter.id}/generate"
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
    response = api_a.post(url, body, format="json")
    assert response.status_code == 503
    error = response.json()["error"]
    assert error["code"] == "inference_unavailable" and "No inference worker" in error["message"]
    streamed = api_a.post(url, {**body, "stream": True}, format="json")
    text = b"".join(streamed.streaming_content).decode()
    assert '"inference_unavailable"' in text and text.endswith("data: [DONE]\n\n")


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
