"""``/v1/aliases``, deleting models and adapters, and the Deployments page, without a worker:
finished evaluations are written as rows, as worker/evaluations.py leaves them, so each test
says what the gate saw (the gate's own statistics: tests/test_promotion_gate.py; the whole
loop with real training: tests/test_continual_loop.py)."""

from pathlib import Path

import pytest

from jobs.models import Adapter, BaseModel, Evaluation, File
from jobs.models.aliases import Alias, AliasMove
from loft import storage
from loft.models import ApiKey
from tests.helpers import (
    api_client_for,
    chat_rows,
    jsonl,
    objects_of,
    signed_in,
    stored_adapter,
    upload,
)

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("private_queue")]

PROBES = 10


def adapter_of(tenant, tmp_path: Path, name: str) -> Adapter:
    folder = tmp_path / name
    folder.mkdir()
    return stored_adapter(tenant, folder, name)


def eval_file(tenant, name: str = "eval.jsonl", purpose: str = "eval") -> File:
    response = upload(
        api_client_for(tenant.secret), jsonl(chat_rows(4)), name=name, purpose=purpose
    )
    assert response.status_code == 200, response.content
    return File.objects.get(pk=response.json()["id"])


def scored(right: int, rows: int = 40, probes_answered: int = PROBES) -> dict:
    """A model's entry in a custom evaluation: ``right`` of ``rows`` answers match (the first
    ones), and it answers the first ``probes_answered`` probes."""
    values = [1.0] * right + [0.0] * (rows - right)
    hits = [True] * probes_answered + [False] * (PROBES - probes_answered)
    return {
        "normalized_exact_match": right / rows,
        "rouge_l": right / rows,
        "generations": rows,
        "per_row": {"exact_match": values, "normalized_exact_match": values, "rouge_l": values},
        "probes": {"hits": hits, "answered": probes_answered / PROBES},
    }


def finished_evaluation(
    tenant, file: File, current: Adapter, candidate: Adapter, was: dict, now: dict, **fields
) -> Evaluation:
    """A succeeded custom evaluation of base, ``current`` and ``candidate`` on ``file``."""
    base = BaseModel.default()
    return Evaluation.objects.create(
        org=tenant.org,
        kind=Evaluation.Kind.CUSTOM,
        status=fields.pop("status", Evaluation.Status.SUCCEEDED),
        file=file,
        base_model=base,
        candidates=[
            {"model": base.name, "adapter": None},
            {"model": current.name, "adapter": current.id},
            {"model": candidate.name, "adapter": candidate.id},
        ],
        options={"max_generations": 50, "max_new_tokens": 64, "probes": True},
        results={
            "models": [scored(0), was, now],
            "samples": [],
            "rows": 40,
            "probes": [{"prompt": f"Probe question {i}?", "expected": "x"} for i in range(PROBES)],
        },
        **fields,
    )


@pytest.fixture
def cast(tenant_a, tmp_path):
    """Tenant A's two adapters of one base, an eval file, and the alias "support" on the first."""
    current = adapter_of(tenant_a, tmp_path, "current")
    candidate = adapter_of(tenant_a, tmp_path, "candidate")
    file = eval_file(tenant_a)
    response = api_client_for(tenant_a.secret).post(
        "/v1/aliases",
        {"name": "support", "adapter": current.name, "eval_files": [file.id]},
        format="json",
    )
    assert response.status_code == 201, response.content
    return current, candidate, file


@pytest.fixture
def owner_api(tenant_a):
    """An API key of tenant A with the manage_keys scope: an owner's key."""
    _, secret = ApiKey.issue(tenant_a.org, name="owner key", scope=ApiKey.Scope.MANAGE_KEYS)
    return api_client_for(secret)


def promote(api, adapter: Adapter | str, **body):
    reference = adapter if isinstance(adapter, str) else adapter.id
    return api.post("/v1/aliases/support/promote", {"adapter": reference, **body}, format="json")


# --- creating, reading, deleting --------------------------------------------------------------


def test_an_alias_is_created_listed_retrieved_listed_as_a_model_and_deleted(
    api_a, tenant_a, tmp_path
):
    adapter = adapter_of(tenant_a, tmp_path, "first")
    files = [eval_file(tenant_a, "b.jsonl"), eval_file(tenant_a, "a.jsonl", purpose="fine-tune")]
    response = api_a.post(
        "/v1/aliases",
        {"name": "support-bot.v1", "adapter": adapter.id, "eval_files": [f.id for f in files]},
        format="json",
    )
    assert response.status_code == 201, response.content
    created = response.json()
    assert created["object"] == "alias" and created["id"].startswith("alias-")
    assert created["name"] == "support-bot.v1"
    assert created["adapter"] == adapter.id and created["model"] == adapter.name
    assert created["eval_files"] == sorted(f.id for f in files)
    assert isinstance(created["created_at"], int) and isinstance(created["updated_at"], int)

    assert api_a.get("/v1/aliases/support-bot.v1").json() == created
    assert api_a.get("/v1/aliases").json() == {"object": "list", "data": [created]}
    moves = api_a.get("/v1/aliases/support-bot.v1/moves").json()["data"]
    assert [(m["object"], m["kind"], m["from_adapter"], m["to_adapter"]) for m in moves] == [
        ("alias.move", "created", None, adapter.id)
    ]
    assert moves[0]["actor"].startswith("api-key:")

    listed = api_a.get("/v1/models").json()["data"]
    as_model = {
        "id": "support-bot.v1",
        "object": "model",
        "created": created["created_at"],
        "owned_by": tenant_a.org.slug,
        "root": adapter.base_model.name,
        "adapter": adapter.id,
        "alias": True,
    }
    assert as_model in listed
    assert [m["id"] for m in listed][-1] == adapter.name  # the adapters still follow
    assert api_a.get("/v1/models/support-bot.v1").json() == as_model

    deleted = api_a.delete("/v1/aliases/support-bot.v1")
    assert deleted.status_code == 200
    assert deleted.json() == {
        "id": created["id"],
        "object": "alias",
        "name": "support-bot.v1",
        "deleted": True,
    }
    assert api_a.get("/v1/aliases/support-bot.v1").status_code == 404
    assert not AliasMove.objects.exists()
    assert Adapter.objects.filter(pk=adapter.id).exists()


@pytest.mark.parametrize(
    "name, status, code",
    [
        ("ft:mine", 400, "invalid_alias_name"),
        ("has space", 400, "invalid_alias_name"),
        ("-leading-dash", 400, "invalid_alias_name"),
        ("x" * 65, 400, "invalid_alias_name"),
        ("adapter-abc", 400, "invalid_alias_name"),
        ("plainbase", 400, "invalid_alias_name"),
        ("support", 409, "alias_exists"),
    ],
)
def test_a_bad_or_taken_name_is_refused_with_a_sentence(api_a, cast, name, status, code):
    current, _, file = cast
    BaseModel.objects.create(
        name="plainbase", source="x/plainbase", revision="main", parameters=1, context_length=512
    )
    response = api_a.post(
        "/v1/aliases", {"name": name, "adapter": current.id, "eval_files": [file.id]}, format="json"
    )
    assert response.status_code == status, response.content
    error = response.json()["error"]
    assert error["code"] == code and error["param"] == "name"
    assert error["message"].endswith(".")
    assert Alias.objects.count() == 1


def test_an_alias_needs_an_eval_file_that_is_validated(api_a, tenant_a, tmp_path):
    adapter = adapter_of(tenant_a, tmp_path, "first")
    body = {"name": "x", "adapter": adapter.id}
    assert api_a.post("/v1/aliases", {**body, "eval_files": []}, format="json").status_code == 400
    waiting = eval_file(tenant_a)
    File.objects.filter(pk=waiting.pk).update(status=File.Status.UPLOADED)
    response = api_a.post("/v1/aliases", {**body, "eval_files": [waiting.id]}, format="json")
    assert response.status_code == 400
    assert "still being validated" in response.json()["error"]["message"]


def test_another_tenant_sees_none_of_it_and_names_nothing_of_it(
    api_a, api_b, tenant_a, tenant_b, cast, tmp_path
):
    current, candidate, file = cast
    assert api_b.get("/v1/aliases/support").status_code == 404
    assert api_b.get("/v1/aliases").json()["data"] == []
    assert api_b.get("/v1/aliases/support/moves").status_code == 404
    assert promote(api_b, candidate).status_code == 404
    assert api_b.post("/v1/aliases/support/rollback").status_code == 404
    assert api_b.delete("/v1/aliases/support").status_code == 404
    assert "support" not in [m["id"] for m in api_b.get("/v1/models").json()["data"]]
    assert api_b.get("/v1/models/support").status_code == 404
    assert api_b.delete(f"/v1/adapters/{candidate.id}").status_code == 404
    assert api_b.delete(f"/v1/models/{candidate.name}").status_code == 404
    # B cannot point an alias of its own at A's adapter or pin A's file.
    mine = adapter_of(tenant_b, tmp_path, "b-own")
    b_file = eval_file(tenant_b)
    for body, param in [
        ({"adapter": current.id, "eval_files": [b_file.id]}, "adapter"),
        ({"adapter": mine.id, "eval_files": [file.id]}, "eval_files"),
    ]:
        response = api_b.post("/v1/aliases", {"name": "stolen", **body}, format="json")
        assert response.status_code == 404, response.content
        assert response.json()["error"]["param"] == param
    # Nor can A promote B's adapter into its alias: it does not exist for A.
    assert promote(api_a, mine).status_code == 404
    assert Alias.objects.filter(name="stolen").count() == 0
    assert Adapter.objects.filter(pk=candidate.pk).exists()


# --- promoting ----------------------------------------------------------------------------


def test_promoting_without_evaluations_queues_them_once_and_answers_202(api_a, tenant_a, cast):
    current, candidate, file = cast
    second = eval_file(tenant_a, "second.jsonl")
    Alias.objects.get(name="support").eval_files.add(second)
    response = promote(api_a, candidate)
    assert response.status_code == 202, response.content
    body = response.json()
    assert body["object"] == "alias.promotion" and body["status"] == "evaluating"
    assert "promote again" in body["message"]
    evaluations = Evaluation.objects.filter(pk__in=body["evaluations"])
    assert len(body["evaluations"]) == 2 == evaluations.count()
    for evaluation in evaluations:
        assert evaluation.kind == "custom" and evaluation.status == "queued"
        assert [c["adapter"] for c in evaluation.candidates] == [None, current.id, candidate.id]
    # The first file carries the forgetting probes; asking again waits for the same ones.
    assert {e.file_id: e.options["probes"] for e in evaluations} == {
        min(file.id, second.id): True,
        max(file.id, second.id): False,
    }
    again = promote(api_a, candidate)
    assert again.status_code == 202
    assert sorted(again.json()["evaluations"]) == sorted(body["evaluations"])
    assert Evaluation.objects.count() == 2
    assert Alias.objects.get(name="support").adapter_id == current.id
    assert list(AliasMove.objects.values_list("kind", flat=True)) == ["created"]


def test_an_evaluation_without_per_row_results_is_not_evidence(api_a, tenant_a, cast):
    current, candidate, file = cast
    old = finished_evaluation(tenant_a, file, current, candidate, scored(10), scored(36))
    for entry in old.results["models"]:
        entry.pop("per_row")
    old.save()
    response = promote(api_a, candidate)
    assert response.status_code == 202
    assert old.id not in response.json()["evaluations"]


def test_a_candidate_that_passes_the_gate_moves_the_alias_and_the_move_is_recorded(
    api_a, tenant_a, cast
):
    current, candidate, file = cast
    evaluation = finished_evaluation(tenant_a, file, current, candidate, scored(10), scored(36))
    response = promote(api_a, candidate.name)  # an ft: name works as well as an id
    assert response.status_code == 200, response.content
    body = response.json()
    assert body["object"] == "alias" and body["adapter"] == candidate.id
    assert body["model"] == candidate.name
    move = body["move"]
    assert move["kind"] == "promoted"
    assert (move["from_adapter"], move["to_adapter"]) == (current.id, candidate.id)
    evidence = move["evidence"]
    assert evidence["passed"] is True
    [entry] = evidence["files"]
    assert entry["file_id"] == file.id and entry["evaluation"] == evaluation.id
    assert entry["rows"] == 40 and entry["current"] == 0.25 and entry["candidate"] == 0.9
    assert entry["significant"] is True and entry["interval"][0] > 0
    assert evidence["probes"]["lost"] == 0
    assert Alias.objects.get(name="support").adapter_id == candidate.id
    moves = api_a.get("/v1/aliases/support/moves").json()
    assert [m["kind"] for m in moves["data"]] == ["promoted", "created"]
    assert moves["data"][0]["id"] == move["id"]
    # Paging through the moves, OpenAI's way.
    first = api_a.get("/v1/aliases/support/moves?limit=1").json()
    assert first["has_more"] is True
    rest = api_a.get(f"/v1/aliases/support/moves?after={first['last_id']}").json()
    assert [m["kind"] for m in rest["data"]] == ["created"] and rest["has_more"] is False


def test_a_candidate_that_fails_the_gate_is_refused_with_its_evidence(api_a, tenant_a, cast):
    current, candidate, file = cast
    # One more right answer in forty, and three probes of ten lost.
    finished_evaluation(
        tenant_a, file, current, candidate, scored(20), scored(21, probes_answered=7)
    )
    response = promote(api_a, candidate)
    assert response.status_code == 409, response.content
    body = response.json()
    error = body["error"]
    assert error["code"] == "promotion_refused" and error["param"] == "adapter"
    assert "interval" in error["message"] and "eval.jsonl" in error["message"]
    assert "3 of the 10 general probes" in error["message"]
    evidence = body["evidence"]
    assert evidence["passed"] is False
    low, high = evidence["files"][0]["interval"]
    assert low <= 0 < high
    assert evidence["probes"]["lost_prompts"][0] == "Probe question 7?"
    assert Alias.objects.get(name="support").adapter_id == current.id
    refused = AliasMove.objects.get(kind="refused")
    assert (refused.from_adapter, refused.to_adapter) == (current.id, candidate.id)
    assert refused.evidence == evidence


def test_an_owner_may_force_a_refused_candidate_and_a_member_may_not(
    api_a, owner_api, member_a, tenant_a, cast
):
    current, candidate, file = cast
    finished_evaluation(tenant_a, file, current, candidate, scored(20), scored(20))
    for api in (api_a, api_client_for(member_a.secret)):  # keys without the manage_keys scope
        forbidden = promote(api, candidate, force=True)
        assert forbidden.status_code == 403
        assert "Only owners" in forbidden.json()["error"]["message"]
    assert Alias.objects.get(name="support").adapter_id == current.id
    response = promote(owner_api, candidate, force=True)
    assert response.status_code == 200, response.content
    move = response.json()["move"]
    assert move["kind"] == "forced" and move["to_adapter"] == candidate.id
    assert move["evidence"]["passed"] is False and move["evidence"]["files"]
    assert Alias.objects.get(name="support").adapter_id == candidate.id


def test_a_candidate_of_another_base_or_the_current_one_is_refused(api_a, tenant_a, cast):
    current, _, _ = cast
    other = BaseModel.objects.create(
        name="example/other", source="example/other", revision="main", parameters=1,
        context_length=512,
    )  # fmt: skip
    stranger = Adapter.objects.create(
        org=tenant_a.org, name="ft:other", base_model=other, s3_prefix="x/"
    )
    response = promote(api_a, stranger)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "base_model_mismatch"
    assert "example/other" in response.json()["error"]["message"]
    response = promote(api_a, current)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "already_current"
    assert not Evaluation.objects.exists()


def test_a_failed_evaluation_is_told_once_then_evaluated_anew(api_a, tenant_a, cast):
    current, candidate, file = cast
    failed = finished_evaluation(
        tenant_a,
        file,
        current,
        candidate,
        {},
        {},
        status=Evaluation.Status.FAILED,
        error={"code": "evaluation_failed", "message": "The worker ran out of memory."},
    )
    response = promote(api_a, candidate)
    assert response.status_code == 409
    body = response.json()
    assert body["error"]["code"] == "evaluation_failed"
    assert "The worker ran out of memory." in body["error"]["message"]
    assert body["evidence"]["failed_evaluations"] == [failed.id]
    again = promote(api_a, candidate)
    assert again.status_code == 202
    assert failed.id not in again.json()["evaluations"]


# --- rolling back -------------------------------------------------------------------------


def test_a_rollback_undoes_the_last_promotion_and_then_the_one_before(
    api_a, tenant_a, cast, tmp_path
):
    current, candidate, file = cast
    third = adapter_of(tenant_a, tmp_path, "third")
    nothing = api_a.post("/v1/aliases/support/rollback")
    assert nothing.status_code == 409
    assert nothing.json()["error"]["code"] == "nothing_to_roll_back"
    finished_evaluation(tenant_a, file, current, candidate, scored(10), scored(36))
    assert promote(api_a, candidate).status_code == 200
    finished_evaluation(tenant_a, file, candidate, third, scored(10), scored(36))
    assert promote(api_a, third).status_code == 200

    back = api_a.post("/v1/aliases/support/rollback")
    assert back.status_code == 200, back.content
    assert back.json()["adapter"] == candidate.id
    assert back.json()["move"]["kind"] == "rolled_back"
    assert api_a.post("/v1/aliases/support/rollback").json()["adapter"] == current.id
    assert api_a.post("/v1/aliases/support/rollback").status_code == 409
    kinds = [m["kind"] for m in api_a.get("/v1/aliases/support/moves").json()["data"]]
    assert kinds == ["rolled_back", "rolled_back", "promoted", "promoted", "created"]


def test_a_rollback_to_a_deleted_adapter_is_refused_with_a_sentence(api_a, tenant_a, cast):
    current, candidate, file = cast
    finished_evaluation(tenant_a, file, current, candidate, scored(10), scored(36))
    assert promote(api_a, candidate).status_code == 200
    assert api_a.delete(f"/v1/adapters/{current.id}").status_code == 200
    response = api_a.post("/v1/aliases/support/rollback")
    assert response.status_code == 409
    assert "was deleted" in response.json()["error"]["message"]


# --- deleting models and adapters ---------------------------------------------------------


def test_an_adapter_an_alias_points_at_is_kept_until_the_alias_goes(api_a, tenant_a, cast):
    current, candidate, _ = cast
    keys = objects_of(tenant_a.org)
    assert any(key.startswith(current.s3_prefix) for key in keys)
    for path in (f"/v1/adapters/{current.id}", f"/v1/models/{current.name}"):
        response = api_a.delete(path)
        assert response.status_code == 409, response.content
        error = response.json()["error"]
        assert error["code"] == "adapter_in_use" and "support" in error["message"]
    assert Adapter.objects.filter(pk=current.pk).exists()

    assert api_a.delete("/v1/aliases/support").status_code == 200
    response = api_a.delete(f"/v1/models/{current.name}")
    assert response.status_code == 200, response.content
    assert response.json() == {"id": current.name, "object": "model", "deleted": True}
    assert not Adapter.objects.filter(pk=current.pk).exists()
    assert not [k for k in objects_of(tenant_a.org) if k.startswith(current.s3_prefix)]
    assert api_a.get(f"/v1/models/{current.name}").status_code == 404

    response = api_a.delete(f"/v1/adapters/{candidate.id}")
    assert response.json() == {"id": candidate.id, "object": "adapter", "deleted": True}
    assert storage.list_keys(candidate.s3_prefix) == []
    assert api_a.delete(f"/v1/adapters/{candidate.id}").status_code == 404


def test_a_base_model_cannot_be_deleted(api_a):
    response = api_a.delete(f"/v1/models/{BaseModel.default().name}")
    assert response.status_code == 403
    assert "base model" in response.json()["error"]["message"]
    assert BaseModel.objects.filter(name=BaseModel.default().name).exists()


# --- the Deployments page -----------------------------------------------------------------


def test_the_deployments_page_shows_each_alias_and_its_forms_move_it(
    tenant_a, member_a, tenant_b, cast
):
    current, candidate, file = cast
    browser = signed_in(tenant_a)
    page = browser.get("/deployments/").content.decode()
    assert "support" in page and current.name in page and file.filename in page
    assert "Force past the gate" in page  # an owner's page
    assert "Force past the gate" not in signed_in(member_a).get("/deployments/").content.decode()
    assert "support" not in signed_in(tenant_b).get("/deployments/").content.decode()

    # Promote: evaluations are queued, then, once finished, the alias moves.
    response = browser.post("/deployments/support/promote", {"adapter": candidate.id}, follow=True)
    assert response.status_code == 200
    assert "promote again when they finish" in response.content.decode()
    assert Evaluation.objects.get().status == "queued"
    finished_evaluation(tenant_a, file, current, candidate, scored(10), scored(36))
    response = browser.post("/deployments/support/promote", {"adapter": candidate.id}, follow=True)
    page = response.content.decode()
    assert f"support now points at {candidate.name}" in page
    assert "Promoted" in page and "[0." in page  # the move with its interval

    # A member may not force; a foreign adapter is not a choice; rollback moves it back.
    member = signed_in(member_a)
    response = member.post(
        "/deployments/support/promote", {"adapter": current.id, "force": "on"}, follow=True
    )
    assert "Only owners" in response.content.decode()
    response = browser.post("/deployments/support/rollback", follow=True)
    assert f"support is back on {current.id}" in response.content.decode()
    assert Alias.objects.get(name="support").adapter_id == current.id
    response = browser.post("/deployments/support/rollback", follow=True)
    assert response.status_code == 200 and "no promotion to roll back" in response.content.decode()
    assert signed_in(tenant_b).post("/deployments/support/rollback").status_code == 404


def test_the_pinned_eval_files_are_replaced_and_the_change_recorded(api_a, tenant_a, cast):
    current, _, file = cast
    second = eval_file(tenant_a, "times.jsonl")
    response = api_a.post(
        "/v1/aliases/support/eval_files", {"eval_files": [file.id, second.id]}, format="json"
    )
    assert response.status_code == 200, response.content
    body = response.json()
    assert body["eval_files"] == sorted([file.id, second.id]) and body["adapter"] == current.id
    move = body["move"]
    assert move["kind"] == "pinned" and move["evidence"]["before"] == [file.id]
    missing = api_a.post(
        "/v1/aliases/support/eval_files", {"eval_files": ["file-nope"]}, format="json"
    )
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "eval_files"
    assert sorted(Alias.objects.get(name="support").eval_files.values_list("id", flat=True)) == (
        sorted([file.id, second.id])
    )
