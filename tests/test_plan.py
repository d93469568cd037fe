"""engine/plan.py: the "auto" rules and the pre-flight estimate, as pure functions."""

import pytest

from engine import plan
from engine.hyperparameters import METHODS, TrainConfig

SMOLLM2 = plan.ModelShape(134_515_008, 576, 30, 1536, 49152, True, 9)
CPU = plan.WorkerClass("cpu", memory_bytes=12 * plan.GIB, tokens_per_second_135m=150)


@pytest.mark.parametrize(
    ("rows", "epochs"), [(10, 10), (27, 3), (40, 3), (5_000, 3), (20_000, 1), (1, 25)]
)
def test_auto_epochs_follow_openais_rule(rows, epochs):
    assert plan.auto_epochs(rows) == epochs


def test_auto_batch_size_is_a_small_power_of_two():
    assert [plan.auto_batch_size(n) for n in (10, 1_000, 4_000, 100_000)] == [1, 2, 8, 32]


def test_auto_max_seq_length_covers_the_longest_row_unless_that_would_not_fit():
    assert plan.auto_max_seq_length(40, 8192) == 128
    assert plan.auto_max_seq_length(700, 8192) == 1024
    assert plan.auto_max_seq_length(100_000, 8192) == 8192
    assert plan.auto_max_seq_length(5_000, 8192, fits=lambda length: length <= 1024) == 1024


def estimate(shape=SMOLLM2, stats=None, training_examples=90, quantization="nf4", **overrides):
    settings = dict(
        method=METHODS[quantization],
        lora_rank=16,
        batch_size=8,
        max_seq_length=1024,
        packing=True,
        n_epochs=2,
        max_steps=None,
    )
    settings.update(overrides)
    stats = stats or plan.DataStats(rows=100, tokens=100 * 300, max_row_tokens=900)
    return plan.estimate(
        shape, stats, CPU, TrainConfig(**settings), training_examples=training_examples
    )


def test_the_estimate_counts_steps_tokens_and_time():
    result = estimate()
    assert result.steps == 12 * 2 and result.tokens_per_step == 8 * 300
    assert result.trained_tokens == 2 * 90 * 300  # the last step of an epoch is short
    rate = CPU.tokens_per_second(SMOLLM2.parameters)
    assert result.estimated_seconds == int(plan.STARTUP_SECONDS + 2 * 90 * 300 / rate)
    assert estimate(max_steps=5).steps == 5
    assert estimate(max_steps=5).trained_tokens == 5 * 8 * 300
    assert result.fits and result.suggestion is None


def test_memory_grows_with_what_goes_through_the_model_at_once():
    packed = estimate().estimated_peak_memory_bytes
    assert estimate(max_seq_length=2048).estimated_peak_memory_bytes > packed
    # Packed rows go one at a time: the batch size does not change the peak.
    assert estimate(batch_size=64).estimated_peak_memory_bytes == packed
    assert estimate(packing=False, batch_size=64).estimated_peak_memory_bytes > packed
    lora = estimate(quantization="none").memory_breakdown["weights"]
    assert lora > 3 * estimate().memory_breakdown["weights"]


def test_a_plan_that_does_not_fit_names_the_nearest_settings_that_do():
    padded = estimate(packing=False, batch_size=256)
    assert not padded.fits and padded.suggestion.startswith("Set packing to true")
    long_rows = estimate(max_seq_length=65536)
    assert not long_rows.fits and "Lower max_seq_length to" in long_rows.suggestion
    huge = estimate(
        plan.ModelShape.from_parameters(70_000_000_000),
        plan.DataStats(rows=10, tokens=1000, max_row_tokens=100),
        batch_size=1,
        max_seq_length=128,
        training_examples=10,
    )
    assert not huge.fits and "does not fit on cpu workers" in huge.suggestion


def test_auto_quantization_keeps_the_full_precision_base_while_it_leaves_room():
    row = plan.MicroBatch(1024, 1024)
    lora = plan.peak_memory(
        SMOLLM2, quantization="none", lora_rank=16, batch=row, bytes_per_activation=4
    )["total"]
    assert plan.auto_quantization(lora, CPU) == "none"
    crowded = plan.WorkerClass("small", int(lora / plan.LORA_MEMORY_SHARE) - 1, 150)
    assert plan.auto_quantization(lora, crowded) == "nf4"
    assert estimate(quantization="none").peak_memory_by_quantization["none"] == lora
    # The method is chosen for the length the data asks for, then the length is fitted to it.
    stats = plan.DataStats(rows=100, tokens=30_000, max_row_tokens=900)
    resolved = plan.resolve_auto(
        {}, stats, SMOLLM2, crowded, context_length=8192, has_validation_file=False
    )
    assert resolved["method"] == "qlora" and resolved["max_seq_length"] == 1024
    given = plan.resolve_auto(
        {"method": "lora"}, stats, SMOLLM2, crowded, context_length=8192, has_validation_file=False
    )
    assert given["method"] == "lora"


def test_gradient_checkpointing_is_turned_on_only_for_a_job_that_would_not_fit_without_it():
    stats = plan.DataStats(rows=100, tokens=100 * 6000, max_row_tokens=8000)
    kept = estimate(stats=stats, max_seq_length=8192)
    recomputed = estimate(stats=stats, max_seq_length=8192, gradient_checkpointing=True)
    assert recomputed.memory_breakdown["activations"] * 10 < kept.memory_breakdown["activations"]
    assert recomputed.memory_breakdown["weights"] == kept.memory_breakdown["weights"]
    # A worker between the two: without it the job would not fit; the plan says what would.
    between = plan.WorkerClass(
        "mid", (kept.estimated_peak_memory_bytes + recomputed.estimated_peak_memory_bytes) // 2, 150
    )
    resolved = plan.resolve_auto(
        {"method": "qlora"}, stats, SMOLLM2, between, context_length=8192, has_validation_file=True
    )
    assert resolved["gradient_checkpointing"] is True and resolved["max_seq_length"] == 8192
    small_rows = plan.DataStats(rows=100, tokens=30_000, max_row_tokens=900)
    assert not plan.resolve_auto(
        {"method": "qlora"},
        small_rows,
        SMOLLM2,
        between,
        context_length=8192,
        has_validation_file=True,
    )["gradient_checkpointing"]
    off = plan.estimate(
        SMOLLM2,
        stats,
        between,
        TrainConfig(method="qlora", max_seq_length=8192),
        training_examples=90,
    )
    assert not off.fits and off.suggestion.startswith("Set gradient_checkpointing to true")


def test_packed_forwards_grow_only_where_the_worker_keeps_its_room():
    config = TrainConfig(method="qlora", lora_rank=16, batch_size=8, max_seq_length=256)
    stats = plan.DataStats(rows=100, tokens=100 * 200, max_row_tokens=250)

    def peak(forward_tokens: int) -> int:
        return plan.peak_memory(
            SMOLLM2,
            quantization="nf4",
            lora_rank=16,
            batch=plan.MicroBatch(forward_tokens, 256),
            bytes_per_activation=4,
        )["total"]

    # 16 GiB: forwards of 2048 take 10.4 of them, less than LORA_MEMORY_SHARE (12 GiB would not).
    big = plan.WorkerClass("big", 16 * plan.GIB, 150)
    roomy = plan.estimate(SMOLLM2, stats, big, config, training_examples=90)
    assert roomy.forward_tokens == plan.FORWARD_TOKENS_WITH_ROOM == 2048
    assert roomy.estimated_peak_memory_bytes == peak(2048)  # the plan counts what runs
    # A worker where forwards of 2048 would take more than the share "auto" leaves LoRA.
    tight = plan.WorkerClass("tight", int(peak(2048) / plan.LORA_MEMORY_SHARE) - 1, 150)
    assert plan.estimate(SMOLLM2, stats, CPU, config, training_examples=90).forward_tokens == 1024
    kept = plan.estimate(SMOLLM2, stats, tight, config, training_examples=90)
    assert kept.forward_tokens == plan.FORWARD_TOKENS and kept.fits
    assert kept.estimated_peak_memory_bytes == peak(1024)
    # Rows longer than either: one row a forward.
    long_rows = TrainConfig(method="qlora", batch_size=8, max_seq_length=4096)
    long_plan = plan.estimate(SMOLLM2, stats, CPU, long_rows, training_examples=90)
    assert long_plan.forward_tokens == 4096


def test_a_dpo_plan_counts_both_answers_of_a_pair_and_the_reference_pass():
    """A pair's tokens (the file's report counts both answers' rows) are trained whole, in one
    row of up to twice max_seq_length, after one forward pass over every pair (the reference)."""
    pairs = plan.DataStats(rows=100, tokens=100 * 600, max_row_tokens=1800)
    supervised = estimate(stats=pairs, max_seq_length=512)
    dpo = estimate(stats=pairs, max_seq_length=512, objective="dpo")
    assert supervised.trained_tokens == 2 * 90 * 512  # one sequence, cut to max_seq_length
    assert dpo.trained_tokens == 2 * 90 * 600
    rate = CPU.tokens_per_second(SMOLLM2.parameters)
    reference = 90 * 600 / rate / 3
    assert dpo.estimated_seconds == int(plan.STARTUP_SECONDS + 2 * 90 * 600 / rate + reference)
    assert dpo.estimated_peak_memory_bytes >= supervised.estimated_peak_memory_bytes
    assert estimate(stats=pairs, max_seq_length=1024, objective="dpo").forward_tokens >= 1024
