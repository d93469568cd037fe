"""Stored chat completions (jobs/api/completions.py): kept with ``store: true``, listed, read,
updated, deleted and rated in OpenAI's shape, within the organization's retention and storage;
and, with the official ``openai`` client against a live server and a real inference worker, the
whole round trip."""

from datetime import timedelta

import openai
import pytest
from django.conf import settings
from django.utils import timezone

from jobs.models import Adapter, Alias, BaseModel, Quota, StoredCompletion, storage_bytes
from tests.helpers import signed_in, stored_completion

HELLO = [{"role": "user", "content": "Say hello to Ada."}]


def stored(org, count: int, **fields) -> list[StoredCompletion]:
    return [stored_completion(org, **fields) for _ in range(count)]


@pytest.mark.django_db
def test_a_list_pages_oldest_first_filters_and_shows_no_other_tenants_completions(
    api_a, tenant_a, tenant_b
):
    support = stored(tenant_a.org, 3, alias="support", metadata={"team": "eu"})
    other = stored(tenant_a.org, 2, model="SmolLM2-135M-Instruct", metadata={"team": "us"})
    theirs = stored(tenant_b.org, 2, alias="support", metadata={"team": "eu"})

    def ids(response) -> list[str]:
        assert response.status_code == 200, response.content
        return [row["id"] for row in response.json()["data"]]

    everything = api_a.get("/v1/chat/completions").json()
    assert [row["id"] for row in everything["data"]] == [c.id for c in support + other]
    assert everything["object"] == "list" and everything["has_more"] is False
    assert everything["first_id"] == support[0].id and everything["last_id"] == other[-1].id
    assert not {c.id for c in theirs} & set(ids(api_a.get("/v1/chat/completions?limit=100")))

    # OpenAI's filters: model (an alias's name too) and metadata pairs; pages by cursor.
    assert ids(api_a.get("/v1/chat/completions", {"model": "support"})) == [c.id for c in support]
    assert ids(api_a.get("/v1/chat/completions", {"metadata[team]": "us"})) == [c.id for c in other]
    first = api_a.get("/v1/chat/completions", {"limit": 2}).json()
    assert first["has_more"] is True
    rest = ids(api_a.get("/v1/chat/completions", {"limit": 10, "after": first["last_id"]}))
    assert [row["id"] for row in first["data"]] + rest == [c.id for c in support + other]
    newest = ids(api_a.get("/v1/chat/completions", {"order": "desc", "limit": 1}))
    assert newest == [other[-1].id]

    # Loft's: rated and corrected.
    support[0].give_feedback(1, None)
    support[1].give_feedback(-1, "Hello, Ada!")
    assert ids(api_a.get("/v1/chat/completions", {"rated": "up"})) == [support[0].id]
    assert ids(api_a.get("/v1/chat/completions", {"corrected": "true"})) == [support[1].id]

    for params, param in [
        ({"order": "sideways"}, "order"),
        ({"rated": "yes"}, "rated"),
        ({"created_after": "soon"}, "created_after"),
        ({"after": theirs[0].id}, "after"),  # another tenant's cursor is no cursor
        ({"limit": 0}, "limit"),
    ]:
        response = api_a.get("/v1/chat/completions", params)
        assert response.status_code == 400, (params, response.content)
        assert response.json()["error"]["param"] == param


@pytest.mark.django_db
def test_one_completion_is_read_with_its_messages_updated_rated_and_deleted(api_a, api_b, tenant_a):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Say hello."},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Again, to Ada."},
    ]
    completion = stored_completion(tenant_a.org, messages=messages, content="Hi Ada")
    url = f"/v1/chat/completions/{completion.id}"

    body = api_a.get(url).json()
    assert body["object"] == "chat.completion" and body["id"] == completion.id
    assert body["choices"][0]["message"] == {
        "role": "assistant",
        "content": "Hi Ada",
        "refusal": None,
    }
    assert body["usage"]["total_tokens"] == 12 and body["temperature"] == 0
    assert body["feedback"] == {"rating": None, "correction": None, "given_at": None}

    listed = api_a.get(f"{url}/messages", {"limit": 3}).json()
    assert [m["content"] for m in listed["data"]] == [m["content"] for m in messages[:3]]
    assert listed["has_more"] is True and listed["data"][0]["id"] == f"{completion.id}-0"
    rest = api_a.get(f"{url}/messages", {"after": listed["last_id"]}).json()
    assert [m["role"] for m in rest["data"]] == ["user"] and rest["has_more"] is False

    updated = api_a.post(url, {"metadata": {"ticket": "T-12"}}, format="json")
    assert updated.status_code == 200 and updated.json()["metadata"] == {"ticket": "T-12"}
    too_many = {f"k{i}": "v" for i in range(17)}
    for metadata, words in [(too_many, "at most 16"), ({"n": 3}, "must be a string")]:
        refused = api_a.post(url, {"metadata": metadata}, format="json")
        assert refused.status_code == 400 and words in refused.json()["error"]["message"]

    rated = api_a.post(
        f"{url}/feedback", {"rating": -1, "correction": "Hello, Ada!"}, format="json"
    ).json()
    assert rated["feedback"]["rating"] == -1 and rated["feedback"]["correction"] == "Hello, Ada!"
    completion.refresh_from_db()
    assert completion.training_answer == "Hello, Ada!"
    cleared = api_a.post(f"{url}/feedback", {"rating": 0, "correction": ""}, format="json")
    assert cleared.json()["feedback"]["rating"] is None
    for body, param in [({"rating": 5}, "rating"), ({}, None)]:
        refused = api_a.post(f"{url}/feedback", body, format="json")
        assert refused.status_code == 400, refused.content
        assert refused.json()["error"]["param"] == param

    # Another tenant's id is a completion that does not exist, whatever is asked of it.
    for call in (
        lambda: api_b.get(url),
        lambda: api_b.post(f"{url}/feedback", {"rating": 1}, format="json"),
        lambda: api_b.delete(url),
    ):
        assert call().status_code == 404
    deleted = api_a.delete(url).json()
    assert deleted == {"object": "chat.completion.deleted", "id": completion.id, "deleted": True}
    assert api_a.get(url).status_code == 404


@pytest.mark.django_db
def test_deleting_by_filter_takes_only_the_matching_completions_of_the_caller(
    api_a, tenant_a, tenant_b
):
    old = stored(tenant_a.org, 2, alias="support")
    keep = stored(tenant_a.org, 1, alias="other")
    theirs = stored(tenant_b.org, 1, alias="support")

    refused = api_a.delete("/v1/chat/completions")
    assert refused.status_code == 400 and "all=true" in refused.json()["error"]["message"]
    response = api_a.delete("/v1/chat/completions?alias=support")
    assert response.json() == {"object": "chat.completion.deleted_list", "deleted": len(old)}
    assert list(StoredCompletion.objects.for_org(tenant_a.org)) == keep
    assert api_a.delete("/v1/chat/completions?all=true").json()["deleted"] == 1
    assert StoredCompletion.objects.filter(pk=theirs[0].pk).exists()


@pytest.mark.django_db
def test_retention_decides_how_long_a_completion_is_kept_and_its_bytes_count(tenant_a):
    kept = stored_completion(tenant_a.org)
    days = settings.LOFT_STORED_COMPLETION_DAYS
    assert abs(kept.expires_at - (kept.created_at + timedelta(days=days))) < timedelta(seconds=1)
    assert kept.size_bytes > len("Say hello.Hello!")
    before = storage_bytes(tenant_a.org)
    kept.give_feedback(None, "A much longer corrected answer than the one given. " * 4)
    assert storage_bytes(tenant_a.org) > before

    # Past its retention, beat's expiry deletes it (and nothing younger).
    young = stored_completion(tenant_a.org)
    assert StoredCompletion.expire(timezone.now() + timedelta(days=days, minutes=1)) == 2
    assert not StoredCompletion.objects.exists()
    assert young.expires_at > timezone.now()

    # An organization that keeps none stores none; one that keeps a week keeps a week.
    Quota.objects.create(org=tenant_a.org, stored_completion_days=0)
    assert stored_completion(tenant_a.org) is None
    Quota.objects.filter(org=tenant_a.org).update(stored_completion_days=7)
    week = stored_completion(tenant_a.org)
    assert timedelta(days=6) < week.expires_at - week.created_at <= timedelta(days=7)
    schedule = settings.CELERY_BEAT_SCHEDULE["expire-stored-completions"]
    assert schedule["task"] == "worker.tasks.expire_stored_completions"


@pytest.mark.django_db
def test_store_and_metadata_are_checked_before_anything_is_queued(api_a, settings):
    settings.LOFT_INFERENCE_QUEUE = "nobody-stores"
    settings.LOFT_INFERENCE_TIMEOUT_SECONDS = 1
    base = BaseModel.seed_bundled().name
    response = api_a.post(
        "/v1/chat/completions",
        {"model": base, "messages": HELLO, "store": True, "metadata": {"a": ["b"]}},
        format="json",
    )
    assert response.status_code == 400, response.content
    assert response.json()["error"]["param"] == "metadata"


@pytest.mark.django_db
def test_an_aliases_traffic_page_shows_its_completions_and_takes_thumbs_and_corrections(
    tenant_a, tenant_b
):
    adapter = Adapter.objects.create(
        org=tenant_a.org, name="ft:a-support", base_model=BaseModel.seed_bundled(), s3_prefix="a/"
    )
    Alias.objects.create(org=tenant_a.org, name="support", adapter=adapter)
    asked = stored_completion(
        tenant_a.org,
        alias="support",
        adapter=adapter,
        messages=[{"role": "user", "content": "When does the shop open?"}],
        content="At nine.",
    )
    stored_completion(tenant_a.org, alias="elsewhere", content="Not this one.")
    browser = signed_in(tenant_a)
    assert "1 stored completion" in browser.get("/deployments/").content.decode()

    page = browser.get("/deployments/support/traffic").content.decode()
    assert "When does the shop open?" in page and "At nine." in page
    assert "Not this one." not in page
    feedback = f"/deployments/support/traffic/{asked.id}/feedback"
    browser.post(feedback, {"rating": "1"})
    correction = {"correction": "  At nine, Monday to Saturday. "}
    response = browser.post(feedback, correction, follow=True)
    assert "Feedback saved." in response.content.decode()
    asked.refresh_from_db()
    assert (asked.rating, asked.correction) == (1, "At nine, Monday to Saturday.")
    refused = browser.post(feedback, {"rating": "5"}, follow=True).content.decode()
    assert "A rating is a thumb up or down." in refused
    assert signed_in(tenant_b).get("/deployments/support/traffic").status_code == 404


# --- through a live server and a real inference worker ---------------------------------------


@pytest.mark.slow
def test_the_openai_client_stores_lists_reads_updates_and_deletes_completions(
    live_server, inference_worker, tenant_a
):
    BaseModel.seed_bundled()
    client = openai.OpenAI(api_key=tenant_a.secret, base_url=f"{live_server.url}/v1", max_retries=0)
    base = BaseModel.default().name

    def ask(**options):
        return client.chat.completions.create(
            model=base, messages=HELLO, max_tokens=8, temperature=0, **options
        )

    kept = ask(store=True, metadata={"ticket": "T-1"})
    not_kept = ask()
    stream = ask(store=True, stream=True, metadata={"ticket": "T-2"})
    streamed_text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    streamed_id = next(iter(StoredCompletion.objects.filter(metadata__ticket="T-2"))).id

    listed = client.chat.completions.list(model=base)
    assert [c.id for c in listed] == [kept.id, streamed_id]  # oldest first, the unstored left
    assert not_kept.id not in {c.id for c in listed}
    only = client.chat.completions.list(metadata={"ticket": "T-2"})
    assert [c.id for c in only.data] == [streamed_id]

    read = client.chat.completions.retrieve(kept.id)
    assert read.choices[0].message.content == kept.choices[0].message.content
    assert read.usage.completion_tokens == kept.usage.completion_tokens
    assert client.chat.completions.retrieve(streamed_id).choices[0].message.content == (
        streamed_text
    )
    messages = client.chat.completions.messages.list(kept.id)
    assert [(m.role, m.content) for m in messages] == [("user", HELLO[0]["content"])]
    updated = client.chat.completions.update(kept.id, metadata={"ticket": "T-1b"})
    assert updated.metadata == {"ticket": "T-1b"}
    rated = client.post(
        f"/chat/completions/{kept.id}/feedback",
        cast_to=dict,
        body={"rating": -1, "correction": "Hello, Ada!"},
    )
    assert rated["feedback"]["correction"] == "Hello, Ada!"

    deleted = client.chat.completions.delete(kept.id)
    assert deleted.deleted is True and deleted.id == kept.id
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.retrieve(kept.id)
