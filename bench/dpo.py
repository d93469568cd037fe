"""DPO throughput: Loft's engine against TRL's DPOTrainer, on the same preference pairs.

    .venv/bin/python bench/dpo.py            # 12 steps × 8 pairs (an epoch), 2 repeats
    .venv/bin/python bench/dpo.py --quick    # a smoke run: 3 steps, 1 repeat

The contenders, each run in a child process of its own (so peak RSS is its own), interleaved
over ``--repeats`` rounds (A B A B …) so that a slow spell of the machine hits both:

- ``loft-dpo``: the engine (engine.train.train with objective "dpo"): the reference
  log-probabilities computed once, before the first step (the base: a fresh adapter is zero),
  both sides of each pair packed whole into rows without padding, per-sequence sums from a
  chunked head at the answer positions only. It is given no held-out pairs, since TRL is given
  no eval set: neither measures anything during or after training.
- ``trl-dpo``: TRL's DPOTrainer with a peft ``LoraConfig`` on the same base, which it wraps
  itself; its reference is the same model with the adapter disabled. TRL's defaults otherwise:
  ``precompute_ref_log_probs=False`` (a no-grad reference forward of each batch at every step),
  the sigmoid loss, ``padding_free=False`` (TRL 1.16 turns padding-free off for DPO anyway: each
  batch's 2 × 8 sequences padded to its longest), its fused, chunked log-prob head,
  ``disable_dropout``. It tokenizes the conversational pairs itself with the same chat
  template. Activation (gradient) checkpointing, which TRL turns on by default, is turned off,
  as Loft runs without it (as bench/train.py does for every contender). The dataset is fed in
  Loft's step order (``train_sampling_strategy="sequential"``), so each step sees the same
  pairs in both. No reporting, no saving, no eval; each step's loss logged (to set beside Loft's);
  ``use_cpu`` on a CPU. Skipped,
  with a note, without trl or datasets (``pip install -e .[bench]``).

Both train the bundled SmolLM2-135M-Instruct with the same LoRA (r 16, alpha 32, dropout 0, all
linear layers, the same initial weights from the same seed), beta 0.1, AdamW, lr 2e-4 linear
without warmup, clipping at 1.0, ``--steps`` steps of 8 pairs, max length 256 per sequence
(no pair here reaches it), and the same precision: Loft's ``mixed_precision`` "auto" (bf16
autocast where the CPU computes in bf16, else fp32; ``--precision`` overrides it), passed to
TRL as ``bf16=``.

The data, generated here and the same in every process: additions. A question "What is a plus
b?" (a third of the rows) has the preferred answer "a plus b equals c." and the non-preferred
"a plus b is c."; the others ask "… Show your steps." and both answers go on with 2 to 12
sentences that add b in parts ("37 plus 5 equals 42."), "equals" in every sentence of the
preferred answer and "is" in the non-preferred one. So the preference is one of style, the same
in every pair, and the pairs' lengths vary from ~10 to ~150 answer tokens, so padding matters.
``--pairs`` training pairs (96), 32 held-out pairs from the same generator, never trained on.

Printed per contender (the median over the repeats):

- train s: seconds from calling train (Loft: engine.train.train; TRL: trainer.train) to the end
  of the last optimizer step: setup of the run and Loft's reference pass included, model
  loading (the same for both) and TRL's tokenizing in its constructor left out (see setup s)
- pairs/s: the run's pairs (steps × 8) ÷ train s, the figure the target compares
- steady pairs/s: pairs per second over steps 2..N (Loft's reference pass is before step 1)
- setup s: Loft's tokenizing of the pairs; TRL: building the DPOTrainer (its peft wrap and its
  own tokenizing)
- held-out accuracy: share of the held-out pairs whose preferred answer the trained model gives
  the higher summed answer log-probability; reward accuracy: share where the trained model's
  margin over the base's grew (log π(c) − log ref(c) > log π(r) − log ref(r)); held-out DPO loss
  from the same numbers. All three from engine.train.pair_logps on each trained peft model, in
  fp32, the base being the same model with the adapter disabled: the same measurement for both.
- peak RSS of the child process (its whole life: loading, training, measuring)

then the median over the repeats of Loft's pairs/s ÷ TRL's in the same repeat. Targets: ≥ 1.3×
TRL (Loft's SFT target against TRL, bench/train.py), and Loft's held-out preference accuracy no
more than one pair (1/32) below TRL's (checked at ``--steps`` ≥ 12 only: a shorter run has not
learned enough to compare). Exits 0 when they are met, 1 when not (or TRL is missing). Then
each step's training loss in both (repeat 1): the same pairs in the same order from the same
initial adapter, so they should agree (step 1: log 2 = 0.6931, the adapter being zero). In fp32
they do, to 1e-4 (bench/results/dpo-2026-12-07-3aeabf3-quick-fp32.txt). In bf16 they part:
TRL's autocast adds each LoRA update to its layer's output in bf16, which rounds a small
update away (engine/train.py keep_adapter_sums_in_fp32), so its losses fall more slowly; and
Loft's step 1 is not exactly log 2, its reference pass having packed the pairs into other rows
than the step does, which changes bf16 sums by up to ~0.7 nats a sequence.

``--quick`` (3 steps, 1 repeat) is a smoke run, not a comparison: Loft's reference pass still
covers all the training pairs (the engine computes it for every one) while only 24 are trained.

Unless ``--no-save``, the figures go to bench/results/dpo-<date>-<commit>.json (``-quick``
with ``--quick``, ``-fp32`` or ``-bf16`` with ``--precision``) and the printed report to a
.txt beside it: the machine, the versions, the date, the arguments, every run's figures, the
medians, the ratio and the targets.

The default run (12 steps × 8 pairs, 2 repeats of 2 contenders) takes about 15 min on a 2-core
Xeon CPU with AMX (bf16: Loft ~2.5 min a run, TRL ~4.5), ``--quick`` about 3.5 min; run it on an
otherwise idle machine: a second busy process on 2 cores halves the figures, unevenly.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_DIR))

# The host's figures and the report's helpers, as bench/train.py takes them.
from bench.train import (  # noqa: E402
    children_cpu_seconds,
    git_commit,
    host_busy_seconds,
    machine,
    median_of,
    trl_available,
    versions,
)
from engine import data, train  # noqa: E402
from engine import plan as planning  # noqa: E402
from engine.base_models import (  # noqa: E402
    load_base_model,
    load_tokenizer,
    model_folder,
    resolve_precision,
    training_device,
)
from engine.hyperparameters import DPO, TrainConfig  # noqa: E402
from engine.model_cache import BUNDLED_BASE_MODEL, BaseModelSpec  # noqa: E402

SPEC = BaseModelSpec(
    BUNDLED_BASE_MODEL["name"],
    BUNDLED_BASE_MODEL["source"],
    BUNDLED_BASE_MODEL["revision"],
    BUNDLED_BASE_MODEL["context_length"],
)
RESULTS_DIR = PROJECT_DIR / "bench" / "results"
LOFT = "loft-dpo"
TRL = "trl-dpo"
CONTENDERS = (LOFT, TRL)  # the order of each repeat
NAMES = {LOFT: "Loft engine (DPO)", TRL: "TRL DPOTrainer"}
HELD_OUT_PAIRS = 32
BATCH_PAIRS = 8
MAX_LENGTH = 256
BETA = 0.1
QUICK_STEPS = 3
TARGET_RATIO = 1.3  # Loft's pairs/s over TRL's, at least (the median of the repeats' ratios)
TARGET_ACCURACY_GAP = 1 / HELD_OUT_PAIRS  # Loft's held-out accuracy at most one pair below TRL's
ACCURACY_TARGET_MIN_STEPS = 12
CONTENDED_CORES = 0.25  # other processes' average CPU use during a run that skews its figures


def cache_dir() -> Path:
    return Path(os.environ.get("LOFT_HOME", ".loft")) / "models"


# --- the data --------------------------------------------------------------------------------


def addition_pair(rng: random.Random) -> dict:
    """One preference row: an addition, answered with "equals" (preferred) or "is", plain or
    with 2-12 sentences that add the second number in parts."""
    a = rng.randint(2, 99)
    if rng.random() < 1 / 3:
        b, parts = rng.randint(2, 99), []
        question = f"What is {a} plus {b}?"
    else:
        b = rng.randint(13, 99)
        count = rng.randint(2, 12)
        cuts = sorted(rng.sample(range(1, b), count - 1))
        parts = [end - start for start, end in zip([0, *cuts], [*cuts, b], strict=True)]
        question = f"What is {a} plus {b}? Show your steps."

    def answer(verb: str) -> str:
        sentences = [f"{a} plus {b} {verb} {a + b}."]
        total = a
        for part in parts:
            sentences.append(f"{total} plus {part} {verb} {total + part}.")
            total += part
        return " ".join(sentences)

    return {
        "input": {"messages": [{"role": "user", "content": question}]},
        "preferred_output": [{"role": "assistant", "content": answer("equals")}],
        "non_preferred_output": [{"role": "assistant", "content": answer("is")}],
    }


def preference_rows(count: int) -> list[dict]:
    rng = random.Random(0)
    return [addition_pair(rng) for _ in range(count)]


@dataclass
class Prepared:
    tokenizer: object
    rows: list[dict]  # the generated rows, training pairs first, then the held-out ones
    train_pairs: list[train.Tokenized]
    held_out: list[train.Tokenized]
    tokenize_s: float


def prepare(args) -> Prepared:
    """The tokenizer and the (train, held-out) pairs, tokenized as a job's are; the same in
    every process."""
    tokenizer = load_tokenizer(SPEC, cache_dir())
    rows = preference_rows(args.pairs + HELD_OUT_PAIRS)
    started = time.monotonic()
    jsonl = ("\n".join(json.dumps(row) for row in rows) + "\n").encode()
    _, items = data.open_dataset(data.chunks_of(jsonl), filename="bench.jsonl")
    examples = []
    for item in items:
        if isinstance(item, data.RowError):
            raise SystemExit(f"generated data is invalid: {item}")
        examples.append(item)
    pairs, dropped = train.tokenize(examples, tokenizer, MAX_LENGTH, pairs=True)
    if dropped or len(pairs) != len(rows):
        raise SystemExit(f"{dropped} generated pairs lost every trained token to truncation")
    tokenize_s = time.monotonic() - started
    return Prepared(tokenizer, rows, pairs[: args.pairs], pairs[args.pairs :], tokenize_s)


def config_for(args) -> TrainConfig:
    return TrainConfig(
        method="lora",
        objective=DPO,
        beta=BETA,
        lora_rank=16,
        lora_alpha=32,
        lora_dropout=0.0,
        target_modules="all-linear",
        learning_rate=2e-4,
        lr_scheduler="linear",
        warmup_ratio=0.0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        max_steps=args.steps,
        batch_size=BATCH_PAIRS,
        max_seq_length=MAX_LENGTH,
        packing=True,
        mixed_precision=args.precision,
        seed=42,
        checkpoint_every=10_000,
    )


def step_order(prepared: Prepared, config: TrainConfig) -> list[int]:
    """The training pairs (positions in prepared.train_pairs) of the run, step after step."""
    positions = list(range(len(prepared.train_pairs)))
    return [
        i
        for step in range(config.max_steps)
        for i in train.examples_for_step(positions, config, step)
    ]


def planned_forward_tokens(prepared: Prepared, config: TrainConfig) -> int:
    """The size of a packed forward the plan gives such a job on Loft's default worker class
    (loft/settings.py: a CPU worker of 12 GiB), as the worker passes it to train.train."""
    pairs = prepared.train_pairs + prepared.held_out
    stats = planning.DataStats.of_lengths([pair.length for pair in pairs])
    shape = planning.ModelShape(
        parameters=BUNDLED_BASE_MODEL["parameters"], **BUNDLED_BASE_MODEL["architecture"]
    )
    worker = planning.WorkerClass("cpu", 12 * planning.GIB, tokens_per_second_135m=150)
    return planning.forward_tokens(shape, stats, worker, config)


# --- what both runs measure the same way -----------------------------------------------------


def held_out_figures(model, held_out: list[train.Tokenized], device: str) -> dict:
    """Preference and reward accuracy and DPO loss on the held-out pairs, from Loft's
    pair_logps on the trained peft model, and with its adapter disabled (the base)."""
    trained = train.pair_logps(model, held_out, MAX_LENGTH, device)
    with model.disable_adapter():
        base = train.pair_logps(model, held_out, MAX_LENGTH, device)
    margins = [
        (c - rc) - (r - rr) for (c, r), (rc, rr) in zip(trained, base, strict=True)
    ]  # the implicit reward margin over beta
    n = len(held_out)
    return {
        "held_out_accuracy": sum(c > r for c, r in trained) / n,
        "reward_accuracy": sum(m > 0 for m in margins) / n,
        "held_out_dpo_loss": sum(softplus(-BETA * m) for m in margins) / n,
        "base_accuracy": sum(rc > rr for rc, rr in base) / n,
    }


def softplus(x: float) -> float:
    """-log sigmoid(-x), without overflow: a pair's DPO loss is softplus(-beta × margin)."""
    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))


def peak_memory(device: str) -> dict:
    import torch

    figures = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device.startswith("cuda"):
        figures["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return figures


def rates(pairs: int, per_step: int, started: float, step_ends: list[float]) -> dict:
    train_s = step_ends[-1] - started
    steady = (len(step_ends) - 1) * per_step / (step_ends[-1] - step_ends[0])
    return {
        "train_s": train_s,
        "pairs_per_s": pairs / train_s,
        "steady_pairs_per_s": steady,
        "first_step_s": step_ends[0] - started,
        "steps": len(step_ends),
    }


# --- the contenders, each in a child process -------------------------------------------------


def run_loft(args) -> dict:
    import torch

    prepared = prepare(args)
    config = config_for(args)
    device = training_device()
    sync = torch.cuda.synchronize if device.startswith("cuda") else lambda: None
    order = step_order(prepared, config)

    loading = time.monotonic()
    base = load_base_model(SPEC, cache_dir(), config.quantization, device)
    load_s = time.monotonic() - loading
    tokens_per_forward = planned_forward_tokens(prepared, config)
    step_ends: list[float] = []
    step_losses: list[float] = []

    def on_progress(progress: train.Progress) -> None:
        sync()
        step_ends.append(time.monotonic())
        step_losses.append(progress.loss)

    reference_done: list[float] = []
    started = time.monotonic()
    model, result = train.train(
        config,
        prepared.train_pairs,
        [],  # nothing measured during or after training, as in the TRL run
        base,
        device=device,
        work_dir=Path(args.result).parent / "loft",  # the parent removes it afterwards
        callbacks=train.Callbacks(
            on_progress=on_progress,
            on_loop_start=lambda: reference_done.append(time.monotonic()),
        ),
        pad_id=prepared.tokenizer.pad_token_id or 0,
        tokens_per_forward=tokens_per_forward,
    )
    figures = rates(len(order), config.batch_size, started, step_ends)
    figures["train_s"] = result.last_step_ended - started  # the last step, not its checkpoint
    figures["pairs_per_s"] = len(order) / figures["train_s"]
    return {
        **figures,
        "reference_pass_s": reference_done[0] - started,
        "setup_s": prepared.tokenize_s,
        "load_s": load_s,
        "step_losses": step_losses,
        "trained_tokens": result.trained_tokens,
        "processed_tokens": result.processed_tokens,
        "packing_efficiency": result.packing_efficiency,
        "tokens_per_forward": tokens_per_forward,
        "precision": result.precision,
        **held_out_figures(model, prepared.held_out, device),
        **peak_memory(device),
    }


def run_trl(args) -> dict:
    import datasets
    import torch
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    datasets.disable_progress_bars()
    prepared = prepare(args)
    config = config_for(args)
    device = training_device()
    precision = resolve_precision(config.mixed_precision, device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else lambda: None
    order = step_order(prepared, config)
    step_ends: list[float] = []

    class StepEnds(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            sync()
            step_ends.append(time.monotonic())

    loading = time.monotonic()
    base = load_base_model(SPEC, cache_dir(), "none", device)
    load_s = time.monotonic() - loading

    def chat(row: dict) -> dict:
        return {
            "prompt": row["input"]["messages"],
            "chosen": row["preferred_output"],
            "rejected": row["non_preferred_output"],
        }

    dataset = datasets.Dataset.from_list([chat(prepared.rows[i]) for i in order])
    batches: list[list[list[int]]] = []  # each batch's prompts, to check the order it got

    building = time.monotonic()
    trainer = DPOTrainer(
        model=base,  # DPOTrainer seeds (args.seed) before wrapping it: the engine's LoRA init
        args=DPOConfig(
            output_dir=str(Path(args.result).parent / "trl"),
            max_steps=config.max_steps,
            per_device_train_batch_size=config.batch_size,
            gradient_accumulation_steps=1,
            learning_rate=config.learning_rate,
            lr_scheduler_type=config.lr_scheduler,
            warmup_steps=0,
            weight_decay=config.weight_decay,
            max_grad_norm=config.max_grad_norm,
            optim="adamw_torch",
            seed=config.seed,
            bf16=precision == "bf16",
            activation_checkpointing=False,  # TRL's default is on; Loft's run has none
            beta=config.beta,
            max_length=config.max_seq_length,
            train_sampling_strategy="sequential",  # the dataset is in Loft's step order
            save_strategy="no",
            eval_strategy="no",
            logging_strategy="steps",  # each step's loss, to set beside Loft's
            logging_steps=1,
            report_to=[],
            disable_tqdm=True,
            dataloader_num_workers=0,
            use_cpu=device == "cpu",
        ),
        train_dataset=dataset,
        processing_class=prepared.tokenizer,
        peft_config=LoraConfig(
            r=config.lora_rank,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules=train.peft_target_modules(config.target_modules),
            task_type="CAUSAL_LM",
        ),
        callbacks=[StepEnds()],
    )
    setup_s = time.monotonic() - building
    collate = trainer.data_collator

    def collate_noting_order(features: list[dict]) -> dict:
        batches.append([feature["prompt_ids"] for feature in features])
        return collate(features)

    trainer.data_collator = collate_noting_order

    started = time.monotonic()
    trainer.train()
    figures = rates(len(order), config.batch_size, started, step_ends)
    model = trainer.model
    theirs = trainer.train_dataset
    expected = [theirs[n]["prompt_ids"] for n in range(len(theirs))]
    got = [prompt for batch in batches[: len(step_ends)] for prompt in batch]
    return {
        **figures,
        "setup_s": setup_s,
        "load_s": load_s,
        "precision": precision,
        "in_order": got == expected[: len(got)] and len(got) == len(order),
        "step_losses": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
        **token_agreement(prepared, order, theirs),
        **held_out_figures(model, prepared.held_out, device),
        **peak_memory(device),
    }


def token_agreement(prepared: Prepared, order: list[int], theirs) -> dict:
    """How TRL's tokens of each sequence compare with Loft's: how many have the same ids, and
    how many more of them TRL trains (its answer runs to the end: the newline after the
    end-of-turn token too, which Loft does not train)."""
    same, more = 0, []
    for n, i in enumerate(order):
        pair, row = prepared.train_pairs[i], theirs[n]
        for ours, answer in ((pair, row["chosen_ids"]), (pair.rejected, row["rejected_ids"])):
            same += row["prompt_ids"] + answer == ours.input_ids
            more.append(len(answer) - ours.trained_tokens)
    return {
        "trl_sides": len(more),
        "trl_same_ids": same,
        "trl_more_trained_min": min(more),
        "trl_more_trained_max": max(more),
    }


def child(side: str, args) -> int:
    figures = run_loft(args) if side == LOFT else run_trl(args)
    Path(args.result).write_text(json.dumps(figures))
    return 0


def spawn(side: str, args, work: Path, run: int) -> dict:
    """Run one contender in a fresh interpreter, offline; its figures come back as JSON."""
    result, log = work / f"{side}-{run}.json", work / f"{side}-{run}.log"
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--side",
        side,
        "--result",
        str(result),
        "--steps",
        str(args.steps),
        "--pairs",
        str(args.pairs),
        "--precision",
        args.precision,
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    started, busy_before = time.monotonic(), host_busy_seconds()
    children_before = children_cpu_seconds()
    with open(log, "wb") as output:
        finished = subprocess.run(command, cwd=PROJECT_DIR, stdout=output, stderr=output, env=env)
    if finished.returncode != 0 or not result.exists():
        tail = log.read_text(errors="replace")[-4000:]
        raise SystemExit(f"the {side} run failed (exit {finished.returncode}):\n{tail}")
    figures = json.loads(result.read_text())
    figures["wall_s"] = time.monotonic() - started
    if busy_before is not None:
        others = host_busy_seconds() - busy_before - (children_cpu_seconds() - children_before)
        figures["other_cores"] = max(0.0, others / figures["wall_s"])
    return figures


# --- the report ------------------------------------------------------------------------------


# Each run's figures, of which the medians over the repeats are shown and saved.
FIGURES = (
    "train_s",
    "pairs_per_s",
    "steady_pairs_per_s",
    "setup_s",
    "held_out_accuracy",
    "reward_accuracy",
    "held_out_dpo_loss",
    "base_accuracy",
    "peak_rss_mb",
    "peak_gpu_mb",
)


def medians(runs: list[dict]) -> dict:
    return {key: median_of(runs, key) for key in FIGURES}


def table_row(name: str, runs: list[dict], gpu: bool) -> str:
    m = medians(runs)
    row = (
        f"{name:<20}{m['train_s']:>9.1f}{m['pairs_per_s']:>9.2f}{m['steady_pairs_per_s']:>9.2f}"
        f"{m['setup_s']:>8.2f}{m['held_out_accuracy']:>10.3f}{m['reward_accuracy']:>9.3f}"
        f"{m['held_out_dpo_loss']:>10.4f}{m['peak_rss_mb']:>9.0f}"
    )
    return row + (f"{m['peak_gpu_mb']:>9.0f}" if gpu else "")


def results_path(commit: str, args) -> Path:
    stem = f"dpo-{datetime.date.today().isoformat()}-{commit}"
    stem += ("-quick" if args.quick else "") + (
        f"-{args.precision}" if args.precision != "auto" else ""
    )
    path, n = RESULTS_DIR / f"{stem}.json", 2
    while path.exists() or path.with_suffix(".txt").exists():
        path, n = RESULTS_DIR / f"{stem}-{n}.json", n + 1
    return path


class Report:
    """What main prints, kept for the .txt beside the JSON."""

    def __init__(self):
        self.lines: list[str] = []

    def __call__(self, line: str = "") -> None:
        print(line, flush=True)
        self.lines.append(line)

    @property
    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--steps", type=int, default=12, help="optimizer steps of 8 pairs per run (12: an epoch)"
    )
    parser.add_argument("--pairs", type=int, default=96, help="generated training pairs")
    parser.add_argument(
        "--repeats", type=int, default=2, help="rounds of the contenders, interleaved"
    )
    parser.add_argument(
        "--quick", action="store_true", help=f"a smoke run: {QUICK_STEPS} steps, 1 repeat"
    )
    parser.add_argument(
        "--precision",
        choices=("auto", "bf16", "fp32"),
        default="auto",
        help="Loft's mixed_precision; TRL gets what it resolves to",
    )
    parser.add_argument(
        "--no-save", action="store_true", help="do not write bench/results/dpo-*.json and .txt"
    )
    parser.add_argument("--side", choices=CONTENDERS, help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.steps, args.repeats = QUICK_STEPS, 1
    if args.steps < 2:
        parser.error("--steps must be at least 2: steady pairs/s is measured over steps 2..N")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.pairs < BATCH_PAIRS or args.pairs % BATCH_PAIRS:
        parser.error(f"--pairs must be a multiple of {BATCH_PAIRS}: every step a whole batch")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.side:
        return child(args.side, args)

    started = time.monotonic()
    say = Report()
    device = training_device()
    precision = resolve_precision(args.precision, device)
    # Convert the bundled GGUF once here, so no run includes it.
    model_folder(SPEC, cache_dir())
    prepared = prepare(args)
    contenders = list(CONTENDERS)
    if not trl_available():
        contenders.remove(TRL)
        say("note:   trl or datasets is not installed: TRL DPOTrainer is skipped")
        say("        (pip install -e .[bench] installs them)")
    described, found = machine(device), versions()
    commit, dirty = git_commit()
    where = described.get("gpu", described["cpu"])
    answers = sorted(
        side.trained_tokens
        for pair in prepared.train_pairs + prepared.held_out
        for side in pair.sides()
    )
    lengths = sorted(
        len(side.input_ids)
        for pair in prepared.train_pairs + prepared.held_out
        for side in pair.sides()
    )
    say(
        f"date:     {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}, "
        f"commit {commit}{' (work tree differs)' if dirty else ''}"
    )
    say(
        f"machine:  {where}, {described['cores']} cores, torch on {device} "
        f"({described['torch_threads']} threads)"
    )
    say(
        "versions: "
        + ", ".join(f"{name} {found[name]}" for name in ("torch", "transformers", "peft", "trl"))
    )
    say(
        f"data:     {len(prepared.train_pairs)} training and {len(prepared.held_out)} held-out "
        f"addition pairs (preferred 'equals', non-preferred 'is'); sequences {lengths[0]}–"
        f"{lengths[-1]} tokens (median {statistics.median(lengths):.0f}), answers "
        f"{answers[0]}–{answers[-1]} trained tokens"
    )
    say(
        f"run:      {args.steps} steps × {BATCH_PAIRS} pairs, LoRA r=16 alpha=32 all-linear "
        f"dropout 0, lr 2e-4 linear, AdamW, beta {BETA}, max length {MAX_LENGTH}, {precision}; "
        f"{SPEC.name}"
    )
    say(f"order:    {args.repeats} × ({' '.join(contenders)}), each in a process of its own")
    say()

    runs: dict[str, list[dict]] = {name: [] for name in contenders}
    work = Path(tempfile.mkdtemp(prefix="loft-bench-dpo-"))
    try:
        for repeat in range(args.repeats):
            for name in contenders:
                figures = spawn(name, args, work, repeat)
                runs[name].append(figures)
                say(
                    f"repeat {repeat + 1}/{args.repeats}  {name:<8}"
                    f"{figures['pairs_per_s']:>7.2f} pairs/s  train {figures['train_s']:6.1f} s  "
                    f"held-out acc {figures['held_out_accuracy']:.3f}  "
                    f"reward acc {figures['reward_accuracy']:.3f}  {figures['wall_s']:.0f} s"
                )
    finally:
        shutil.rmtree(work, ignore_errors=True)

    gpu = device.startswith("cuda")
    say()
    say(f"medians over {args.repeats} repeat(s):")
    header = (
        f"{'':<20}{'train s':>9}{'pairs/s':>9}{'steady':>9}{'setup s':>8}{'held-out':>10}"
        f"{'reward':>9}{'DPO loss':>10}{'RSS MB':>9}"
    )
    say(header + (f"{'GPU MB':>9}" if gpu else ""))
    for name in contenders:
        say(table_row(NAMES[name], runs[name], gpu))
    loft = runs[LOFT]
    say(
        f"(held-out: preference accuracy; reward: reward accuracy against the base; the base's "
        f"own preference accuracy {median_of(loft, 'base_accuracy'):.3f})"
    )
    say(
        f"Loft: reference pass {median_of(loft, 'reference_pass_s'):.1f} s of its train s, "
        f"packing efficiency {median_of(loft, 'packing_efficiency'):.3f}, forwards of "
        f"{loft[0]['tokens_per_forward']} tokens"
    )
    say()

    targets: dict[str, dict] = {}
    ratio = None
    accuracy_gap = None
    if TRL in runs:
        theirs = runs[TRL]
        per_repeat = [
            mine["pairs_per_s"] / other["pairs_per_s"]
            for mine, other in zip(loft, theirs, strict=True)
        ]
        ratio = {"per_repeat": per_repeat, "median": statistics.median(per_repeat)}
        say(
            f"Loft / TRL pairs/s: {ratio['median']:.2f}  target >= {TARGET_RATIO}  "
            f"(per repeat: {', '.join(f'{r:.2f}' for r in per_repeat)})"
        )
        steady = statistics.median(
            mine["steady_pairs_per_s"] / other["steady_pairs_per_s"]
            for mine, other in zip(loft, theirs, strict=True)
        )
        say(f"Loft / TRL steady pairs/s (steps 2..N): {steady:.2f}  (no target)")
        accuracy_gap = statistics.median(
            mine["held_out_accuracy"] - other["held_out_accuracy"]
            for mine, other in zip(loft, theirs, strict=True)
        )
        checked = args.steps >= ACCURACY_TARGET_MIN_STEPS
        say(
            f"held-out accuracy, Loft − TRL: {accuracy_gap:+.3f}  "
            f"target >= {-TARGET_ACCURACY_GAP:.3f}"
            + ("" if checked else f"  (not checked below {ACCURACY_TARGET_MIN_STEPS} steps)")
        )
        targets["ratio_vs_trl"] = {
            "target": TARGET_RATIO,
            "value": ratio["median"],
            "met": ratio["median"] >= TARGET_RATIO,
        }
        targets["held_out_accuracy_vs_trl"] = {
            "target": -TARGET_ACCURACY_GAP,
            "value": accuracy_gap,
            "met": (accuracy_gap >= -TARGET_ACCURACY_GAP) if checked else None,
        }
        first = theirs[0]
        if first["trl_same_ids"] != first["trl_sides"]:
            say(
                f"warning: TRL tokenized {first['trl_sides'] - first['trl_same_ids']} of "
                f"{first['trl_sides']} sequences differently from Loft"
            )
        more = (first["trl_more_trained_min"], first["trl_more_trained_max"])
        say(
            f"TRL's token ids: Loft's in {first['trl_same_ids']} of {first['trl_sides']} "
            f"sequences; TRL trains {more[0]}"
            + (f" to {more[1]}" if more[1] != more[0] else "")
            + " more token(s) of each (the newline after <|im_end|>, which Loft leaves out)"
        )
        say("training loss of each step, Loft | TRL (repeat 1):")
        for start in range(0, len(loft[0]["step_losses"]), 6):
            say(
                "  "
                + "  ".join(
                    f"{step + 1:>2}: {mine:.4f} | {other:.4f}"
                    for step, (mine, other) in enumerate(
                        zip(loft[0]["step_losses"], theirs[0]["step_losses"], strict=True)
                    )
                    if start <= step < start + 6
                )
            )
        if not all(run["in_order"] for run in theirs):
            say("warning: TRL's batches did not come in Loft's step order")
    every = [figures for name in contenders for figures in runs[name]]
    say(
        f"wall time: {time.monotonic() - started:.0f} s ("
        + ", ".join(f"{name} {sum(r['wall_s'] for r in runs[name]):.0f} s" for name in contenders)
        + ")"
    )
    if all("other_cores" in figures for figures in every):
        busiest = max(figures["other_cores"] for figures in every)
        say(f"cores used by other processes meanwhile: at most {busiest:.2f}")
        if busiest > CONTENDED_CORES:
            say("warning: other processes competed for the CPU; run again on a quiet machine")

    checkable = [t["met"] for t in targets.values() if t["met"] is not None]
    ok = TRL in runs and all(checkable)
    if TRL not in runs:
        say("targets NOT met: they cannot be checked without trl")
    else:
        say("targets met" if ok else "targets NOT met")

    if not args.no_save:
        path = results_path(commit, args)
        record = {
            "bench": "dpo",
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "commit": commit,
            "work_tree_dirty": dirty,
            "machine": described,
            "versions": found,
            "args": {
                key: getattr(args, key)
                for key in ("steps", "pairs", "repeats", "precision", "quick")
            },
            "precision": precision,
            "settings": {
                "batch_pairs": BATCH_PAIRS,
                "max_length": MAX_LENGTH,
                "beta": BETA,
                "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "targets": "all-linear"},
                "learning_rate": 2e-4,
                "lr_scheduler": "linear",
                "trl": {
                    "precompute_ref_log_probs": False,
                    "padding_free": False,
                    "activation_checkpointing": False,
                    "loss_type": ["sigmoid"],
                    "train_sampling_strategy": "sequential",
                },
            },
            "data": {
                "train_pairs": len(prepared.train_pairs),
                "held_out_pairs": len(prepared.held_out),
                "sequence_tokens_min": lengths[0],
                "sequence_tokens_median": statistics.median(lengths),
                "sequence_tokens_max": lengths[-1],
                "answer_tokens_min": answers[0],
                "answer_tokens_max": answers[-1],
            },
            "order": [name for _ in range(args.repeats) for name in contenders],
            "runs": runs,
            "medians": {name: medians(runs[name]) for name in contenders},
            "ratio_vs_trl": ratio,
            "held_out_accuracy_diff_vs_trl": accuracy_gap,
            "targets": targets,
            "targets_met": ok,
            "wall_s": time.monotonic() - started,
        }
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        say(f"saved {path} and its .txt")
        path.write_text(json.dumps(record, indent=2) + "\n")
        path.with_suffix(".txt").write_text(say.text)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
