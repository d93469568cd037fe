"""Attacks that must fail: mass assignment, API-key guessing, cross-site form posts, pickles
in uploads and adapters, presigned URLs reused late or for another object, and code that
would unpickle or run a model's remote code. (Tenant walls: tests/test_tenant_matrix.py;
schemathesis, zero 5xx: tests/test_api_fuzz.py.)"""

import os
import pickle
import re
import time
from pathlib import Path

import pytest
import redis
import requests
from django.conf import settings
from django.test import Client
from django.urls import reverse

from jobs.models import BaseModel, File
from loft import storage
from tests.helpers import PASSWORD, PROJECT_DIR, api_client_for, chat_rows, jsonl, routes, upload

pytestmark = pytest.mark.django_db

LOFT_CODE = ["loft", "jobs", "worker", "bench", "manage.py"]
FORBIDDEN_CALLS = ["torch.load(", "pickle.load(", "pickle.loads(", "trust_remote_code=True"]


def test_loft_code_never_unpickles_nor_trusts_remote_code():
    """The CI check: Loft's own code (not its tests, which build the pickles below)."""
    found = []
    for root in LOFT_CODE:
        path = PROJECT_DIR / root
        for source in [path] if path.is_file() else sorted(path.rglob("*.py")):
            text = source.read_text()
            for call in FORBIDDEN_CALLS:
                if call in text:
                    found.append(f"{source.relative_to(PROJECT_DIR)}: {call}")
    assert found == []


class Marker:
    """A pickle that, if anything ever loads it, leaves a folder behind as proof."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def test_uploaded_pickles_are_refused_without_being_loaded(api_a, tmp_path):
    marker = tmp_path / "unpickled"
    payload = pickle.dumps(Marker(marker), protocol=4)
    for name in ("train.jsonl", "weights.bin", "adapter_model.safetensors"):
        for purpose in ("fine-tune", "eval"):
            response = upload(api_a, payload, name=name, purpose=purpose)
            body = response.json()
            assert response.status_code == 400 or body.get("status") == "error", body
            assert "pickle" in str(body).lower(), body
    assert not marker.exists()
    assert not File.objects.filter(status=File.Status.PROCESSED).exists()


def test_an_adapter_folder_holding_a_pickle_is_refused_before_anything_reads_it(tmp_path):
    from engine.generate import AdapterCache

    marker = tmp_path / "unpickled"
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    (folder / "adapter_model.bin").write_bytes(pickle.dumps(Marker(marker), protocol=4))
    # Beside safetensors weights too: peft would prefer them, but the pickle must not even sit
    # there.
    (folder / "adapter_model.safetensors").write_bytes(b"")

    def no_base():
        raise AssertionError("the base must not even be loaded for a refused folder")

    cache = AdapterCache(no_base)
    with pytest.raises(ValueError, match="pickle"), cache.use("evil", lambda: folder):
        pass
    assert not marker.exists()


def test_mass_assignment_never_sets_what_the_server_owns(api_a, tenant_a, tenant_b, settings):
    """Every writable /v1 operation of the served schema, with fields a client must not set:
    refused by name, or ignored. A new writable operation fails here until it has a body."""
    settings.LOFT_WEBHOOK_ALLOW_PRIVATE_URLS = True  # no DNS here; the URL is not called
    file_id = upload(api_a, jsonl(chat_rows(8))).json()["id"]
    BaseModel.seed_bundled()
    injected = {
        "org": tenant_b.org.id,
        "org_id": tenant_b.org.id,
        "organization_id": tenant_b.org.id,
        "id": "forged-id",
        "status": "succeeded",
        "created_at": 1,
        "trained_tokens": 10**9,
        "secret_hash": "0" * 64,
    }
    bodies = {
        ("post", "/v1/fine_tuning/jobs"): {
            "training_file": file_id,
            "model": "HuggingFaceTB/SmolLM2-135M-Instruct",
        },
        ("post", "/v1/api_keys"): {"name": "k"},
        ("post", "/v1/webhook_endpoints"): {"url": "http://127.0.0.1:9/hook"},
        ("post", "/v1/evaluations"): {"file": file_id, "models": []},
        ("post", "/v1/files"): None,  # multipart: below
    }
    schema = api_a.get("/v1/openapi.json").json()
    writable = {
        (method, path)
        for path, operations in schema["paths"].items()
        for method in operations
        if method in ("post", "put", "patch") and "{" not in path
    }
    assert writable <= set(bodies), f"give these operations a body: {writable - set(bodies)}"
    for (method, path), body in bodies.items():
        if body is None:
            response = upload(api_a, jsonl(chat_rows(2)), **injected)
        else:
            response = getattr(api_a, method)(path, {**body, **injected}, format="json")
        assert response.status_code < 500, (path, response.content)
        if response.status_code >= 400:
            named = response.json()["error"].get("param") or response.json()["error"]["message"]
            assert any(field in named for field in injected), (path, response.json())
            continue
        created = response.json()
        assert created.get("id") != "forged-id", path
        assert tenant_b.org.id not in str(created), path
        assert created.get("status") != "succeeded", path
    # Nothing at all reached tenant B.
    api_b = api_client_for(tenant_b.secret)
    for path in ("/v1/files", "/v1/fine_tuning/jobs", "/v1/webhook_endpoints", "/v1/evaluations"):
        data = api_b.get(path).json()["data"]
        assert data == [], (path, data)


def test_guessing_api_keys_is_throttled_and_says_so(settings, api_a):
    settings.LOFT_AUTH_FAILURES_PER_MINUTE = 5
    guesser = api_client_for("sk-loft-guess")
    counter = redis.Redis.from_url(settings.REDIS_URL)
    counter.delete("loft:wrong-keys:127.0.0.1")
    try:
        answers = [guesser.get("/v1/models").status_code for _ in range(8)]
        assert answers[:5] == [401] * 5
        assert answers[5:] == [429] * 3
        refused = guesser.get("/v1/models")
        assert refused.json()["error"]["type"] == "rate_limit_error"
        assert 0 < int(refused["Retry-After"]) <= 60
        # A right key from the same address waits too: the address is what is throttled.
        assert api_a.get("/v1/models").status_code == 429
    finally:
        counter.delete("loft:wrong-keys:127.0.0.1")
    assert api_a.get("/v1/models").status_code == 200


def test_browser_forms_need_their_csrf_token(tenant_a):
    """Every route, posted to by a signed-in browser without the token, is refused."""
    browser = Client(enforce_csrf_checks=True)
    assert browser.login(username=tenant_a.user.username, password=PASSWORD)
    checked = 0
    for name, params in routes():
        url = reverse(name, kwargs={param: "1" for param in params})
        if name == "api:model-detail":
            url = reverse(name, kwargs={"model": "x"})
        response = browser.post(url, {"anything": "1"})
        # The schema and its docs page read no session, so have nothing to protect: 405.
        expected = 405 if name in ("api:openapi-schema", "api-docs") else 403
        assert response.status_code == expected, (name, response.status_code)
        checked += 1
    assert checked >= 40
    # With the token, a form goes through (here: creating an API key).
    browser.get(reverse("account-keys"))
    token = browser.cookies["csrftoken"].value
    created = browser.post(
        reverse("account-keys"), {"name": "with token", "csrfmiddlewaretoken": token}
    )
    assert created.status_code in (200, 302)


def test_presigned_urls_expire_and_open_one_object_only(tenant_a):
    first = f"orgs/{tenant_a.org.id}/files/file-presigned-1/data"
    second = f"orgs/{tenant_a.org.id}/files/file-presigned-2/data"
    storage.put_bytes(first, b"first")
    storage.put_bytes(second, b"second")
    url = storage.presigned_download_url(first, seconds=1)
    assert requests.get(url, timeout=10).content == b"first"
    # The signature is for that key: pointed at another object, it opens nothing.
    other = re.sub(r"file-presigned-1", "file-presigned-2", url)
    assert requests.get(other, timeout=10).status_code == 403
    time.sleep(2.5)
    assert requests.get(url, timeout=10).status_code == 403
    assert settings.S3_PRESIGNED_URL_SECONDS > 0
