"""The base's half of an evaluation, kept between jobs (jobs/models/base_scores.py,
worker/base_scores.py): computed once, read by the next job on the same base and rows, computed
again when anything it depends on changes, never shared across tenants, and the figures are the
ones an evaluation without it gives."""

import pytest
import torch

from engine import data
from engine import evaluate as E
from engine import train as T
from engine.hyperparameters import TrainConfig
from jobs.models import BaseModel, BaseScores, File
from worker.base_scores import remember_for

pytestmark = pytest.mark.slow  # the 135M model generates on the CPU: make test, not test-fast

ROWS = [
    ("What is the capital of France?", "Paris."),
    ("Say hello.", "Hello!"),
    ("Name a color.", "Blue."),
]


@pytest.fixture(scope="module")
def held_out(tokenizer):
    examples = [
        data.Example(i + 1, "chat", [data.Message("user", q), data.Message("assistant", a, True)])
        for i, (q, a) in enumerate(ROWS)
    ]
    return examples, T.tokenize(examples, tokenizer, 256)[0]


def adapter_model(base, seed: int):
    """A LoRA adapter that is not its base: B drawn at random (a trained one in all but cost)."""
    torch.manual_seed(seed)
    model = T.attach_lora(base, TrainConfig(method="lora", lora_rank=4), None)
    noise = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.02, generator=noise)
    return model


def evaluate_job(base, tokenizer, held_out, remember, *, seed=1, probes=None) -> dict:
    """What a job's evaluation computes (worker/training.py JobRun.evaluate), on small sizes."""
    examples, tokenized = held_out
    model = adapter_model(base, seed)
    try:
        return E.compare(
            model,
            tokenizer,
            examples,
            tokenized,
            row_tokens=256,
            device="cpu",
            max_new_tokens=8,
            probes=probes or E.load_probes()[:3],
            remember=remember,
        ).as_dict()
    finally:
        model.unload()


def held_out_file(tenant) -> File:
    """The file held-out rows come from: what is kept of it lives as long as it does."""
    return File.objects.create(
        org=tenant.org,
        filename="held-out.jsonl",
        purpose=File.Purpose.FINE_TUNE,
        bytes=1,
        sha256="0" * 64,
        s3_key=File.object_key(tenant.org.id, "file-x"),
    )


def remember_for_file(base_model, tenant):
    sha256 = held_out_file(tenant).sha256
    return remember_for(base_model, "none", "cpu", org_id=tenant.org.id, file_sha256=sha256)


def counting(remember, computed: list[str]):
    """``remember``, noting the kind of each result it had to compute."""

    def counted(kind, inputs, compute):
        return remember(kind, inputs, lambda: computed.append(kind) or compute())

    return counted


def test_kept_and_recomputed_base_scores_give_the_same_evaluation(
    db, tenant_a, base, tokenizer, held_out
):
    fresh = evaluate_job(base, tokenizer, held_out, E.compute_now)
    model = BaseModel.default()
    computed: list[str] = []
    remember = counting(remember_for_file(model, tenant_a), computed)
    first = evaluate_job(base, tokenizer, held_out, remember)
    again = evaluate_job(base, tokenizer, held_out, remember)
    assert computed == [E.HELD_OUT, E.PROBES]  # the second evaluation read both
    assert fresh == first == again
    assert fresh["base"] != fresh["adapter"]  # the adapter's half is its own, not the base's


def test_the_probes_base_results_are_computed_once_per_base_and_probe_set(
    db, tenant_a, tenant_b, base, tokenizer, held_out
):
    model = BaseModel.default()
    computed: list[str] = []

    held_out_file(tenant_a), held_out_file(tenant_b)

    def job(tenant, seed, base_model=model, probes=None):
        remember = remember_for(
            base_model, "none", "cpu", org_id=tenant.org.id, file_sha256="0" * 64
        )
        remember = counting(remember, computed)
        return evaluate_job(base, tokenizer, held_out, remember, seed=seed, probes=probes)

    first, second = job(tenant_a, 1), job(tenant_a, 2)
    assert computed.count(E.PROBES) == 1  # two jobs (two adapters), one base run on the probes
    assert first["forgetting"]["base"] == second["forgetting"]["base"]
    assert first["forgetting"]["adapter"] != second["forgetting"]["adapter"]
    assert BaseScores.objects.get(kind=E.PROBES).uses == 1

    # Another tenant's job reads Loft's probes but scores its own held-out rows, even the same.
    computed.clear()
    job(tenant_b, 3)
    assert computed == [E.HELD_OUT]

    # A changed probe set, or another revision of the base, is scored again.
    computed.clear()
    changed = E.load_probes()[:3]
    changed[0] = E.Probe(changed[0].prompt, "Its capital is Paris.", changed[0].expect)
    job(tenant_a, 4, probes=changed)
    assert computed == [E.PROBES]
    computed.clear()
    revised = BaseModel.objects.get(pk=model.pk)
    revised.revision = "another-revision"
    job(tenant_a, 5, base_model=revised)
    assert computed == [E.HELD_OUT, E.PROBES]


def test_what_was_kept_of_a_tenants_file_goes_with_the_file(db, tenant_a):
    model = BaseModel.default()
    file = held_out_file(tenant_a)
    remember = remember_for(model, "none", "cpu", org_id=tenant_a.org.id, file_sha256=file.sha256)
    remember(E.HELD_OUT, {"rows": "r"}, lambda: {"scores": {}, "outputs": []})
    remember(E.PROBES, {"probes": "p"}, lambda: {"loss": 1.0, "outputs": []})
    assert BaseScores.objects.filter(org=tenant_a.org).count() == 1
    file.delete_with_content()
    assert not BaseScores.objects.filter(org=tenant_a.org).exists()
    assert BaseScores.objects.filter(kind=E.PROBES).count() == 1  # Loft's own stay
    # An evaluation that finishes after its file was deleted keeps nothing of it.
    remember(E.HELD_OUT, {"rows": "other"}, lambda: {"scores": {}, "outputs": []})
    assert not BaseScores.objects.filter(org=tenant_a.org).exists()
