"""Loft's training loop against transformers' Trainer, step for step, on identical inputs.

    .venv/bin/python bench/trainer_parity.py                 # dates task, 12 steps, ~3 min
    .venv/bin/python bench/trainer_parity.py --task docstrings --steps 20

Both train SmolLM2-135M-Instruct's LoRA (r 16, alpha 32, all linear layers, no dropout, a linear
schedule, lr 2e-4, batch 4) on the same examples in the same order (engine/train.py's
``examples_for_step``) from the same initialisation; the Trainer gets them padded, Loft packed.
Every step's training loss is printed side by side with the largest difference. Equal losses
mean Loft's engine (packing, reply-only labels, loss normalisation, clipping, AdamW, schedule)
computes what a careful Trainer script computes, so differences in bench/quality.py come from
the defaults and the random draws, not from the loop.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import os
import platform
import sys
import tempfile
from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_DIR))
sys.path.insert(0, str(PROJECT_DIR / "bench"))

import quality  # noqa: E402
import quality_tasks  # noqa: E402

SEED = 1


def loft_losses(config, examples, cache: Path, work: Path, pad_id: int) -> list[float]:
    from engine import train
    from engine.base_models import load_base_model

    base = load_base_model(quality.SPEC, cache, "none", "cpu")
    losses: list[float] = []
    model, _ = train.train(
        config,
        examples,
        [],
        base,
        device="cpu",
        work_dir=work,
        callbacks=train.Callbacks(on_progress=lambda progress: losses.append(progress.loss)),
        pad_id=pad_id,
    )
    model.unload()
    return losses


def trainer_losses(config, examples, cache: Path, work: Path, steps: int) -> list[float]:
    import torch
    from peft import LoraConfig, get_peft_model
    from torch.utils.data import SequentialSampler
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainingArguments,
    )

    from engine import train
    from engine.base_models import model_folder, tokenizer_folder

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_folder(quality.SPEC, cache)))
    tokenizer.pad_token = quality.PAD_APART
    ordered = [
        {"input_ids": example.input_ids, "labels": example.labels}
        for step in range(steps)
        for example in train.examples_for_step(examples, config, step)
    ]
    base = AutoModelForCausalLM.from_pretrained(
        model_folder(quality.SPEC, cache), dtype=torch.float32, use_safetensors=True
    )
    torch.manual_seed(config.seed)  # as engine/train.py seeds before attaching LoRA
    lora = LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=config.target_modules,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(base, lora)

    class InOrder(Trainer):
        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

    arguments = TrainingArguments(
        output_dir=str(work),
        num_train_epochs=1,
        per_device_train_batch_size=config.batch_size,
        learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_scheduler,
        max_grad_norm=config.max_grad_norm,
        seed=config.seed,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    trainer = InOrder(model=model, args=arguments, train_dataset=ordered, data_collator=collator)
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--task", choices=quality_tasks.TASKS, default="dates")
    parser.add_argument("--steps", type=int, default=12)
    args = parser.parse_args()

    import torch

    from engine import data, train
    from engine.base_models import load_tokenizer
    from engine.hyperparameters import TrainConfig

    torch.set_num_threads(quality.THREADS)
    cache = quality.cache_dir()
    tokenizer = load_tokenizer(quality.SPEC, cache)
    task = quality_tasks.build(args.task)
    rows = [
        data.Example(i + 1, "chat", [data.Message("user", q), data.Message("assistant", a, True)])
        for i, (q, a) in enumerate(task.train)
    ]
    examples, _ = train.tokenize(rows, tokenizer, 128)
    config = TrainConfig(
        method="lora",
        n_epochs=3,
        batch_size=4,
        lora_dropout=0.0,  # dropout draws its masks from different random streams in the two
        lr_scheduler="linear",  # Trainer's default
        max_seq_length=128,
        max_steps=args.steps,
        seed=SEED,
    )
    pad_id = tokenizer.pad_token_id or 0
    with tempfile.TemporaryDirectory(prefix="loft-parity-") as work:
        loft = loft_losses(config, examples, cache, Path(work) / "loft", pad_id)
        reference = trainer_losses(config, examples, cache, Path(work) / "trainer", args.steps)

    versions = ", ".join(
        f"{name} {importlib.metadata.version(name)}" for name in ("torch", "transformers", "peft")
    )
    print(f"bench/trainer_parity.py  {datetime.datetime.now().isoformat(timespec='seconds')}")
    print(f"machine: {quality.cpu_model()}, {os.cpu_count()} cores ({quality.THREADS} threads)")
    print(f"python {platform.python_version()}, {versions}")
    print(f"commit:  {quality.git_commit()}")
    print(f"task {args.task}, {args.steps} steps, seed {SEED}: training loss per step")
    print(f"{'step':>4}  {'loft (packed)':>14}  {'trainer (padded)':>16}  {'difference':>10}")
    for step, (ours, theirs) in enumerate(zip(loft, reference, strict=True), start=1):
        print(f"{step:>4}  {ours:>14.6f}  {theirs:>16.6f}  {ours - theirs:>+10.2e}")
    largest = max(abs(a - b) for a, b in zip(loft, reference, strict=True))
    print(f"largest difference: {largest:.2e}")
    return 0 if largest < 1e-3 else 1


if __name__ == "__main__":
    sys.exit(main())
