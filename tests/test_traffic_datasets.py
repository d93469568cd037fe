"""Training files made of traffic (jobs/traffic.py): an alias's stored completions rated up or
corrected become chat rows, corrections replacing answers, prompts its adapters already learned
left out; asked by API or from the Traffic page, built and validated as any upload."""

import json

import pytest

from jobs.datasets import validate_stored_file
from jobs.models import Adapter, Alias, BaseModel, File, FineTuneJob, StoredCompletion
from loft import storage
from tests.helpers import chat_rows, jsonl, signed_in, stored_completion, upload

pytestmark = pytest.mark.django_db


def ask(question: str) -> list[dict]:
    return [{"role": "user", "content": question}]


@pytest.fixture
def served(api_a, tenant_a):
    """The alias "support" on an adapter trained on chat_rows(4) ("What is i + i?", i < 4)."""
    trained_on = File.objects.get(pk=upload(api_a, jsonl(chat_rows(4))).json()["id"])
    job = FineTuneJob.objects.create(
        org=tenant_a.org,
        base_model=BaseModel.seed_bundled(),
        training_file=trained_on,
        suffix="support",
    )
    adapter = Adapter.objects.create(
        org=tenant_a.org, name="ft:a-support", job=job, base_model=job.base_model, s3_prefix="a/"
    )
    return Alias.objects.create(org=tenant_a.org, name="support", adapter=adapter)


def keep(org, question: str, answer: str, rating=None, correction=None) -> StoredCompletion:
    completion = stored_completion(org, alias="support", messages=ask(question), content=answer)
    if rating is not None or correction is not None:
        completion.give_feedback(rating, correction)
    return completion


def rows_of(file: File) -> list[dict]:
    return [json.loads(line) for line in storage.get_bytes(file.s3_key).splitlines()]


def test_rated_up_and_corrected_answers_become_rows_and_what_was_learned_is_left_out(
    api_a, tenant_a, tenant_b, served
):
    org = tenant_a.org
    keep(org, "What is 1 + 1?", "2", rating=1)  # its adapter was trained on this prompt
    keep(org, "When do you open?", "At ten.", rating=-1, correction="At nine.")
    keep(org, "Where are you?", "On Main Street.", rating=1)
    keep(org, "Where are you?", "At 12 Main Street.", rating=1)  # the same prompt, later
    keep(org, "Do you deliver?", "No.", rating=-1)  # rated down, not corrected: left out
    keep(org, "Are you open Sundays?", "Yes.")  # not rated: left out
    theirs = stored_completion(tenant_b.org, alias="support", messages=ask("B's?"), content="B")
    theirs.give_feedback(1, None)

    response = api_a.post("/v1/files/from_completions", {"alias": "support"}, format="json")
    assert response.status_code == 200, response.content
    created = response.json()
    assert created["status"] == "uploaded" and created["purpose"] == "fine-tune"

    file = File.objects.get(pk=created["id"])
    validate_stored_file(file)  # the worker's part: build, then validate as any upload
    file.refresh_from_db()
    assert file.status == "processed", file.status_details
    assert [row["messages"] for row in rows_of(file)] == [
        [*ask("When do you open?"), {"role": "assistant", "content": "At nine."}],
        [*ask("Where are you?"), {"role": "assistant", "content": "At 12 Main Street."}],
    ]
    assert file.rows == 2 and file.report["traffic"]["already_trained"] == 1
    assert file.report["traffic"]["repeated_prompts"] == 1
    assert api_a.get(f"/v1/files/{file.id}").json()["status"] == "processed"


def test_a_selection_that_cannot_make_a_file_is_refused_in_a_sentence(api_a, tenant_a, served):
    keep(tenant_a.org, "What is 2 + 2?", "4", rating=1)  # learned already
    keep(tenant_a.org, "Hello?", "Hi.")  # not rated
    cases = [
        ({}, "alias", "Name the alias"),
        ({"alias": "nowhere"}, "alias", "No alias named 'nowhere'"),
        ({"alias": "support", "select": ["corrected"]}, "select", "is corrected"),
        ({"alias": "support", "select": ["liked"]}, "select", None),
        ({"alias": "support", "created_after": "soon"}, "created_after", "seconds since 1970"),
    ]
    for body, param, words in cases:
        response = api_a.post("/v1/files/from_completions", body, format="json")
        assert response.status_code == 400, (body, response.content)
        error = response.json()["error"]
        assert error["param"] == param, (body, error)
        assert words is None or words in error["message"], (body, error)
    assert not File.objects.filter(filename__startswith="traffic-").exists()

    # Everything selected was learned already: the file says so when it is built.
    created = api_a.post("/v1/files/from_completions", {"alias": "support"}, format="json")
    file = File.objects.get(pk=created.json()["id"])
    validate_stored_file(file)
    file.refresh_from_db()
    assert file.status == "error" and "already trained on" in file.status_details


def test_the_traffic_page_makes_a_training_file(tenant_a, served):
    keep(tenant_a.org, "When do you open?", "At ten.", correction="At nine.")
    response = signed_in(tenant_a).post("/deployments/support/traffic/training-file", follow=True)
    assert "being built from the rated and corrected answers" in response.content.decode()
    file = File.objects.get(filename__startswith="traffic-support-")
    assert file.report["traffic"]["alias"] == "support"
