"""The training engine on its own (engine/train.py): packing, loss, checkpoints, resume."""

import datetime
from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel
from safetensors.torch import load_file

from engine import attention, data, plan
from engine import train as T
from engine.base_models import load_base_model, resolve_precision
from engine.generate import AdapterCache
from engine.hyperparameters import ConfigError, TrainConfig, as_stored, from_request, public
from tests.dates import LEARNS_THE_RULE, date_rows
from tests.helpers import SMOLLM2, counting_examples


@pytest.fixture(scope="module")
def examples(tokenizer) -> list[T.Tokenized]:
    return counting_examples(tokenizer, 256)


def test_packed_rows_give_the_same_logits_as_separate_ones(base):
    """Per-example position_ids without a KV cache make transformers mask across examples."""
    a, b = torch.randint(100, 2000, (1, 20)), torch.randint(100, 2000, (1, 33))
    with torch.no_grad():
        alone_a = base(input_ids=a, use_cache=False).logits
        alone_b = base(input_ids=b, use_cache=False).logits
        positions = torch.cat([torch.arange(20), torch.arange(33)]).unsqueeze(0)
        packed = base(
            input_ids=torch.cat([a, b], 1), position_ids=positions, use_cache=False
        ).logits
    assert torch.allclose(packed[:, :20], alone_a, atol=1e-3)
    assert torch.allclose(packed[:, 20:], alone_b, atol=1e-3)


def test_the_packed_loss_equals_the_sum_of_separate_losses(base, examples):
    rows = T.pack(examples[:5], row_tokens=4096)
    assert len(rows) == 1
    with torch.no_grad():
        packed, packed_count = T.loss_sum(base, rows[0])
        separate = [T.loss_sum(base, T.pack([e], 4096)[0]) for e in examples[:5]]
    assert packed_count == sum(n for _, n in separate)
    assert float(packed) == pytest.approx(sum(float(s) for s, _ in separate), rel=1e-4)


def test_packed_examples_attend_each_to_itself_as_the_masked_row_did(base, examples, monkeypatch):
    """engine/attention.py: one causal attention per example, no mask over the row; the same
    loss as transformers' sdpa with its block-causal mask in fp32, and as near it under bf16."""
    row = T.pack(examples[:5], row_tokens=4096)[0]
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(
        torch.nn.functional,
        "scaled_dot_product_attention",
        lambda *a, **kw: calls.append(a[0].shape[2]) or sdpa(*a, **kw),
    )
    layers = base.config.num_hidden_layers
    losses = {}
    for implementation in (attention.PER_DOCUMENT, "sdpa"):
        monkeypatch.setattr(base.config, "_attn_implementation", implementation)
        for precision in ("fp32", "bf16"):
            calls.clear()
            with torch.no_grad(), T.autocast(precision, "cpu"):
                losses[implementation, precision] = float(T.loss_sum(base, row)[0])
            if implementation == "sdpa":
                assert calls == [row.input_ids.shape[1]] * layers  # the whole row, masked
            else:  # each example's tokens alone
                lengths = [len(e.input_ids) for e in examples[:5]]
                assert sorted(calls) == sorted(lengths * layers)
    assert losses[attention.PER_DOCUMENT, "fp32"] == pytest.approx(losses["sdpa", "fp32"], rel=1e-5)
    # Under bf16 as near fp32 as the masked path is, or within bf16's rounding: which path
    # lands nearer depends on the CPU's kernels (per example 0.27 % against the masked 0.7 % on
    # a Xeon with AMX; 0.64 % against 0.42 % on an EPYC that emulates bf16).
    fp32 = losses["sdpa", "fp32"]
    per_document_gap = abs(losses[attention.PER_DOCUMENT, "bf16"] - fp32) / fp32
    assert per_document_gap <= max(abs(losses["sdpa", "bf16"] - fp32) / fp32, 0.01), losses


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_chunked_loss_and_its_gradient_equal_the_plain_cross_entropy(dtype):
    """A pure unit test of engine.train.LinearCrossEntropy: more positions than one chunk."""
    torch.manual_seed(0)
    positions = plan.LOSS_CHUNK * 2 + 37
    weight = (torch.randn(1000, 64) * 0.2).to(dtype)
    targets = torch.randint(0, 1000, (positions,))
    hidden = torch.randn(positions, 64, requires_grad=True)
    chunked = T.LinearCrossEntropy.apply(hidden, weight, targets).sum()
    (chunked * 3).backward()
    chunked_grad, hidden.grad = hidden.grad, None
    plain = F.cross_entropy((hidden.to(dtype) @ weight.t()).float(), targets, reduction="sum")
    (plain * 3).backward()
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    assert float(chunked) == pytest.approx(float(plain), rel=tolerance)
    largest = float(hidden.grad.abs().max())  # bf16 rounds the two ways' products apart
    assert float((chunked_grad - hidden.grad).abs().max()) <= tolerance * largest


def test_packing_fills_rows_without_padding_and_restarts_positions(examples):
    rows = T.pack(examples, row_tokens=256)
    assert sum(row.real_tokens for row in rows) == sum(len(e.input_ids) for e in examples)
    assert all(row.attention_mask is None for row in rows)  # no padding at all
    for row in rows:
        positions = row.position_ids[0].tolist()
        starts = [i for i, p in enumerate(positions) if p == 0]
        assert all(row.labels[0, start] == T.IGNORE for start in starts)
        assert row.input_ids.shape[1] <= 256 or len(starts) == 1


def test_rendered_examples_kept_in_storage_read_back_as_they_were_and_truncate_alike(tokenizer):
    """worker/tokenized_cache.py keeps rendered examples (safetensors) for the next job on the
    file; read back, they truncate to the same rows as rendering them afresh."""
    from worker.tokenized_cache import decode, encode

    messages = [data.Message("user", "Count to 3."), data.Message("assistant", "1 2 3", True)]
    examples = [data.Example(1, "chat", messages), data.Example(2, "text", [], "Just text.")]
    rendered = [T.rendered_tokens(e, tokenizer) for e in examples]
    assert decode(encode(rendered)) == rendered
    assert decode(encode([])) == []
    for length in (8, 256):
        assert T.truncate(decode(encode(rendered)), length) == T.tokenize(
            examples, tokenizer, length
        )


def test_only_assistant_tokens_and_their_end_token_carry_labels(tokenizer, examples):
    first = examples[0]
    learned = [t for t in first.labels if t != T.IGNORE]
    assert tokenizer.decode(learned) == "1<|im_end|>"


@pytest.mark.slow  # about 10 s of the 135M model on the CPU: make test, not make test-fast
def test_a_resumed_run_matches_an_uninterrupted_one_exactly(base, examples, tmp_path):
    config = TrainConfig(
        method="lora",
        lora_rank=4,
        max_steps=4,
        batch_size=4,
        checkpoint_every=2,
        learning_rate=1e-3,
        max_seq_length=256,
    )
    losses: dict[str, list[float]] = {"whole": [], "resumed": []}
    model, whole = T.train(
        config,
        examples,
        [],
        base,
        device="cpu",
        work_dir=tmp_path / "whole",
        callbacks=T.Callbacks(on_progress=lambda p: losses["whole"].append(p.loss)),
    )
    base_again = model.unload()
    checkpoint = tmp_path / "whole" / "checkpoints" / "step-2"
    assert {p.name for p in checkpoint.iterdir()} == {
        "adapter_model.safetensors",
        "adapter_config.json",
        "optimizer.safetensors",
        "trainer_state.json",
    }
    model, resumed = T.train(
        config,
        examples,
        [],
        base_again,
        device="cpu",
        work_dir=tmp_path / "again",
        resume_from=checkpoint,
        callbacks=T.Callbacks(on_progress=lambda p: losses["resumed"].append(p.loss)),
    )
    model.unload()
    assert resumed.resumed_from_step == 2
    assert losses["resumed"] == losses["whole"][2:]


@pytest.mark.slow  # ~40 s of the 135M model on the CPU
def test_bf16_autocast_trains_to_the_loss_of_fp32_with_its_matmuls_in_bf16(
    base, tokenizer, tmp_path
):
    rows = [data.example_from_row(row, i + 1, None) for i, row in enumerate(date_rows(96))]
    tokenized, _ = T.tokenize(rows, tokenizer, 64)
    train_rows, held_out = tokenized[:80], tokenized[80:]
    outputs: dict[str, set] = {"fp32": set(), "bf16": set()}
    head = base.get_output_embeddings()
    losses = {}
    for precision in ("fp32", "bf16"):
        # A learning rate at which the loss falls smoothly over the 20 steps: at
        # LEARNS_THE_RULE's (15×) the rule is learned in a few steps, and two runs that differ
        # only in rounding end anywhere between 0.04 and 0.15.
        wanted = {**LEARNS_THE_RULE, "batch_size": 4, "max_steps": 20}
        wanted["learning_rate_multiplier"] = 0.25
        config = TrainConfig(**from_request({**wanted, "mixed_precision": precision}))

        def record(module, inputs, output, seen=outputs[precision]):
            # The decoder's projections and LoRA's A and B (their sums are fp32, and so are
            # the logits, by design: engine/train.py); not the held-out loss, read in fp32.
            if isinstance(module, torch.nn.Linear) and module.training and module is not head:
                seen.add(output.dtype)

        hook = torch.nn.modules.module.register_module_forward_hook(record)
        try:
            model, result = T.train(
                config, train_rows, held_out, base, device="cpu", work_dir=tmp_path / precision
            )
        finally:
            hook.remove()
        base = model.unload()
        assert result.precision == precision
        losses[precision] = result.validation_loss  # read in fp32 for both
    assert outputs == {"fp32": {torch.float32}, "bf16": {torch.bfloat16}}
    assert losses["fp32"] < 1.0, losses  # it learned: the base starts near 2
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=0.02), losses


@pytest.mark.slow  # two bf16 runs: a few s where bf16 is native, ~95 s where it is emulated
def test_a_bf16_run_trains_on_a_bf16_copy_of_the_frozen_weights_to_the_same_numbers(
    base, examples, tmp_path, monkeypatch
):
    """The copy only saves autocast its per-forward casts: the run's losses and adapter are
    the same without it, and the warm base is fp32 again after it, for its next job."""
    config = TrainConfig(
        method="lora", lora_rank=4, max_steps=2, batch_size=4, learning_rate=1e-3,
        max_seq_length=256, mixed_precision="bf16",
    )  # fmt: skip
    seen_dtypes: set = set()
    copy_made = T.FrozenWeightsInBf16

    def watched(model):
        frozen = copy_made(model)
        assert frozen.layers, "no LoRA base layer was copied"
        seen_dtypes.update(layer.weight.dtype for layer in frozen.layers)
        return frozen

    runs = {}
    for name, make_copy in (("copy", watched), ("autocast alone", lambda model: None)):
        monkeypatch.setattr(T, "FrozenWeightsInBf16", make_copy)
        losses: list[float] = []
        model, _ = T.train(
            config, examples, [], base, device="cpu", work_dir=tmp_path / name,
            callbacks=T.Callbacks(on_progress=lambda p, losses=losses: losses.append(p.loss)),
        )  # fmt: skip
        adapter = {k: v.clone() for k, v in model.state_dict().items() if "lora_" in k}
        base = model.unload()
        runs[name] = (losses, adapter)
        weights = {p.dtype for n, p in base.named_parameters() if n.endswith("proj.weight")}
        assert weights == {torch.float32}  # the base is handed back as it came
    assert seen_dtypes == {torch.float32}  # the originals, seen before the steps
    (copy_losses, copy_adapter), (plain_losses, plain_adapter) = runs.values()
    assert copy_losses == plain_losses
    for key, value in copy_adapter.items():
        torch.testing.assert_close(value, plain_adapter[key], rtol=0, atol=0)


@pytest.mark.slow  # ~20 s: two variants, two steps each, loaded back three ways
@pytest.mark.parametrize(
    "variant",
    [{"use_dora": True}, {"use_rslora": True, "target_modules": "attention"}],
    ids=["dora", "rslora-attention"],
)
def test_dora_and_rslora_adapters_train_and_load_back_in_plain_peft_and_the_inference_cache(
    variant, base, cache, examples, tmp_path
):
    config = TrainConfig(
        lora_rank=4, max_steps=2, batch_size=4, learning_rate=3e-3, max_seq_length=256, **variant
    )
    model, _ = T.train(config, examples, [], base, device="cpu", work_dir=tmp_path)
    folder = tmp_path / "adapter"
    T.save_adapter(model, folder)
    ids = torch.tensor([examples[3].input_ids])
    with torch.no_grad():
        trained = model.eval()(input_ids=ids).logits
    base = model.unload()
    with torch.no_grad():
        untouched = base(input_ids=ids).logits
    assert not torch.allclose(trained, untouched, atol=1e-3)  # the two steps changed something

    saved = LoraConfig.from_pretrained(str(folder))
    assert saved.use_dora is variant.get("use_dora", False)
    assert saved.use_rslora is variant.get("use_rslora", False)
    targets = {name.split(".")[-1] for name, _ in base.named_modules() if "self_attn." in name}
    if variant.get("target_modules") == "attention":
        assert set(saved.target_modules) <= targets or isinstance(saved.target_modules, str)
        assert not any("mlp" in key for key in load_file(folder / "adapter_model.safetensors"))

    plain = PeftModel.from_pretrained(base, str(folder))  # the standard way users load it
    with torch.no_grad():
        assert torch.allclose(plain.eval()(input_ids=ids).logits, trained, atol=1e-4)
    plain.unload()
    served = AdapterCache(lambda: load_base_model(SMOLLM2, cache, "none", "cpu"), capacity=1)
    with served.use("ftad-variant", lambda: folder) as model, torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, trained, atol=1e-4)


@pytest.mark.slow  # ~30 s: a few steps of batches of 4 short rows, a held-out pass after each
def test_early_stopping_stops_and_the_adapter_is_the_best_step_s(base, tokenizer, tmp_path):
    """Trained toward ISO dates, held out on the same kind of questions answered day first
    (31/12/1999): the held-out loss soon rises, so training stops ``patience`` measurements
    after its lowest point, and the adapter returned is that step's."""
    rows = date_rows(40)
    for row in rows[32:]:
        answer = row["messages"][2]
        answer["content"] = datetime.date.fromisoformat(answer["content"]).strftime("%d/%m/%Y")
    examples = [data.example_from_row(row, i + 1, None) for i, row in enumerate(rows)]
    tokenized, _ = T.tokenize(examples, tokenizer, 64)
    wanted = {**LEARNS_THE_RULE, "batch_size": 4, "max_steps": 12, "checkpoint_every": 1}
    config = TrainConfig(**from_request(wanted), eval_every=1, early_stopping_patience=2)
    measured: list[tuple[int, float]] = []
    model, result = T.train(
        config,
        tokenized[:32],
        tokenized[32:],
        base,
        device="cpu",
        work_dir=tmp_path,
        callbacks=T.Callbacks(on_validation=lambda step, loss, best: measured.append((step, loss))),
    )
    kept = {key: value.clone() for key, value in T.adapter_weights(model).items()}
    base = model.unload()
    best_step, best_loss = min(measured, key=lambda measurement: measurement[1])
    assert result.best_step == best_step and result.validation_loss == best_loss
    assert result.stopped_early_at == best_step + 2 < 12, measured
    assert [step for step, _ in measured] == list(range(1, best_step + 3))
    at_best = load_file(
        tmp_path / "checkpoints" / f"step-{best_step}" / "adapter_model.safetensors"
    )
    assert kept.keys() == at_best.keys()
    assert all(torch.equal(kept[key], at_best[key]) for key in kept)

    # Resumed from its last checkpoint, the run stays stopped and keeps the same adapter.
    last = tmp_path / "checkpoints" / f"step-{result.stopped_early_at}"
    model, again = T.train(
        config, tokenized[:32], tokenized[32:], base, device="cpu", work_dir=tmp_path / "again",
        resume_from=last,
    )  # fmt: skip
    assert (again.best_step, again.stopped_early_at) == (best_step, result.stopped_early_at)
    assert all(torch.equal(T.adapter_weights(model)[key], kept[key]) for key in kept)
    model.unload()


@pytest.mark.slow  # ~15 s: three steps twice
def test_gradient_checkpointing_recomputes_each_block_and_changes_no_loss(base, examples, tmp_path):
    losses: dict[bool, list[float]] = {}
    block_runs: dict[bool, int] = {}
    # A module inside the first block, its forward counted (module hooks do not fire when the
    # backward pass recomputes it).
    mlp = base.get_decoder().layers[0].mlp
    for checkpointing in (False, True):
        config = TrainConfig(
            lora_rank=4,
            max_steps=3,
            batch_size=4,
            learning_rate=1e-3,
            max_seq_length=256,
            mixed_precision="fp32",
            gradient_checkpointing=checkpointing,
        )
        runs, forward = [], mlp.forward
        mlp.forward = lambda *a, runs=runs, forward=forward, **kw: (
            runs.append(1) or forward(*a, **kw)
        )
        try:
            model, _ = T.train(
                config,
                examples,
                [],
                base,
                device="cpu",
                work_dir=tmp_path / str(checkpointing),
                callbacks=T.Callbacks(
                    on_progress=lambda p, key=checkpointing: losses.setdefault(key, []).append(
                        p.loss
                    )
                ),
            )
        finally:
            del mlp.forward  # the class's again
        base = model.unload()
        block_runs[checkpointing] = len(runs)
    assert block_runs[True] == 2 * block_runs[False]  # each forward again in the backward pass
    assert losses[True] == pytest.approx(losses[False], abs=1e-5)
    assert not base.is_activation_checkpointing  # the base goes back as it came


def test_auto_precision_is_bf16_where_the_hardware_computes_in_it():
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert resolve_precision("auto", "cpu") == ("bf16" if native else "fp32")
    assert resolve_precision("fp32", "cpu") == "fp32"
    assert TrainConfig(**as_stored({})).mixed_precision == "fp32"  # a job stored before it


@pytest.mark.slow  # seconds of the 135M model on the CPU: make test, not make test-fast
def test_a_cancel_request_stops_the_run_at_a_step_boundary(base, examples, tmp_path):
    config = TrainConfig(method="lora", lora_rank=4, max_steps=10, batch_size=2)
    steps = []
    with pytest.raises(T.TrainingCancelled):
        T.train(
            config,
            examples,
            [],
            base,
            device="cpu",
            work_dir=tmp_path,
            callbacks=T.Callbacks(
                on_progress=lambda p: steps.append(p.step), should_stop=lambda: len(steps) >= 2
            ),
        )
    assert steps == [1, 2]
    assert not any("lora" in name for name, _ in base.named_parameters())  # base handed back clean


@pytest.mark.parametrize(
    ("schedule", "expected"),
    [
        ("cosine", [0.5, 1.0, 0.854, 0.5, 0.146]),
        ("linear", [0.5, 1.0, 0.75, 0.5, 0.25]),
        ("constant", [0.5, 1.0, 1.0, 1.0, 1.0]),
    ],
)
def test_the_learning_rate_warms_up_then_follows_the_chosen_schedule(schedule, expected):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    config = TrainConfig(lr_scheduler=schedule, warmup_ratio=0.2)  # 2 of 10 steps
    scheduler = T.learning_rate_schedule(optimizer, config, steps=10)
    rates = {}
    for step in range(1, 9):
        optimizer.step()
        scheduler.step()
        rates[step] = scheduler.get_last_lr()[0]
    assert [round(rates[step], 3) for step in (1, 2, 4, 6, 8)] == expected


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("method", "full"),
        ("lr_scheduler", "cyclic"),
        ("lora_rank", 0),
        ("learning_rate", 0),
        ("batch_size", 0),
        ("max_seq_length", 8),
    ],
)
def test_a_bad_setting_is_refused_naming_its_field(field, value):
    with pytest.raises(ConfigError, match=field):
        TrainConfig(**{field: value})


def test_a_job_stored_before_a_hyperparameter_existed_keeps_what_it_ran_with():
    stored = asdict(TrainConfig())
    del stored["lr_scheduler"]  # as a job saved before the field was added
    assert public(stored)["lr_scheduler"] == "cosine"  # the schedule it trained with
    assert TrainConfig(**as_stored(stored)).lr_scheduler == "cosine"  # and resumes with
    assert public(asdict(TrainConfig()))["lr_scheduler"] == "linear"  # today's default
