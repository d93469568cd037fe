"""``POST /v1/chat/completions``: what it refuses without a worker, and, with the official
``openai`` client against a live server and a real inference worker, a base model, fine-tuned
models and an alias answering — streamed, promoted, rolled back, walled off from other tenants —
and a stream whose client disconnects stopping on the worker."""

import json
import socket
import time
from urllib.parse import urlsplit

import openai
import pytest
import torch
from peft import LoraConfig, get_peft_model

from engine import artifacts
from engine.base_models import load_base_model
from jobs.models import Adapter, BaseModel, InferenceUsage
from loft import storage
from loft.models import ApiKey
from tests.helpers import (
    SMOLLM2,
    chat_rows,
    jsonl,
    stored_adapter,
    wait_for,
)

STORY = [{"role": "user", "content": "Write a long story about a dragon."}]
HELLO = [{"role": "user", "content": "Say hello to Ada."}]


@pytest.fixture
def quiet_inference(settings):
    """Requests go to a queue no worker consumes, and are given up quickly."""
    settings.LOFT_INFERENCE_QUEUE = f"nobody-{time.monotonic_ns()}"
    settings.LOFT_INFERENCE_TIMEOUT_SECONDS = 2


def post(client, **body):
    return client.post("/v1/chat/completions", body, format="json")


@pytest.mark.django_db
@pytest.mark.usefixtures("quiet_inference")
def test_bad_requests_are_refused_by_name_before_anything_is_queued(
    api_a, api_b, tenant_a, tmp_path
):
    adapter = stored_adapter(tenant_a, tmp_path)
    base = BaseModel.default().name
    cases = [
        ({"model": base, "messages": HELLO, "n": 2}, "n", "n must be 1"),
        ({"model": base, "messages": HELLO, "tools": []}, "tools", "Unknown parameter"),
        (
            {"model": base, "messages": HELLO, "stream_options": {"include_usage": True}},
            "stream_options",
            "only allowed when stream",
        ),
        (
            {"model": base, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            "messages.content",
            "text only",
        ),
        (
            {"model": base, "messages": HELLO, "stop": ["a", "b", "c", "d", "e"]},
            "stop",
            "at most 4",
        ),
        ({"model": base, "messages": HELLO, "top_p": 0}, "top_p", "above 0"),
        ({"model": base, "messages": HELLO, "max_tokens": 10**6}, "max_tokens", "at most"),
        (
            {"model": base, "messages": [*HELLO, {"role": "assistant", "content": "Hi"}]},
            "messages",
            "must not be the assistant",
        ),
    ]
    for body, param, words in cases:
        response = post(api_a, **body)
        assert response.status_code == 400, (body, response.content)
        error = response.json()["error"]
        assert error["param"] == param and words in error["message"], (body, error)

    # Another tenant's fine-tuned model, by name or id, is a model that does not exist.
    for name in (adapter.name, adapter.id, "no-such-model"):
        response = post(api_b, model=name, messages=HELLO)
        assert response.status_code == 404, response.content
        assert response.json()["error"]["code"] == "model_not_found"


@pytest.mark.django_db
@pytest.mark.usefixtures("quiet_inference")
def test_a_prompt_longer_than_the_context_allows_is_refused_naming_both_numbers(api_a):
    base = BaseModel.default()
    BaseModel.objects.filter(pk=base.pk).update(context_length=64)
    long = [{"role": "user", "content": "dragon " * 80}]
    response = post(api_a, model=base.name, messages=long, max_tokens=16)
    assert response.status_code == 400, response.content
    error = response.json()["error"]
    assert error["code"] == "context_length_exceeded" and error["param"] == "messages"
    assert "context of 64 tokens" in error["message"] and "max_tokens (16)" in error["message"]


@pytest.mark.django_db
@pytest.mark.usefixtures("quiet_inference")
def test_without_an_inference_worker_the_request_fails_in_time_with_a_503(api_a):
    started = time.monotonic()
    response = post(api_a, model=BaseModel.default().name, messages=HELLO, stream=True)
    assert response.status_code == 503, response.content
    assert response.json()["error"]["code"] == "inference_unavailable"
    assert time.monotonic() - started < 10


# --- through a live server and a real inference worker ---------------------------------------


def real_adapter(tenant, cache, folder, seed: int, name: str) -> Adapter:
    """An adapter with random LoRA weights (so its answers differ from the base's and from
    other seeds'), stored in S3 with its manifest like a trained one."""
    torch.manual_seed(seed)
    config = LoraConfig(
        r=8, lora_alpha=64, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    model = get_peft_model(load_base_model(SMOLLM2, cache, "none", "cpu"), config)
    model.save_pretrained(folder)
    adapter = Adapter(
        org=tenant.org,
        name=f"ft:{BaseModel.default().name}:{tenant.org.slug}:{name}:ftjob-{name}",
        base_model=BaseModel.default(),
    )
    adapter.s3_prefix = f"orgs/{tenant.org.id}/adapters/{adapter.id}/"
    adapter.manifest = artifacts.build_manifest(folder)
    storage.upload_folder(folder, adapter.s3_prefix, adapter.manifest)
    adapter.size_bytes = adapter.manifest["total_bytes"]
    adapter.save()
    return adapter


@pytest.mark.slow
def test_the_openai_client_chats_with_a_base_a_fine_tuned_model_and_an_alias(
    live_server, inference_worker, tenant_a, tenant_b, cache, tmp_path
):
    BaseModel.seed_bundled()
    first = real_adapter(tenant_a, cache, tmp_path / "first", seed=1, name="first")
    second = real_adapter(tenant_a, cache, tmp_path / "second", seed=2, name="second")
    # A key with the owners' powers: forcing a promotion past the gate is theirs alone (the
    # gate itself is tests/test_continual_loop.py's).
    _, secret = ApiKey.issue(tenant_a.org, "owner", tenant_a.user, scope=ApiKey.Scope.MANAGE_KEYS)
    client = openai.OpenAI(api_key=secret, base_url=f"{live_server.url}/v1", max_retries=0)
    outsider = openai.OpenAI(
        api_key=tenant_b.secret, base_url=f"{live_server.url}/v1", max_retries=0
    )
    base = BaseModel.default().name

    def ask(model: str, **options):
        return client.chat.completions.create(
            model=model, messages=HELLO, max_tokens=12, temperature=0, **options
        )

    answers = {}
    for model in (base, first.name, second.id):
        completion = ask(model)
        assert completion.object == "chat.completion"
        assert completion.usage.prompt_tokens > 0 and completion.usage.completion_tokens > 0
        assert completion.choices[0].finish_reason in ("stop", "length")
        answers[model] = completion.choices[0].message.content
    assert len(set(answers.values())) == 3, answers  # the base and each adapter answer apart
    again = {model: ask(model) for model in (first.name, second.id)}
    assert again[first.name].model == first.name and again[second.id].model == second.name
    assert {m: c.choices[0].message.content for m, c in again.items()} == {
        m: answers[m] for m in again
    }

    # Streamed, with usage in a last chunk of its own: the same greedy answer.
    stream = ask(first.name, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == answers[first.name]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    assert all(c.usage is None for c in chunks[:-1])

    # An alias answers with its adapter; promoted, the very next request has the new one.
    pinned = client.files.create(file=("eval.jsonl", jsonl(chat_rows(4))), purpose="fine-tune")
    created = client.post(
        "/aliases",
        cast_to=dict,
        body={"name": "support", "adapter": first.id, "eval_files": [pinned.id]},
    )
    assert created["adapter"] == first.id
    assert "support" in [m.id for m in client.models.list()]
    assert ask("support").choices[0].message.content == answers[first.name]
    promoted = client.post(
        "/aliases/support/promote", cast_to=dict, body={"adapter": second.id, "force": True}
    )
    assert promoted["adapter"] == second.id
    after = ask("support")
    assert after.model == second.name and after.choices[0].message.content == answers[second.id]
    client.post("/aliases/support/rollback", cast_to=dict, body={})
    assert ask("support").choices[0].message.content == answers[first.name]

    # Another tenant's names are models that do not exist.
    for name in (first.name, second.id, "support"):
        with pytest.raises(openai.NotFoundError) as refused:
            outsider.chat.completions.create(model=name, messages=HELLO, max_tokens=4)
        assert refused.value.code == "model_not_found"

    # Every answer is metered to the organization.
    lines = InferenceUsage.objects.filter(org=tenant_a.org)
    assert lines.count() >= 9
    assert {line.alias for line in lines} == {"", "support"}


@pytest.mark.slow
def test_a_streaming_client_that_disconnects_stops_its_generation(
    live_server, inference_worker, tenant_a
):
    BaseModel.seed_bundled()
    url = urlsplit(live_server.url)
    body = json.dumps(
        {
            "model": BaseModel.default().name,
            "messages": STORY,
            "max_tokens": 400,
            "temperature": 0,
            "stream": True,
        }
    ).encode()
    request = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {url.netloc}\r\n"
        f"Authorization: Bearer {tenant_a.secret}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body
    connection = socket.create_connection((url.hostname, url.port))
    connection.sendall(request)
    received = b""
    while received.count(b'"content"') < 6:  # the role chunk and five pieces of the answer
        piece = connection.recv(4096)
        assert piece, received
        received += piece
    connection.close()

    line = wait_for(
        lambda: InferenceUsage.objects.filter(org=tenant_a.org).first(),
        lambda usage: usage is not None,
        timeout=60,
        interval=0.2,
        what="the worker to end the answer",
    )
    # Ended within a few decode steps of the disconnect, far from its 400 tokens.
    assert 5 <= line.completion_tokens <= 20, line.completion_tokens
