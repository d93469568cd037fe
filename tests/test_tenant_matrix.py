"""Tenants are walls, on every route there is: a matrix generated from the URL resolver.

Every route that takes an object's id is called by tenant A with tenant B's ids, with every
method, through the door it is meant for (an API key under /v1, a signed-in browser
elsewhere): the answer is 404 (or 405 for a method the route does not take), never the object,
never a 403 that would confirm it exists. Every list is read by A and must not name any of B's
ids. A new route is in the matrix the moment it is added; a new kind of id fails here until
it has a row in ``OBJECT_OF_PARAM`` / ``OBJECT_OF_API_ROUTE``.
"""

import pytest
from django.test import Client
from django.urls import reverse

from jobs.models import Adapter, BaseModel, Evaluation, File, FineTuneJob
from loft.models import Membership, WebhookEndpoint
from tests.helpers import PASSWORD, api_client_for, routes

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
    "model": "model_name",
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
        org=org, base_model=BaseModel.seed_bundled(), training_file=file, suffix="b"
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
    other_member = django_user_model.objects.create_user("b-second", password=PASSWORD)
    membership = Membership.objects.create(org=org, user=other_member)
    endpoint = WebhookEndpoint.objects.create(org=org, url="https://example.com/hook")
    return {
        "job": job.id,
        "file": file.id,
        "eval_file": eval_file.id,
        "adapter": adapter.id,
        "model_name": adapter.name,
        "evaluation": evaluation.id,
        "api_key": tenant_b.key.id,
        "membership": membership.id,
        "webhook_endpoint": endpoint.id,
    }


def client_for(name: str, tenant):
    """An API key under /v1, a signed-in browser for the pages."""
    if name.startswith("api:"):
        return api_client_for(tenant.secret)
    browser = Client()
    assert browser.login(username=tenant.user.username, password=PASSWORD)
    return browser


def test_every_object_route_answers_404_to_another_tenants_ids(tenant_a, objects_of_b):
    checked = []
    for name, params in routes():
        if not params or name in NOT_TENANT_ROUTES:
            continue
        kwargs = {param: objects_of_b[kind_of(name, param)] for param in params}
        url = reverse(name, kwargs=kwargs)
        client = client_for(name, tenant_a)
        for method in ("get", "post", "patch", "delete"):
            response = getattr(client, method)(url)
            assert response.status_code in (404, 405), (
                f"{method.upper()} {url} ({name}) as another tenant: {response.status_code}"
            )
        checked.append(name)
    # The matrix covers the routes it should; a route left out by mistake would show here.
    assert {"api:file-content", "api:adapter-download", "job-cancel", "playground"} <= set(checked)
    assert len(checked) >= 25, checked


def test_no_list_or_page_shows_another_tenants_ids(tenant_a, tenant_b, objects_of_b):
    secrets = {str(value) for key, value in objects_of_b.items() if key != "membership"}
    checked = []
    for name, params in routes():
        if params or name in NOT_TENANT_ROUTES:
            continue
        response = client_for(name, tenant_a).get(reverse(name))
        assert response.status_code in (200, 302, 405), (name, response.status_code)
        body = response.content.decode(errors="replace")
        leaked = {secret for secret in secrets if secret in body}
        assert not leaked, f"{name} shows tenant B's {leaked}"
        checked.append(name)
    assert {"api:file-list", "api:fine-tuning-job-list", "job-list", "account-keys"} <= set(checked)
    # And B sees its own, so the check above is not passing on empty pages.
    b_files = api_client_for(tenant_b.secret).get("/v1/files").json()["data"]
    assert objects_of_b["file"] in {f["id"] for f in b_files}
