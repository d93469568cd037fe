"""Attacks that must fail: mass assignment, API-key guessing, cross-site form posts, pickles
in uploads, adapters and base models, downloads reached by another tenant or nobody, and code
that would unpickle or run a model's remote code. (Tenant walls: tests/test_tenant_matrix.py;
schemathesis, zero 5xx: tests/test_api_fuzz.py.)"""

import ast
import ipaddress
import json
import os
import pickle
from dataclasses import fields
from pathlib import Path

import pytest
import redis
from django.test import Client
from django.urls import reverse

from engine import artifacts
from engine.hyperparameters import API_NAMES, TrainConfig
from jobs.models import Adapter, Alias, BaseModel, File, FineTuneJob
from loft import storage
from loft.models import ApiKey
from tests.helpers import (
    PASSWORD,
    PROJECT_DIR,
    api_client_for,
    chat_rows,
    jsonl,
    routes,
    signed_in,
    stored_adapter,
    stored_completion,
    upload,
)

pytestmark = pytest.mark.django_db

LOFT_CODE = ["loft", "jobs", "worker", "engine", "bench", "cli", "manage.py"]
# Modules whose only use is to (un)pickle: Loft never needs one.
PICKLE_MODULES = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve"}
# Classes whose from_pretrained reads JSON or a tokenizer, never weights.
NO_WEIGHTS = ("Tokenizer", "TokenizerFast", "Config", "Processor")
# The benchmark loads adapters it has just made itself (bench/adapters.py: make_adapters).
OWN_ADAPTERS_ONLY = {"bench/adapters.py"}


def _name_of(node: ast.expr) -> str:
    """``torch.serialization.load`` for that attribute chain; "" for anything else."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        inner = _name_of(node.value)
        return f"{inner}.{node.attr}" if inner else node.attr
    return ""


def unsafe_loads(source: str, adapters_checked: bool = True) -> list[str]:
    """Every way ``source`` could unpickle or run a model's code, as "line: what": a pickling
    module imported, ``torch.load``, ``allow_pickle=True``, ``read_pickle``, any
    ``trust_remote_code`` but a literal False, a model's ``from_pretrained`` without
    ``use_safetensors=True`` (or a GGUF file), and a peft adapter loaded by a function that did
    not first call ``refuse_unsafe_adapter`` (peft unpickles ``adapter_model.bin`` when there
    are no safetensors)."""
    found = []
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots = {alias.name.split(".")[0] for alias in node.names}
            found += [f"{node.lineno}: import {m}" for m in sorted(roots & PICKLE_MODULES)]
        elif isinstance(node, ast.ImportFrom) and node.module:
            root = node.module.split(".")[0]
            if root in PICKLE_MODULES:
                found.append(f"{node.lineno}: from {node.module} import")
            if root == "torch" and any(alias.name == "load" for alias in node.names):
                found.append(f"{node.lineno}: from {node.module} import load")
        elif isinstance(node, ast.Call):
            called = _name_of(node.func)
            keywords = {k.arg: k.value for k in node.keywords if k.arg}
            if called.startswith("torch.") and called.endswith(".load"):
                found.append(f"{node.lineno}: {called}")
            if called.endswith("read_pickle"):
                found.append(f"{node.lineno}: {called}")
            for name in ("allow_pickle", "trust_remote_code"):
                value = keywords.get(name)
                if value is not None and not (
                    isinstance(value, ast.Constant) and value.value is False
                ):
                    found.append(f"{node.lineno}: {name} not False")
            owner, _, method = called.rpartition(".")
            owner = owner.rpartition(".")[2]
            weights = method == "from_pretrained" and not owner.endswith(NO_WEIGHTS)
            if weights and owner != "PeftModel":
                safe = keywords.get("use_safetensors")
                if not (isinstance(safe, ast.Constant) and safe.value is True) and (
                    "gguf_file" not in keywords
                ):
                    found.append(f"{node.lineno}: {called} without use_safetensors=True")
    if adapters_checked:
        found += _adapters_loaded_unchecked(tree)
    return found


def _adapters_loaded_unchecked(tree: ast.AST) -> list[str]:
    found = []
    for function in ast.walk(tree):
        if not isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        calls = [n for n in ast.walk(function) if isinstance(n, ast.Call)]
        checked = [c.lineno for c in calls if _name_of(c.func).endswith("refuse_unsafe_adapter")]
        for call in calls:
            called = _name_of(call.func)
            if called.endswith(("PeftModel.from_pretrained", ".load_adapter")) and not any(
                line < call.lineno for line in checked
            ):
                found.append(f"{call.lineno}: {called} before refuse_unsafe_adapter")
    return found


def test_loft_code_never_unpickles_nor_trusts_remote_code():
    """The CI check: Loft's own code (not its tests, which build the pickles below)."""
    found = []
    for root in LOFT_CODE:
        path = PROJECT_DIR / root
        for source in [path] if path.is_file() else sorted(path.rglob("*.py")):
            name = str(source.relative_to(PROJECT_DIR))
            adapters_checked = name not in OWN_ADAPTERS_ONLY
            found += [
                f"{name}:{line}" for line in unsafe_loads(source.read_text(), adapters_checked)
            ]
    assert found == []


@pytest.mark.parametrize(
    "source",
    [
        "import pickle",
        "import dill as safe",
        "from pickle import Unpickler",
        "from joblib import load",
        "import torch\ntorch.load(path)",
        "from torch import load",
        "from torch.serialization import load",
        "numpy.load(path, allow_pickle=True)",
        "pandas.read_pickle(path)",
        "AutoTokenizer.from_pretrained(name, trust_remote_code=True)",
        "AutoModelForCausalLM.from_pretrained(name, use_safetensors=True, trust_remote_code=r)",
        "AutoModelForCausalLM.from_pretrained(name)",
        "transformers.AutoModel.from_pretrained(name, use_safetensors=False)",
        "def serve(folder):\n    return PeftModel.from_pretrained(base, folder)",
        "def serve(folder):\n    model.load_adapter(folder)\n    refuse_unsafe_adapter(folder)",
    ],
)
def test_the_unpickling_check_finds_each_way_in(source):
    assert unsafe_loads(source), source


def test_the_unpickling_check_passes_safe_loads():
    safe = """
import json
AutoTokenizer.from_pretrained(name, revision=revision)
LoraConfig.from_pretrained(folder)
AutoModelForCausalLM.from_pretrained(name, use_safetensors=True, trust_remote_code=False)
AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
numpy.load(path, allow_pickle=False)

def serve(folder):
    artifacts.refuse_unsafe_adapter(folder)
    return PeftModel.from_pretrained(base, folder)
"""
    assert unsafe_loads(safe) == []


def test_a_base_model_holding_only_pickled_weights_is_refused_before_anything_reads_it(tmp_path):
    """A hub model without safetensors: transformers would open its pytorch_model.bin with
    torch.load; Loft asks for safetensors only, so the pickle is never opened."""
    from engine.base_models import load_base_model
    from engine.model_cache import BaseModelSpec

    marker = tmp_path / "unpickled"
    folder = tmp_path / "model"
    folder.mkdir()
    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 8,
        "intermediate_size": 16,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "num_hidden_layers": 1,
        "vocab_size": 32,
    }
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(Marker(marker), protocol=4))
    spec = BaseModelSpec("evil", str(folder), "main", 128)
    with pytest.raises(OSError, match="model.safetensors"):
        load_base_model(spec, tmp_path / "cache", "none", "cpu")
    assert not marker.exists()


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


# Set by Loft only: a training config's fields that the API does not take (derived from what it
# does take, or fixed), besides every top-level field a server owns.
SERVER_OWNED_HYPERPARAMETERS = sorted(
    {f.name for f in fields(TrainConfig)} - set(API_NAMES) - {"seed"}
)


def refused_by_name(error: dict, field: str) -> bool:
    """Does an OpenAI-shaped error name ``field`` (its param, or quoted in its message)?"""
    return error.get("param") == field or f"'{field}'" in error["message"]


def test_mass_assignment_never_sets_what_the_server_owns(api_a, tenant_a, tenant_b, settings):
    """Every writable /v1 operation of the served schema, its routes with an id included, with
    each field a client must not set, at the top of the body and inside its hyperparameters:
    refused by name, or ignored. A new writable operation fails here until it has a body."""
    settings.LOFT_WEBHOOK_ALLOW_PRIVATE_URLS = True  # no DNS here; the URL is not called
    file_id = upload(api_a, jsonl(chat_rows(8))).json()["id"]
    model = BaseModel.seed_bundled().name
    adapter = Adapter.objects.create(
        org=tenant_a.org,
        name=f"ft:{model}:{tenant_a.org.slug}:mine:ftjob-mine",
        base_model=BaseModel.default(),
        s3_prefix=f"orgs/{tenant_a.org.id}/adapters/mine/",
    )
    server_owned = {
        "org": tenant_b.org.id,
        "org_id": tenant_b.org.id,
        "organization_id": tenant_b.org.id,
        "id": "forged-id",
        "object": "forged",
        "status": "succeeded",
        "created_at": 1,
        "finished_at": 1,
        "trained_tokens": 10**9,
        "fine_tuned_model": "ft:forged",
        "adapter": "ftad-forged",
        "error": {"code": "forged"},
        "secret_hash": "0" * 64,
    }
    alias = Alias.objects.create(org=tenant_a.org, name="live", adapter=adapter)
    alias.eval_files.set([file_id])
    job = {"training_file": file_id, "model": model}
    bodies = {
        ("post", "/v1/fine_tuning/jobs"): job,
        ("post", "/v1/fine_tuning/jobs/{id}/cancel"): {},
        ("post", "/v1/fine_tuning/jobs/{id}/pause"): {},
        ("post", "/v1/fine_tuning/jobs/{id}/resume"): {},
        ("post", "/v1/api_keys"): {"name": "k"},
        ("post", "/v1/webhook_endpoints"): {"url": "http://127.0.0.1:9/hook"},
        ("post", "/v1/evaluations"): {"file": file_id, "models": [model]},
        ("post", "/v1/chat/completions"): {
            "model": model,
            "messages": [{"role": "user", "content": "Hi"}],
        },
        ("post", "/v1/aliases"): {"name": "fresh", "adapter": adapter.id, "eval_files": [file_id]},
        ("post", "/v1/aliases/{name}/promote"): {"adapter": adapter.id},
        ("post", "/v1/aliases/{name}/rollback"): {},
        ("post", "/v1/aliases/{name}/eval_files"): {"eval_files": [file_id]},
        ("post", "/v1/aliases/{name}/policy"): {"every_completions": 10},
        ("post", "/v1/files"): None,  # multipart: below
        ("post", "/v1/files/from_completions"): {"alias": alias.name},
        ("post", "/v1/chat/completions/{completion_id}"): {"metadata": {"ticket": "T-1"}},
        ("post", "/v1/chat/completions/{completion_id}/feedback"): {"rating": 1},
    }
    completion = stored_completion(tenant_a.org, alias=alias.name, adapter=adapter)
    schema = api_a.get("/v1/openapi.json").json()
    writable = {
        (method, path)
        for path, operations in schema["paths"].items()
        for method in operations
        if method in ("post", "put", "patch")
    }
    assert writable <= set(bodies), f"give these operations a body: {writable - set(bodies)}"

    key_manager = api_client_for(
        ApiKey.issue(tenant_a.org, "manager", scope=ApiKey.Scope.MANAGE_KEYS)[1]
    )

    def url_of(path: str) -> str:
        if path.startswith("/v1/aliases/"):
            return path.format(name=alias.name)
        if path.startswith("/v1/adapters/"):
            return path.format(id=adapter.id)
        if path.startswith("/v1/chat/completions/"):
            return path.format(completion_id=completion.id)
        # A fresh job each time: a cancelled job cannot be cancelled again; one to resume is
        # paused first. The ones made before are cancelled: an organization runs 4 at once.
        for earlier in FineTuneJob.objects.filter(org=tenant_a.org, status__in=FineTuneJob.ACTIVE):
            earlier.request_cancel()
        made = api_a.post("/v1/fine_tuning/jobs", job, format="json")
        assert made.status_code == 200, made.content
        created = made.json()["id"]
        if path.endswith("/resume"):
            assert api_a.post(f"/v1/fine_tuning/jobs/{created}/pause").status_code == 200
        return path.format(id=created)

    for (method, path), body in bodies.items():
        for field, value in server_owned.items():
            if body is None:
                as_form = value if isinstance(value, str | int) else json.dumps(value)
                response = upload(api_a, jsonl(chat_rows(2)), **{field: as_form})
            else:
                client = key_manager if path == "/v1/api_keys" else api_a
                response = getattr(client, method)(
                    url_of(path) if "{" in path else path, {**body, field: value}, format="json"
                )
            assert response.status_code < 500, (path, field, response.content)
            if response.status_code >= 400:
                assert refused_by_name(response.json()["error"], field), (path, response.json())
                continue
            stored = response.json()
            assert stored.get(field) != value, (path, field, stored)
            assert tenant_b.org.id not in str(stored), (path, field)
    # Inside a job's hyperparameters (both ways of giving them): refused by name, every one.
    for field, value in {**server_owned, **dict.fromkeys(SERVER_OWNED_HYPERPARAMETERS, 1)}.items():
        for body in (
            {**job, "hyperparameters": {field: value}},
            {**job, "method": {"supervised": {"hyperparameters": {field: value}}}},
        ):
            response = api_a.post("/v1/fine_tuning/jobs", body, format="json")
            assert response.status_code == 400, (field, response.content)
            assert refused_by_name(response.json()["error"], field), response.json()
    # Nothing at all reached tenant B; every job A made is A's, and none succeeded.
    api_b = api_client_for(tenant_b.secret)
    for path in ("/v1/files", "/v1/fine_tuning/jobs", "/v1/webhook_endpoints", "/v1/evaluations"):
        data = api_b.get(path).json()["data"]
        assert data == [], (path, data)
    jobs = FineTuneJob.objects.filter(org=tenant_a.org)
    assert jobs.exists() and not jobs.filter(status="succeeded").exists()
    assert not FineTuneJob.objects.exclude(org=tenant_a.org).exists()


@pytest.fixture
def counters(settings):
    """The failure counters (loft/auth.py) start empty and are emptied after the test."""
    counter = redis.Redis.from_url(settings.REDIS_URL)

    def clear():
        for pattern in ("loft:wrong-keys:*", "loft:failed-sign-ins:*"):
            for key in counter.scan_iter(pattern):
                counter.delete(key)

    clear()
    yield counter
    clear()


def test_guessing_api_keys_is_throttled_and_says_so(settings, counters):
    settings.LOFT_AUTH_FAILURES_PER_MINUTE = 5
    guesser = api_client_for("sk-loft-guess")
    answers = [guesser.get("/v1/models").status_code for _ in range(8)]
    assert answers[:5] == [401] * 5
    assert answers[5:] == [429] * 3
    refused = guesser.get("/v1/models")
    assert refused.json()["error"]["type"] == "rate_limit_error"
    assert 0 < int(refused["Retry-After"]) <= 60


def test_wrong_keys_from_one_address_never_lock_out_its_valid_keys(settings, counters, api_a):
    """Behind a proxy or NAT, many clients share an address: one of them guessing or sending a
    revoked key must not lock out the others."""
    settings.LOFT_AUTH_FAILURES_PER_MINUTE = 3
    stale = api_client_for("sk-loft-revoked-long-ago")
    assert [stale.get("/v1/models").status_code for _ in range(4)] == [401, 401, 401, 429]
    # Another wrong key from the same address is its own count: a colleague's typo says 401.
    assert api_client_for("sk-loft-typo").get("/v1/models").status_code == 401
    # A right key from the same address is never refused.
    assert api_a.get("/v1/models").status_code == 200


def test_behind_a_trusted_proxy_the_forwarded_client_is_counted(settings, counters):
    settings.LOFT_AUTH_FAILURES_PER_MINUTE = 2
    settings.LOFT_TRUSTED_PROXIES = [ipaddress.ip_network("10.0.0.0/8")]

    def status_from(forwarded: str, remote: str = "10.0.0.7") -> int:
        client = api_client_for("sk-loft-guess")
        return client.get(
            "/v1/models", REMOTE_ADDR=remote, HTTP_X_FORWARDED_FOR=forwarded
        ).status_code

    # The client at 203.0.113.9, through two trusted hops; what it wrote itself (left) is not
    # read, so it cannot pose as someone else.
    assert [status_from("6.6.6.6, 203.0.113.9, 10.0.0.3") for _ in range(3)] == [401, 401, 429]
    assert status_from("203.0.113.9, 10.0.0.3") == 429
    # Another client behind the same proxy has a count of its own.
    assert status_from("198.51.100.4") == 401
    # From an address that is not a trusted proxy, X-Forwarded-For is ignored.
    assert status_from("198.51.100.4", remote="192.0.2.1") == 401
    assert status_from("198.51.100.4", remote="192.0.2.1") == 401
    assert status_from("1.2.3.4", remote="192.0.2.1") == 429


@pytest.mark.parametrize("path", ["/login", "/admin/login/"])
def test_guessing_a_password_is_throttled_even_when_the_guess_is_right(
    settings, counters, staff, path
):
    settings.LOFT_LOGIN_FAILURE_LIMIT = 3
    browser = Client()
    for _ in range(3):
        wrong = browser.post(path, {"username": "staff-person", "password": "guess"})
        assert wrong.status_code == 200 and "_auth_user_id" not in browser.session
    right = browser.post(path, {"username": "staff-person", "password": PASSWORD})
    assert right.status_code == 200 and "_auth_user_id" not in browser.session
    assert "Too many failed sign-ins for this username from your address" in right.content.decode()
    assert "try again in 15 minutes" in right.content.decode()
    # Another address (or another username) is not held back by this one's failures.
    elsewhere = Client(REMOTE_ADDR="192.0.2.44")
    signed = elsewhere.post(path, {"username": "staff-person", "password": PASSWORD})
    assert signed.status_code == 302 and "_auth_user_id" in elsewhere.session


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


def test_downloads_stream_through_loft_to_their_tenant_only(tenant_a, tenant_b, tmp_path):
    """Loft hands out no storage URL: every download (a file's content, an adapter's zip, its
    merged weights) is streamed by Loft after it found the object among the caller's own, so
    there is no signed link to leak or reuse. Another tenant, by key or by session, gets 404;
    nobody signed in gets nothing."""
    api = api_client_for(tenant_a.secret)
    content = jsonl(chat_rows(4))
    file_id = upload(api, content).json()["id"]
    adapter = stored_adapter(tenant_a, tmp_path)
    merged = tmp_path / "merged"
    merged.mkdir()
    (merged / "model.safetensors").write_bytes(b"\1" * 1000)
    adapter.merged_manifest = artifacts.build_manifest(merged)
    storage.upload_folder(merged, adapter.merged_prefix, adapter.merged_manifest)
    adapter.merged_status = Adapter.MergedStatus.READY
    adapter.save()
    downloads = {
        f"/v1/files/{file_id}/content": content,
        f"/v1/adapters/{adapter.id}/download": b"adapter_model.safetensors",
        reverse("adapter-merged-download", kwargs={"adapter_id": adapter.id}): b"model.safetensors",
    }
    browser_a, browser_b = signed_in(tenant_a), signed_in(tenant_b)
    for url, expected in downloads.items():
        owner = api if url.startswith("/v1/") else browser_a
        response = owner.get(url)
        assert response.status_code == 200, (url, response.status_code)
        assert "Location" not in response and response.streaming, url
        assert expected in b"".join(response.streaming_content), url
        others = (
            [browser_b, api_client_for(tenant_b.secret)] if url.startswith("/v1/") else [browser_b]
        )
        for other in others:
            assert other.get(url).status_code == 404, url
        anonymous = Client().get(url)
        assert anonymous.status_code in (401, 302), (url, anonymous.status_code)
        if anonymous.status_code == 302:
            assert anonymous["Location"].startswith(reverse("login")), url
    assert not hasattr(storage, "presigned_download_url")


# --- NUL characters (PostgreSQL text cannot hold them) ----------------------------------------


@pytest.mark.parametrize(
    "method, url, body",
    [
        ("get", "/v1/files?purpose=%00", None),
        ("get", "/v1/fine_tuning/jobs?after=ftjob-%00", None),
        ("get", "/v1/files/file-%00abc", None),
        ("get", "/v1/models/ft:%00", None),
        ("post", "/v1/webhook_endpoints", {"url": "https://example.com/hook", "name": "a\x00b"}),
    ],
)
def test_a_nul_character_sent_to_the_api_is_refused_in_openais_shape(api_a, method, url, body):
    response = getattr(api_a, method)(url, body, format="json")
    assert response.status_code == 400, response.content
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and "NUL" in error["message"]


@pytest.mark.parametrize(
    "method, url, form",
    [
        ("get", "/datasets?purpose=%00", None),
        ("get", "/jobs/ftjob-%00", None),
        ("get", "/adapters?q=%00", None),
        ("post", "/login", "username=owner%00&password=x"),
    ],
)
def test_a_nul_character_sent_to_a_page_is_refused_with_a_sentence(tenant_a, method, url, form):
    client = Client()
    client.force_login(tenant_a.user)
    form_encoded = {"content_type": "application/x-www-form-urlencoded"} if form else {}
    response = getattr(client, method)(url, form, **form_encoded)
    assert response.status_code == 400
    assert "NUL character" in response.content.decode()
