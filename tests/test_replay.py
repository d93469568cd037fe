"""Replay (worker/training.py ``replay_rows``): a job with a parent adapter trains on a seeded
share of its ancestors' training rows beside its own, never on their held-out rows."""

import pytest

from engine import train
from engine.hyperparameters import TrainConfig
from jobs.models import Adapter, BaseModel, File, FineTuneJob
from tests.helpers import chat_rows, jsonl, upload
from worker.training import read_examples, replay_rows

pytestmark = pytest.mark.django_db


def trained(api, org, rows: list[dict], parent: Adapter | None = None, **hyperparameters):
    """An adapter whose job trained on ``rows`` (a file uploaded through the API)."""
    file = File.objects.get(pk=upload(api, jsonl(rows)).json()["id"])
    job = FineTuneJob.objects.create(
        org=org,
        base_model=BaseModel.seed_bundled(),
        training_file=file,
        parent_adapter=parent,
        hyperparameters=hyperparameters,
    )
    return Adapter.objects.create(
        org=org,
        name=f"ft:{job.id}",
        job=job,
        base_model=job.base_model,
        parent=parent,
        s3_prefix="x/",
    )


def texts(rows, tokenizer) -> list[str]:
    return [tokenizer.decode(row.input_ids) for row in rows]


def test_a_child_replays_its_ancestors_training_rows_but_never_their_held_out_ones(
    api_a, tenant_a, tokenizer
):
    org = tenant_a.org
    grandparent = trained(api_a, org, chat_rows(10, start=100))
    parent = trained(
        api_a, org, chat_rows(20, start=200), grandparent, validation_fraction=0.2, seed=7
    )
    child = FineTuneJob.objects.create(
        org=org,
        base_model=BaseModel.default(),
        training_file=File.objects.get(pk=upload(api_a, jsonl(chat_rows(12))).json()["id"]),
        parent_adapter=parent,
    )

    replayed = replay_rows(child, TrainConfig(replay_fraction=0.25), tokenizer, 12)
    assert len(replayed) == 4  # a quarter of 16 rows: 4 old beside 12 new
    again = replay_rows(child, TrainConfig(replay_fraction=0.25), tokenizer, 12)
    assert texts(again, tokenizer) == texts(replayed, tokenizer)  # seeded

    # All of it, at most: the ancestors' rows less what their jobs held out.
    everything = replay_rows(child, TrainConfig(replay_fraction=0.9), tokenizer, 12)
    held_out = set()
    splits = [(parent, TrainConfig(validation_fraction=0.2, seed=7)), (grandparent, TrainConfig())]
    for adapter, config in splits:
        examples, _ = read_examples(adapter.training_file())
        _, held = train.split_validation(examples, config.validation_fraction, config.seed)
        held_out |= {e.messages[0].content for e in held}
    assert len(everything) == 10 - 1 + 20 - 4
    decoded = " ".join(texts(everything, tokenizer))
    assert held_out and not any(question in decoded for question in held_out)
    assert "What is 100 + 100?" in decoded or "What is 101 + 101?" in decoded  # the grandparent's

    assert replay_rows(child, TrainConfig(replay_fraction=0.0), tokenizer, 12) == []
    orphan = FineTuneJob.objects.create(
        org=org, base_model=BaseModel.default(), training_file=child.training_file
    )
    assert replay_rows(orphan, TrainConfig(), tokenizer, 12) == []
