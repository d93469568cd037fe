"""Tenants are walls, on every route there is: a matrix generated from the URL resolver.

Every route that takes an object's id is called by tenant A with tenant B's ids, with every
method and a body naming B's ids, through every door it has (an API key or a signed-in browser
under /v1, a signed-in browser elsewhere): the answer is 404 (or 405 for a method the route does
not take), never the object, never a 403 that would confirm it exists. Every list is read by A
and must not name any of B's ids. A new route is in the matrix the moment it is added; a new
kind of id fails here until it has a row in ``OBJECT_OF_PARAM`` / ``OBJECT_OF_API_ROUTE``.

B's ids in a request body (a job's files and parent adapter, an evaluation's file and models,
a list's ``after`` cursor, the wizard's choices) read exactly like ids that exist nowhere, and
create nothing.
"""

import json
from urllib.parse import urlencode

import pytest
from django.test import Client
from django.urls import reverse

from jobs.models import (
    Adapter,
    Alias,
    BaseModel,
    Evaluation,
    File,
    FineTuneJob,
    StoredCompletion,
)
from jobs.views.wizard import PRESETS
from jobs.views.wizard import SESSION_KEY as WIZARD_SESSION_KEY
from loft.models import Invitation, Membership, WebhookEndpoint
from tests.helpers import (
    PASSWORD,
    api_client_for,
    chat_rows,
    jsonl,
    routes,
    signed_in,
    stored_completion,
    upload,
)

pytestmark = pytest.mark.django_db

# Routes with no tenant's object behind them: public, staff-only, or the caller's own session.
NOT_TENANT_ROUTES = {
    "login",
    "logout",
    "healthz",
    "metrics",
    "ops",
    "ops-live",
    "api-docs",
    "api:openapi-schema",
}

# A page's parameter, or an API route's basename, names the kind of object its id is.
OBJECT_OF_PARAM = {
    "job_id": "job",
    "file_id": "file",
    "evaluation_id": "evaluation",
    "adapter_id": "adapter",
    "key_id": "api_key",
    "membership_id": "membership",
    "invitation_id": "invitation",
    "token": "invitation_token",
    "model": "model_name",
    "name": "alias_name",
    "completion_id": "stored_completion",
}
OBJECT_OF_API_ROUTE = {
    "fine-tuning-job": "job",
    "file": "file",
    "adapter": "adapter",
    "evaluation": "evaluation",
    "api-key": "api_key",
    "webhook-endpoint": "webhook_endpoint",
}


def kind_of(name: str, param: str) -> str:
    if name.startswith("api:") and param == "pk":
        for basename, kind in OBJECT_OF_API_ROUTE.items():
            if name.startswith(f"api:{basename}-"):
                return kind
        raise AssertionError(f"{name}: add its basename to OBJECT_OF_API_ROUTE")
    assert param in OBJECT_OF_PARAM, f"{name}: add {param!r} to OBJECT_OF_PARAM"
    return OBJECT_OF_PARAM[param]


B_IDEMPOTENCY_KEY = "b-retries-this"


@pytest.fixture
def objects_of_b(tenant_b, django_user_model) -> dict:
    """One object of every kind, owned by tenant B."""
    org = tenant_b.org
    file = File.objects.create(
        org=org,
        filename="b.jsonl",
        purpose="fine-tune",
        status=File.Status.PROCESSED,
        bytes=10,
        s3_key=File.object_key(org.id, "file-b"),
    )
    eval_file = File.objects.create(
        org=org, filename="b-eval.jsonl", purpose="eval", status="processed", bytes=5, s3_key="x"
    )
    job = FineTuneJob.objects.create(
        org=org,
        base_model=BaseModel.seed_bundled(),
        training_file=file,
        suffix="b",
        idempotency_key=B_IDEMPOTENCY_KEY,
    )
    adapter = Adapter.objects.create(
        org=org,
        name=f"ft:{job.base_model.name}:{org.slug}:b:{job.id}",
        job=job,
        base_model=job.base_model,
        s3_prefix=f"orgs/{org.id}/adapters/x/",
    )
    evaluation = Evaluation.objects.create(
        org=org, kind="custom", status="queued", file=eval_file, base_model=job.base_model
    )
    alias = Alias.objects.create(org=org, name="b-deployment", adapter=adapter)
    alias.eval_files.add(eval_file)
    other_member = django_user_model.objects.create_user("b-second", password=PASSWORD)
    membership = Membership.objects.create(org=org, user=other_member)
    endpoint = WebhookEndpoint.objects.create(org=org, url="https://example.com/hook")
    invitation = org.invite("b-invitee", invited_by=tenant_b.user)
    completion = stored_completion(org, alias.name, adapter, metadata={"team": "b"})
    return {
        "stored_completion": completion.id,
        "job": job.id,
        "file": file.id,
        "eval_file": eval_file.id,
        "adapter": adapter.id,
        "model_name": adapter.name,
        "alias_name": alias.name,
        "evaluation": evaluation.id,
        "api_key": tenant_b.key.id,
        "membership": membership.id,
        "invitation": invitation.id,
        "invitation_token": invitation.token,
        "webhook_endpoint": endpoint.id,
    }


def clients_for(name: str, tenant) -> dict:
    """Every door of a route: /v1 takes an API key and a signed-in browser's session too."""
    browser = Client()
    assert browser.login(username=tenant.user.username, password=PASSWORD)
    if name.startswith("api:"):
        return {"an API key": api_client_for(tenant.secret), "a session": browser}
    return {"a session": browser}


def body_naming(ids: dict) -> dict:
    """A plausible body for any route, naming the other tenant's ids in every field that takes
    one: what a request would send to reach B's objects through the body, not the URL."""
    return {
        "training_file": ids["file"],
        "validation_file": ids["eval_file"],
        "file": ids["eval_file"],
        "model": ids["model_name"],
        "models": [ids["adapter"], ids["model_name"]],
        "hyperparameters": {"parent_adapter": ids["adapter"]},
        "parent": ids["adapter"],
        "messages": [{"role": "user", "content": "Hello"}],
        "prompt": "Hello",
        "name": "renamed",
        "url": "https://example.com/other",
    }


def send(client, method: str, url: str, body: dict):
    """``body`` as JSON under /v1, as a form elsewhere; a GET's in its query string."""
    form = {k: json.dumps(v) if isinstance(v, dict | list) else v for k, v in body.items()}
    if method == "get":
        return client.get(url, form)
    if url.startswith("/v1/"):
        return getattr(client, method)(url, json.dumps(body), content_type="application/json")
    if method == "post":
        return client.post(url, form)
    return getattr(client, method)(
        url, urlencode(form), content_type="application/x-www-form-urlencoded"
    )


def test_every_object_route_answers_404_to_another_tenants_ids(tenant_a, objects_of_b):
    checked = []
    body = body_naming(objects_of_b)
    for name, params in routes():
        if not params or name in NOT_TENANT_ROUTES:
            continue
        kwargs = {param: objects_of_b[kind_of(name, param)] for param in params}
        url = reverse(name, kwargs=kwargs)
        for door, client in clients_for(name, tenant_a).items():
            for method in ("get", "post", "put", "patch", "delete"):
                for response in (getattr(client, method)(url), send(client, method, url, body)):
                    assert response.status_code in (404, 405), (
                        f"{method.upper()} {url} ({name}) as another tenant with {door}: "
                        f"{response.status_code}"
                    )
        checked.append(name)
    # The matrix covers the routes it should; a route left out by mistake would show here.
    assert {"api:file-content", "api:adapter-download", "job-cancel", "playground"} <= set(checked)
    assert {"api:alias-promote", "api:alias-rollback", "deployment-promote"} <= set(checked)
    assert {"api:stored-completion", "api:stored-completion-feedback"} <= set(checked)
    assert len(checked) >= 25, checked
    # And nothing of B's changed on the way.
    job = FineTuneJob.objects.get(pk=objects_of_b["job"])
    assert (job.status, job.cancel_requested) == ("queued", False)
    assert File.objects.filter(pk=objects_of_b["file"]).exists()
    assert Membership.objects.filter(pk=objects_of_b["membership"]).exists()
    assert Invitation.objects.get(pk=objects_of_b["invitation"]).status == "pending"
    assert Alias.objects.get(name=objects_of_b["alias_name"]).adapter_id == objects_of_b["adapter"]
    assert Adapter.objects.filter(pk=objects_of_b["adapter"]).exists()
    completion = StoredCompletion.objects.get(pk=objects_of_b["stored_completion"])
    assert (completion.rating, completion.metadata) == (None, {"team": "b"})


def test_no_list_or_page_shows_another_tenants_ids(tenant_a, tenant_b, objects_of_b):
    secrets = {
        str(value)
        for key, value in objects_of_b.items()
        if key not in ("membership", "invitation")  # small numbers, found in any page
    }
    checked = []
    for name, params in routes():
        if params or name in NOT_TENANT_ROUTES:
            continue
        response = next(iter(clients_for(name, tenant_a).values())).get(reverse(name))
        assert response.status_code in (200, 302, 405), (name, response.status_code)
        body = response.content.decode(errors="replace")
        leaked = {secret for secret in secrets if secret in body}
        assert not leaked, f"{name} shows tenant B's {leaked}"
        checked.append(name)
    assert {"api:file-list", "api:fine-tuning-job-list", "job-list", "account-keys"} <= set(checked)
    # And B sees its own, so the check above is not passing on empty pages.
    b_files = api_client_for(tenant_b.secret).get("/v1/files").json()["data"]
    assert objects_of_b["file"] in {f["id"] for f in b_files}


# --- another tenant's ids in a body --------------------------------------------------------


def missing_like(object_id: str) -> str:
    """An id of the same shape that exists nowhere."""
    return object_id[:-6] + "zzzzzz" if "-" in object_id else object_id + "-gone"


def answer_without(response, object_id: str) -> tuple[int, str]:
    """A response's status and body with the id in question blanked out."""
    return response.status_code, response.content.decode().replace(object_id, "<id>")


def test_another_tenants_ids_in_a_body_read_like_missing_ones_and_create_nothing(
    tenant_a, api_a, objects_of_b
):
    """The answer to B's id is the answer to an id that exists nowhere (OpenAI's 400
    invalid_request_error naming the field), byte for byte, so it reveals nothing."""
    model = BaseModel.seed_bundled().name
    training_file = upload(api_a, jsonl(chat_rows(8))).json()["id"]
    eval_file = upload(api_a, jsonl(chat_rows(4)), purpose="eval").json()["id"]
    b = objects_of_b
    job = {"model": model, "training_file": training_file, "dry_run": True}
    evaluation = {"file": eval_file, "models": [model]}
    own_adapter = Adapter.objects.create(
        org=tenant_a.org, name="ft:a-own", base_model=BaseModel.default(), s3_prefix="a/"
    )
    alias = {"name": "a-deployment", "adapter": own_adapter.id, "eval_files": [eval_file]}
    # (path, body with B's id, B's id): every body field that names an object.
    cases = [
        ("/v1/fine_tuning/jobs", {**job, "training_file": b["file"]}, b["file"]),
        ("/v1/fine_tuning/jobs", {**job, "validation_file": b["eval_file"]}, b["eval_file"]),
        ("/v1/fine_tuning/jobs", {**job, "model": b["model_name"]}, b["model_name"]),
        (
            "/v1/fine_tuning/jobs",
            {**job, "hyperparameters": {"parent_adapter": b["adapter"]}},
            b["adapter"],
        ),
        (
            "/v1/fine_tuning/jobs",
            {**job, "hyperparameters": {"parent_adapter": b["model_name"]}},
            b["model_name"],
        ),
        (
            "/v1/fine_tuning/jobs",
            {
                **job,
                "method": {
                    "type": "supervised",
                    "supervised": {"hyperparameters": {"parent_adapter": b["adapter"]}},
                },
            },
            b["adapter"],
        ),
        ("/v1/evaluations", {**evaluation, "file": b["eval_file"]}, b["eval_file"]),
        ("/v1/evaluations", {**evaluation, "models": [b["adapter"]]}, b["adapter"]),
        ("/v1/evaluations", {**evaluation, "models": [model, b["model_name"]]}, b["model_name"]),
        ("/v1/aliases", {**alias, "adapter": b["adapter"]}, b["adapter"]),
        ("/v1/aliases", {**alias, "adapter": b["model_name"]}, b["model_name"]),
        ("/v1/aliases", {**alias, "eval_files": [b["eval_file"]]}, b["eval_file"]),
        ("/v1/files/from_completions", {"alias": b["alias_name"]}, b["alias_name"]),
    ]
    # The bodies are right but for B's id: with A's own ids, the same job plans.
    planned = api_a.post("/v1/fine_tuning/jobs", job, format="json")
    assert planned.status_code == 200, planned.content
    for dry_run in (True, False):
        for path, body, theirs in cases:
            body = {**body, "dry_run": dry_run} if "dry_run" in body else body
            with_theirs = api_a.post(path, body, format="json")
            missing = missing_like(theirs)
            with_missing = api_a.post(
                path, json.loads(json.dumps(body).replace(theirs, missing)), format="json"
            )
            assert with_theirs.status_code in (400, 404), (path, body, with_theirs.content)
            assert answer_without(with_theirs, theirs) == answer_without(with_missing, missing)
    # A list's cursor: B's id is no cursor of A's lists.
    for path, theirs in (
        ("/v1/files", b["file"]),
        ("/v1/fine_tuning/jobs", b["job"]),
        ("/v1/adapters", b["adapter"]),
        ("/v1/evaluations", b["evaluation"]),
        ("/v1/api_keys", b["api_key"]),
        ("/v1/webhook_endpoints", b["webhook_endpoint"]),
        ("/v1/chat/completions", b["stored_completion"]),
    ):
        with_theirs = api_a.get(path, {"after": theirs})
        missing = missing_like(theirs)
        assert with_theirs.status_code in (400, 404), (path, with_theirs.content)
        assert answer_without(with_theirs, theirs) == answer_without(
            api_a.get(path, {"after": missing}), missing
        )
    assert not FineTuneJob.objects.for_org(tenant_a.org).exists()
    assert not Evaluation.objects.for_org(tenant_a.org).exists()
    assert not Alias.objects.for_org(tenant_a.org).exists()


def test_another_tenants_idempotency_key_replays_nothing_of_theirs(tenant_a, api_a, objects_of_b):
    """B already made a job with this key: A's request with it makes A's own job."""
    BaseModel.seed_bundled()
    training_file = upload(api_a, jsonl(chat_rows(8))).json()["id"]
    response = api_a.post(
        "/v1/fine_tuning/jobs",
        {"model": BaseModel.default().name, "training_file": training_file},
        format="json",
        headers={"Idempotency-Key": B_IDEMPOTENCY_KEY},
    )
    assert response.status_code == 200, response.content
    assert response.json()["id"] != objects_of_b["job"]
    assert "Idempotent-Replayed" not in response
    assert FineTuneJob.objects.get(pk=response.json()["id"]).org == tenant_a.org


def test_the_wizard_takes_no_id_of_another_tenant(tenant_a, objects_of_b):
    """The browser's way to name objects in a body or a query: the wizard's choices."""
    browser = signed_in(tenant_a)
    chosen = browser.post(reverse("wizard"), {"file": objects_of_b["file"]})
    assert chosen.status_code == 200
    assert "Choose a dataset" in chosen.content.decode()
    for query in ({"file": objects_of_b["file"]}, {"parent": objects_of_b["adapter"]}):
        page = browser.get(reverse("wizard"), query)
        assert page.status_code == 200
        assert "b.jsonl" not in page.content.decode()
        assert objects_of_b["adapter"] not in page.content.decode()
    assert not browser.session.get(WIZARD_SESSION_KEY, {}).get("file")
    assert not browser.session.get(WIZARD_SESSION_KEY, {}).get("parent")
    # Straight to the model step with B's fine-tuned model as the base: refused there too.
    own = upload(api_client_for(tenant_a.secret), jsonl(chat_rows(8))).json()["id"]
    assert browser.post(reverse("wizard"), {"file": own}).status_code == 302
    form = {**PRESETS["balanced"]["values"], "model": objects_of_b["model_name"]}
    step = browser.post(reverse("wizard-model"), form)
    assert step.status_code == 200, step.status_code
    assert "does not exist" in step.content.decode()
    launched = browser.post(reverse("wizard-review"))
    assert launched.status_code == 200 and "does not exist" in launched.content.decode()
    assert not FineTuneJob.objects.for_org(tenant_a.org).exists()
