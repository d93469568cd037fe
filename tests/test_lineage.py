"""An adapter's lineage (jobs/lineage.py): the versions it was trained along, oldest first, each
with its data, its scores on every task of the chain (its own held-out rows when it was
trained, the ancestors' when it continued from one: retention) and the alias moves to it; by
API and on a page with a table and a chart."""

import pytest

from jobs.models import Adapter, Alias, AliasMove, BaseModel, Evaluation, File, FineTuneJob
from tests.helpers import signed_in

pytestmark = pytest.mark.django_db


def scores(exact: float) -> dict:
    return {"normalized_exact_match": exact, "rouge_l": exact, "loss": 1.0 - exact / 2}


def version(org, name: str, parent: Adapter | None, own: float, kept: dict | None = None):
    """An adapter whose job trained on a file of its own, with the job's evaluation: ``own`` on
    its held-out rows, and ``kept`` {ancestor: score} on its ancestors' (retention)."""
    base = BaseModel.seed_bundled()
    file = File.objects.create(
        org=org, filename=f"{name}.jsonl", purpose="fine-tune", bytes=1, status="processed"
    )
    job = FineTuneJob.objects.create(
        org=org,
        base_model=base,
        training_file=file,
        parent_adapter=parent,
        hyperparameters={"replay_fraction": 0.5 if parent else 0.0},
    )
    adapter = Adapter.objects.create(
        org=org, name=f"ft:{name}", job=job, base_model=base, parent=parent, s3_prefix="x/"
    )
    retention = [
        {"adapter": a.id, "model": a.name, "rows": 8, "child": scores(v), "parent": scores(1.0)}
        for a, v in (kept or {}).items()
    ]
    results = {"base": scores(0.0), "adapter": scores(own)}
    if parent is not None:
        results["parent"] = {
            "adapter": parent.id,
            "model": parent.name,
            "held_out": scores(0.1),
            "retention": retention,
        }
    Evaluation.objects.create(
        org=org, job=job, adapter=adapter, base_model=base, results=results, verdict={}
    )
    return adapter


def test_the_lineage_lists_each_version_with_its_scores_on_every_task_and_its_moves(
    api_a, api_b, tenant_a
):
    org = tenant_a.org
    first = version(org, "dates", None, 0.95)
    second = version(org, "times", first, 0.6, {first: 0.9})
    third = version(org, "units", second, 0.7, {first: 0.85, second: 0.55})
    alias = Alias.objects.create(org=org, name="helper", adapter=third)
    AliasMove.objects.create(
        org=org, alias=alias, kind="promoted", to_adapter=third.id, actor="policy"
    )

    body = api_a.get(f"/v1/adapters/{third.id}/lineage").json()
    assert body["object"] == "adapter.lineage" and body["tasks"] == [first.id, second.id, third.id]
    versions = body["versions"]
    assert [v["id"] for v in versions] == [first.id, second.id, third.id]
    exact = [
        [(v["scores"][task] or {}).get("normalized_exact_match") for task in body["tasks"]]
        for v in versions
    ]
    assert exact == [[0.95, None, None], [0.9, 0.6, None], [0.85, 0.55, 0.7]]
    assert versions[2]["moves"][0]["alias"] == "helper" and versions[2]["moves"][0]["actor"] == (
        "policy"
    )
    assert versions[1]["hyperparameters"]["replay_fraction"] == 0.5
    assert versions[1]["parent"] == first.id
    assert api_a.get(f"/v1/adapters/{first.id}/lineage").json()["children"] == [second.id]
    assert api_b.get(f"/v1/adapters/{third.id}/lineage").status_code == 404

    page = signed_in(tenant_a).get(f"/adapters/{third.id}/lineage").content.decode()
    assert "ft:dates" in page and "85%" in page and "55%" in page and "<polyline" in page
    assert "promoted" in page and "(this one)" in page
