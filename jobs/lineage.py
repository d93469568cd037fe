"""An adapter's lineage: the chain of versions it was trained along (its parent, the parent's
parent, ...), each with the data it learned from, its scores on every task of the chain, and
who or what moved an alias to it. ``GET /v1/adapters/{id}/lineage`` and the adapter's Lineage
page show it.

A task is an adapter's own held-out rows (its job's evaluation): each version was scored on its
own task when it was trained, and a continual job also scored the new version and its parent
on every ancestor's task (worker/training.py ``against_parent``: retention). So the table of
versions × tasks is filled as far as those evaluations reach; what was never measured is None.
"""

from __future__ import annotations

from engine.hyperparameters import public
from jobs.models import Adapter, Evaluation
from jobs.models.aliases import AliasMove


def lineage(adapter: Adapter) -> dict:
    """The versions from the first ancestor to ``adapter``, and the adapter's children."""
    chain = list(reversed(adapter.lineage()))
    evaluations = {
        e.adapter_id: e
        for e in Evaluation.objects.filter(
            adapter__in=chain, kind=Evaluation.Kind.JOB, status=Evaluation.Status.SUCCEEDED
        ).order_by("created_at")
    }
    moves = (
        AliasMove.objects.filter(alias__org_id=adapter.org_id, to_adapter__in=[a.id for a in chain])
        .exclude(kind=AliasMove.Kind.PINNED)
        .select_related("alias")
    )
    promoted: dict[str, list[dict]] = {}
    for move in moves.order_by("created_at"):
        promoted.setdefault(move.to_adapter, []).append(
            {
                "alias": move.alias.name,
                "kind": move.kind,
                "actor": move.actor,
                "at": int(move.created_at.timestamp()),
            }
        )
    tasks = [a.id for a in chain]
    versions = []
    for version in chain:
        scores = dict.fromkeys(tasks)
        evaluation = evaluations.get(version.id)
        if evaluation is not None:
            scores[version.id] = evaluation.results.get("adapter")
            for task in evaluation.retention():
                scores[task["adapter"]] = task["child"]
        job = version.job
        versions.append(
            {
                "id": version.id,
                "name": version.name,
                "parent": version.parent_id,
                "created_at": int(version.created_at.timestamp()),
                "job": job.id if job else None,
                "training_file": job.training_file_id if job else None,
                "hyperparameters": public(job.hyperparameters) if job else {},
                "scores": scores,
                "moves": promoted.get(version.id, []),
            }
        )
    return {
        "object": "adapter.lineage",
        "adapter": adapter.id,
        "tasks": tasks,
        "versions": versions,
        "children": list(
            Adapter.objects.filter(parent=adapter)
            .order_by("created_at")
            .values_list("id", flat=True)
        ),
    }


def task_metric(scores: list[dict | None]) -> str:
    """The metric a task is read by across versions: normalized exact match where any version
    matched a reference exactly, else ROUGE-L (free-form answers rarely match)."""
    if any((s or {}).get("normalized_exact_match") for s in scores):
        return "normalized_exact_match"
    return "rouge_l"
