"""DPO in the training engine (engine/train.py): pairs rendered, kept and packed whole; the loss
of packed pairs as computed pair by pair; the reference (the base, or the parent adapter);
checkpoints that keep it."""

import math

import pytest
import torch
import torch.nn.functional as F

from engine import data
from engine import train as T
from engine.hyperparameters import TrainConfig
from tests.helpers import jsonl, random_adapter


def preference_rows(count: int, start: int = 0) -> list[dict]:
    """Additions answered two ways: "a plus b equals c." preferred to "a plus b is c."."""
    rows = []
    for i in range(start, start + count):
        a, b = 3 + i, 40 - i
        rows.append(
            {
                "input": {"messages": [{"role": "user", "content": f"What is {a} plus {b}?"}]},
                "preferred_output": [
                    {"role": "assistant", "content": f"{a} plus {b} equals {a + b}."}
                ],
                "non_preferred_output": [
                    {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}
                ],
            }
        )
    return rows


def examples_of(rows: list[dict]) -> list[data.Example]:
    _, items = data.open_dataset(data.chunks_of(jsonl(rows)))
    return list(items)


@pytest.fixture(scope="module")
def pairs(tokenizer) -> list[T.Tokenized]:
    tokenized, dropped = T.tokenize(examples_of(preference_rows(8)), tokenizer, 256, pairs=True)
    assert dropped == 0
    return tokenized


def dpo_config(**changes) -> TrainConfig:
    settings = {
        "method": "lora",
        "objective": "dpo",
        "lora_rank": 4,
        "batch_size": 4,
        "max_seq_length": 256,
        "learning_rate": 1e-3,
        **changes,
    }
    return TrainConfig(**settings)


def test_pairs_render_both_answers_keep_them_in_storage_and_truncate_together(tokenizer):
    """A pair is rendered with both sides (only each answer trained), kept and read back
    whole (worker/tokenized_cache.py), and truncated side by side; a supervised job reads the
    preferred answer alone."""
    from worker.tokenized_cache import decode, encode

    chat = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}
    examples = examples_of(preference_rows(2)) + examples_of([chat])
    rendered = [T.rendered_tokens(e, tokenizer) for e in examples]
    assert rendered[0].rejected is not None and rendered[2].rejected is None
    assert decode(encode(rendered)) == rendered
    pairs, dropped = T.truncate(decode(encode(rendered))[:2], 256, pairs=True)
    assert dropped == 0
    preferred = [t for t in pairs[0].labels if t != T.IGNORE]
    rejected = [t for t in pairs[0].rejected.labels if t != T.IGNORE]
    assert tokenizer.decode(preferred) == "3 plus 40 equals 43.<|im_end|>"
    assert tokenizer.decode(rejected) == "3 plus 40 is 43.<|im_end|>"
    assert pairs[0].length == len(pairs[0].input_ids) + len(pairs[0].rejected.input_ids)
    supervised, _ = T.truncate(rendered[:2], 256)
    assert [s.rejected for s in supervised] == [None, None]
    assert supervised[0].input_ids == pairs[0].input_ids
    # Cut where the answers start, nothing of either is left to learn: the pair is dropped.
    prompt_tokens = pairs[0].labels.index(next(t for t in pairs[0].labels if t != T.IGNORE))
    assert T.truncate(rendered[:1], prompt_tokens, pairs=True) == ([], 1)


def test_packed_pairs_keep_both_answers_in_one_row_and_number_their_sequences(pairs):
    rows = T.pack(pairs, row_tokens=200)
    assert sorted(id(e) for row in rows for e in row.examples) == sorted(id(p) for p in pairs)
    for row in rows:
        sequences = row.sequence_ids[0].tolist()
        assert max(sequences) + 1 == 2 * len(row.examples)
        lengths = [len(side.input_ids) for e in row.examples for side in e.sides()]
        assert [sequences.count(n) for n in range(len(lengths))] == lengths
        starts = [i for i, p in enumerate(row.position_ids[0].tolist()) if p == 0]
        assert len(starts) == len(lengths)
    (padded,) = T.pad(pairs[:3], pad_id=0)
    assert padded.input_ids.shape[0] == 6 and padded.sequence_ids[:, 0].tolist() == list(range(6))


def naive_logps(model, pair: T.Tokenized) -> torch.Tensor:
    """A pair's two answer log-probabilities, each sequence alone through the whole model."""
    found = []
    for side in pair.sides():
        ids = torch.tensor([side.input_ids])
        logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
        labels = torch.tensor(side.labels[1:])
        kept = labels != T.IGNORE
        found.append(F.log_softmax(logits[kept], -1).gather(1, labels[kept, None]).sum())
    return torch.stack(found)


@pytest.mark.slow  # ~19 s: a second copy of the model, each sequence through it alone
def test_the_loss_of_packed_pairs_and_its_gradient_equal_those_computed_pair_by_pair(
    cache, pairs, tmp_path
):
    """DPO's loss from packed rows (per-sequence sums by sequence id, the chunked head) equals
    the textbook formula on each pair alone, and so do the adapter's gradients."""
    torch.manual_seed(0)
    model = random_adapter(cache, tmp_path / "adapter")
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable
    chosen = pairs[:5]
    for number, pair in enumerate(chosen):  # any reference: the loss reads it as given
        pair.reference = (-20.0 - number, -22.0 + number)
    beta = 0.3
    packed = sum(T.preference_loss(model, row, beta)[0] for row in T.pack(chosen, 4096))
    packed.backward()
    packed_grads = [p.grad.clone() for p in trainable]
    model.zero_grad()
    textbook = 0
    for pair in chosen:
        logps = naive_logps(model, pair)
        reference = torch.tensor(pair.reference)
        margin = beta * ((logps[0] - reference[0]) - (logps[1] - reference[1]))
        textbook = textbook - F.logsigmoid(margin)
    textbook.backward()
    assert float(packed.detach()) == pytest.approx(float(textbook.detach()), rel=1e-4)
    for mine, theirs in zip(packed_grads, (p.grad for p in trainable), strict=True):
        # fp32 sums in another order, attention per document against the whole model's:
        # apart by up to ~2e-4 of the largest gradient (the adapter's weights are random)
        assert float((mine - theirs).abs().max()) <= 1e-3 * float(theirs.abs().max())
    for pair in chosen:
        pair.reference = None


@pytest.mark.slow  # two short DPO runs of the 135M model: ~30 s
def test_the_reference_is_the_base_for_a_fresh_adapter_and_the_parent_for_a_child(
    base, cache, tokenizer, tmp_path
):
    """Before the first step the model is its reference: a fresh adapter is zero, so the base;
    a child starts as its parent. The first step's loss is therefore log 2 on every pair."""
    held = T.tokenize(examples_of(preference_rows(2, start=20)), tokenizer, 256, pairs=True)[0]
    train_pairs = T.tokenize(examples_of(preference_rows(8)), tokenizer, 256, pairs=True)[0]
    base_logps = T.pair_logps(base, held, 256, "cpu")
    parent = tmp_path / "parent"
    random_adapter(cache, parent)
    first_losses = {}
    for name, parent_adapter in (("base", None), ("parent", parent)):
        losses = []
        model, _ = T.train(
            dpo_config(max_steps=1, mixed_precision="fp32"),
            train_pairs,
            held,
            base,
            device="cpu",
            work_dir=tmp_path / name,
            parent_adapter=parent_adapter,
            callbacks=T.Callbacks(on_progress=lambda p, losses=losses: losses.append(p.loss)),
        )
        references = [pair.reference for pair in held]
        if parent_adapter is None:
            expected = base_logps
        else:  # the parent alone, loaded beside the trained child
            model.load_adapter(str(parent), adapter_name="the_parent")
            model.set_adapter("the_parent")
            expected = T.pair_logps(model, held, 256, "cpu")
            assert abs(expected[0][0] - base_logps[0][0]) > 0.01  # the parent is not the base
        for got, wanted in zip(references, expected, strict=True):
            assert got == pytest.approx(wanted, abs=1e-3)
        first_losses[name] = losses[0]
        base = model.unload()
    # One step of four pairs: the reference pass reads those four, not the eight.
    assert sum(pair.reference is not None for pair in train_pairs) == 4
    assert first_losses["base"] == pytest.approx(math.log(2), abs=1e-4)
    assert first_losses["parent"] == pytest.approx(math.log(2), abs=1e-4)


@pytest.mark.slow  # ~25 s
def test_a_resumed_dpo_run_reads_its_reference_from_the_checkpoint_and_matches(
    base, pairs, tmp_path
):
    config = dpo_config(max_steps=4, checkpoint_every=2, mixed_precision="fp32")
    losses: dict[str, list[float]] = {"whole": [], "resumed": []}
    model, _ = T.train(
        config,
        pairs,
        [],
        base,
        device="cpu",
        work_dir=tmp_path / "whole",
        callbacks=T.Callbacks(on_progress=lambda p: losses["whole"].append(p.loss)),
    )
    whole = {k: v.clone() for k, v in T.adapter_weights(model).items()}
    base_again = model.unload()
    checkpoint = tmp_path / "whole" / "checkpoints" / "step-2"
    assert (checkpoint / T.REFERENCE_FILE).exists()
    kept = [pair.reference for pair in pairs]
    for pair in pairs:  # the resumed run must take them from the checkpoint
        pair.reference = None
    model, resumed = T.train(
        config,
        pairs,
        [],
        base_again,
        device="cpu",
        work_dir=tmp_path / "again",
        resume_from=checkpoint,
        callbacks=T.Callbacks(on_progress=lambda p: losses["resumed"].append(p.loss)),
    )
    again = T.adapter_weights(model)
    model.unload()
    assert [pair.reference for pair in pairs] == kept
    assert resumed.resumed_from_step == 2
    assert losses["resumed"] == pytest.approx(losses["whole"][2:], abs=1e-6)
    assert losses["whole"][0] == pytest.approx(math.log(2), abs=1e-4)
    assert losses["whole"][-1] < losses["whole"][0]
    for key, value in whole.items():
        assert torch.allclose(value, again[key], atol=1e-6)


@pytest.mark.slow  # two 3-step DPO runs: ~15 s
def test_a_step_trains_alike_whether_its_pairs_share_one_row_or_take_one_each(
    base, pairs, tmp_path, monkeypatch
):
    """The DPO loss is a mean over the step's pairs, however they were packed into forward
    passes: one row holding all four, or four rows of one pair each (micro-batches). The
    gradient itself is compared (its norm, as clipping reads it): Adam's steps hardly change
    when a gradient is scaled, so the weights alone would not show a wrong normalization."""
    norms: list[float] = []
    clip = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(
        torch.nn.utils,
        "clip_grad_norm_",
        lambda parameters, most: norms.append(float(clip(parameters, most))) or norms[-1],
    )
    # Rows of max_seq_length (64) hold one pair each (~100 tokens), or all in 4096.
    config = dpo_config(max_steps=3, mixed_precision="fp32", max_seq_length=64)
    runs = {}
    for name, row_tokens in (("one row", 4096), ("a row each", 16)):
        norms.clear()
        losses = []
        model, _ = T.train(
            config,
            pairs,
            [],
            base,
            device="cpu",
            work_dir=tmp_path / name,
            tokens_per_forward=row_tokens,
            callbacks=T.Callbacks(on_progress=lambda p, losses=losses: losses.append(p.loss)),
        )
        weights = {k: v.clone() for k, v in T.adapter_weights(model).items()}
        runs[name] = losses, weights, list(norms)
        base = model.unload()
    assert len(T.pack(pairs[:4], T.forward_tokens(64, 16))) == 4
    assert runs["one row"][0] == pytest.approx(runs["a row each"][0], abs=1e-5)
    assert runs["one row"][2] == pytest.approx(runs["a row each"][2], rel=1e-4)
    assert len(runs["one row"][2]) == 2  # 8 pairs, 4 a step
    # Adam turns gradients near zero into whole steps of either sign, so sums made in another
    # order move a few weights apart: the adapter as a whole stays within 1e-3 of its norm.
    one, each = runs["one row"][1], runs["a row each"][1]
    apart = sum(float((one[key] - each[key]).norm() ** 2) for key in one) ** 0.5
    assert apart <= 1e-3 * sum(float(value.norm() ** 2) for value in one.values()) ** 0.5
