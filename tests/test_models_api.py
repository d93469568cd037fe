"""GET /v1/models lists the catalogue's enabled base models, in OpenAI's shape."""

import openai
import pytest
from django.core.management import call_command

from engine.model_cache import BUNDLED_BASE_MODEL
from jobs.api.serializers import FineTunedModelSerializer
from jobs.models import Adapter, BaseModel
from loft import storage
from loft.models import ApiKey, Organization

BUNDLED = BUNDLED_BASE_MODEL["name"]


@pytest.mark.django_db
def test_it_lists_the_bundled_model_and_hides_disabled_ones(api_a):
    BaseModel.seed_bundled()
    BaseModel.objects.create(
        name="acme/hidden",
        source="acme/hidden",
        revision="abc",
        parameters=1,
        context_length=512,
        enabled=False,
    )
    body = api_a.get("/v1/models").json()
    assert body["object"] == "list"
    assert [model["id"] for model in body["data"]] == [BUNDLED]
    model = body["data"][0]
    assert model["object"] == "model" and isinstance(model["created"], int)
    assert api_a.get(f"/v1/models/{BUNDLED}").json()["id"] == BUNDLED
    missing = api_a.get("/v1/models/acme/hidden")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "model_not_found"


@pytest.mark.django_db
def test_the_models_list_shows_each_adapter_as_its_serializer_does_newest_first(
    api_a, tenant_a, tenant_b
):
    """The list is built by PostgreSQL (jobs/api/views.py::fine_tuned_models_json) for speed;
    each member must be what FineTunedModelSerializer, which documents it, gives."""
    base_model = BaseModel.seed_bundled()
    adapters = [
        Adapter.objects.create(
            org=tenant.org, base_model=base_model, name=f"ft:{n}:{tenant.org.slug}"
        )
        for n, tenant in enumerate([tenant_a, tenant_a, tenant_b, tenant_a])
    ]
    listed = api_a.get("/v1/models").json()["data"]
    ours = [a for a in reversed(adapters) if a.org == tenant_a.org]
    assert listed[1:] == [FineTunedModelSerializer(a).data for a in ours]
    assert listed[0]["id"] == BUNDLED and len(listed) == 4


@pytest.mark.django_db
def test_bootstrap_makes_a_fresh_install_usable_and_is_safe_to_repeat(capsys):
    call_command("bootstrap", "--demo")
    first = capsys.readouterr().out
    call_command("bootstrap", "--demo")
    second = capsys.readouterr().out
    assert "shown once" in first and "shown once" not in second
    org = Organization.objects.get(slug="demo")
    assert ApiKey.objects.for_org(org).count() == 1
    assert BaseModel.objects.enabled().filter(name=BUNDLED).exists()
    storage.check()


def test_the_official_openai_client_lists_models(live_server, transactional_db):
    BaseModel.seed_bundled()
    org = Organization.objects.create(slug="sdk", name="SDK")
    _, secret = ApiKey.issue(org)
    client = openai.OpenAI(api_key=secret, base_url=f"{live_server.url}/v1", max_retries=0)
    assert [model.id for model in client.models.list()] == [BUNDLED]
    assert client.models.retrieve(BUNDLED).id == BUNDLED

    bad = openai.OpenAI(api_key="sk-loft-wrong", base_url=f"{live_server.url}/v1", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        bad.models.list()
    assert caught.value.code == "invalid_api_key"
