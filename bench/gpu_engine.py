"""Loft's training engine on a GPU: throughput, peak memory against the planner, and MFU.

    bash bench/gpu.sh                     # default sizes: under 10 minutes on an H100
    bash bench/gpu.sh --dry-run           # every step on tiny sizes, on a CPU in seconds
    bash bench/gpu.sh --steps 40 --models llama-1b --peak-flops 989e12 --out result.json

Self-contained for a GPU machine that can download nothing: no Django, database, S3 or
weights. Copy the repository's engine/ folder and these two files (bench/gpu.sh,
bench/gpu_engine.py) — a few hundred KB — keeping the layout (engine/ beside bench/), and run
bench/gpu.sh from anywhere. It needs torch, transformers, peft, safetensors and jinja2 on the
machine, and bitsandbytes for QLoRA.

The models are randomly initialised from their configs (``from_config``, never a hub download):
SmolLM2-135M's shape and a ~1B-parameter Llama shape (Llama-3.2-1B's). Their weights do not
matter here: a step costs the same whatever they hold. The examples are random token ids of
64 to 1024 tokens, each with an untrained prompt and a trained answer, the same for every run.

For each model on the device (CUDA when available, else the CPU), LoRA (bf16 autocast on CUDA,
"auto" precision on a CPU), then QLoRA (NF4) when bitsandbytes imports, each trained by
``engine.train.train`` exactly as a job is. Measured per run, after the warm-up step(s):

- tokens/s: every token through the model, and the label-bearing (trained) ones
- peak memory: torch.cuda.max_memory_allocated and max_memory_reserved on CUDA; on a CPU the
  process's peak RSS so far (ru_maxrss, which never falls: it covers earlier runs too)
- the planner's estimate of that peak (engine/plan.py ``peak_memory``, for the micro-batch
  ``micro_batch`` sizes, as jobs/preflight.py asks it), and the largest row really forwarded
- MFU against the GPU's dense bf16 peak (the formula is in the output)

Results go to ``--out`` (default bench/results/gpu-<date>.json; a temporary file with
--dry-run) and a short table is printed. Exits 1 when a run failed (the others still run).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import re
import resource
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_DIR))

import torch  # noqa: E402

from engine import attention, plan, train  # noqa: E402
from engine.base_models import compute_dtype, load_base_model  # noqa: E402
from engine.hyperparameters import TrainConfig  # noqa: E402
from engine.model_cache import BaseModelSpec  # noqa: E402

GIB = 2**30

# LlamaConfig arguments. SmolLM2-135M's own config; the 1B is Llama-3.2-1B's shape without its
# rope scaling (which changes no cost).
MODEL_SHAPES = {
    "smollm2-135m": {
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "vocab_size": 49152,
        "tie_word_embeddings": True,
        "max_position_embeddings": 8192,
        "rope_theta": 100000,
    },
    "llama-1b": {
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "tie_word_embeddings": True,
        "max_position_embeddings": 131072,
        "rope_theta": 500000,
    },
}
# --dry-run keeps each shape's kind (tied, grouped key/values) at a size a CPU trains in a blink.
DRY_RUN_SHAPE = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 1024,
}

# Dense bf16 tensor-core peaks (no sparsity; datasheets often quote twice these), matched in
# order against torch.cuda.get_device_name(): the specific names before the general ones.
BF16_PEAK_FLOPS = (
    (r"H100.*PCIe", 756e12),
    (r"H100 NVL", 835e12),
    (r"H200 NVL", 835e12),
    (r"H100", 989e12),  # SXM: "NVIDIA H100 80GB HBM3"
    (r"H200", 989e12),
    (r"A100", 312e12),
    (r"\bL4\b", 121e12),  # not the L40 or L40S
)

# LoRA leaves the base's weights without gradients: per token and base parameter, 2 FLOPs
# forward and 2 backward (the activations' gradient), not the 6 of full training. The adapters'
# own FLOPs (~1 % at rank 16) and attention's are left out, so MFU errs low.
MFU_FORMULA = (
    "MFU = 4 × (non-embedding parameters × tokens/s + vocab × hidden × labelled tokens/s) "
    "/ peak bf16 FLOP/s. 4 = 2 forward + 2 backward to the activations (the base gets no "
    "weight gradients under LoRA); the vocabulary projection runs only where a label is "
    "(engine.train.labelled_hidden) and the embedding lookup costs none. LoRA's own and "
    "attention's FLOPs are left out. mfu_naive = 4 × parameters × tokens/s / peak."
)


@dataclass(frozen=True)
class Sizes:
    """How much each run trains: ``warmup_steps`` unmeasured steps, then ``steps`` measured."""

    steps: int
    warmup_steps: int
    batch_size: int
    min_length: int
    max_length: int
    lora_rank: int
    seed: int

    @property
    def examples(self) -> int:
        # One epoch, each step its own examples.
        return self.batch_size * (self.warmup_steps + self.steps)


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes, to check the script")
    parser.add_argument("--out", type=Path, help="the JSON file (default bench/results/gpu-…)")
    parser.add_argument("--models", default=",".join(MODEL_SHAPES), help="comma-separated")
    parser.add_argument("--steps", type=int, help="measured steps per run (default 20)")
    parser.add_argument("--warmup-steps", type=int, default=1, help="unmeasured first steps")
    parser.add_argument("--batch-size", type=int, help="examples per step (default 16)")
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-qlora", action="store_true", help="LoRA runs only")
    parser.add_argument(
        "--peak-flops", type=float, help="the device's bf16 peak FLOP/s, for a GPU not in the table"
    )
    return parser.parse_args()


def sizes_from(args: argparse.Namespace) -> Sizes:
    if args.dry_run:
        steps, batch_size, lengths = args.steps or 2, args.batch_size or 2, (16, 64)
    else:
        steps, batch_size, lengths = args.steps or 20, args.batch_size or 16, (64, 1024)
    return Sizes(steps, args.warmup_steps, batch_size, *lengths, args.lora_rank, args.seed)


# --- what is trained ---------------------------------------------------------------------


def random_examples(sizes: Sizes, vocab_size: int) -> list[train.Tokenized]:
    """Random token ids; a prompt of 20-80 % of each example is context (label IGNORE), the
    rest is learned. The same seed gives the same lengths whatever the vocabulary."""
    rng = random.Random(sizes.seed)
    examples = []
    for _ in range(sizes.examples):
        length = rng.randint(sizes.min_length, sizes.max_length)
        prompt = int(length * rng.uniform(0.2, 0.8))
        ids = [rng.randrange(vocab_size) for _ in range(length)]
        labels = [train.IGNORE] * prompt + ids[prompt:]
        examples.append(train.Tokenized(ids, labels))
    return examples


def build_random_model(llama_arguments: dict, device: str):
    """A randomly initialised causal LM in the dtype a worker loads it in (bf16 on a bf16 GPU,
    fp32 on a CPU), set up for training as engine.base_models.load_base_model does."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**llama_arguments)
    dtype = compute_dtype(device)
    torch.manual_seed(0)
    # Initialised where it trains: a billion random weights take tens of seconds on a CPU.
    with torch.device(device):
        try:
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        except TypeError:  # transformers before 4.56 calls it torch_dtype
            model = AutoModelForCausalLM.from_config(config, torch_dtype=dtype)
    # Packed rows are kept apart by their position_ids only without a KV cache.
    model.config.use_cache = False
    attention.use_per_document_attention(model)
    return model


def load_quantized_copy(model, folder: Path, device: str):
    """The same random weights as a 4-bit NF4 base, loaded the way a QLoRA job loads its base:
    ``from_config`` cannot quantize, so the model is saved to a local folder and read back
    through engine.base_models.load_base_model (local paths go straight to from_pretrained)."""
    model.save_pretrained(folder)
    spec = BaseModelSpec(name="random", source=str(folder), revision="main", context_length=8192)
    return load_base_model(spec, folder / "cache", "nf4", device)


def model_shape(model) -> plan.ModelShape:
    """The planner's view of a model, as jobs/preflight.py builds it from the catalogue."""
    config = model.config
    return plan.ModelShape(
        parameters=sum(p.numel() for p in model.parameters()),
        hidden_size=config.hidden_size,
        num_layers=config.num_hidden_layers,
        intermediate_size=config.intermediate_size,
        vocab_size=config.vocab_size,
        tied_embeddings=config.tie_word_embeddings,
        num_attention_heads=config.num_attention_heads,
    )


# --- one run ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepTokens:
    """What one optimizer step puts through the model, as engine.train packs it."""

    total: int
    labelled: int
    rows: int
    largest_row: int


def tokens_by_step(examples: list[train.Tokenized], config: TrainConfig) -> list[StepTokens]:
    """Computed beforehand with the engine's own packing: TrainResult counts every real token,
    not the labelled ones, and a label at the start of an example is not trained (pack)."""
    row_tokens = train.forward_tokens(config.max_seq_length)
    steps = []
    for step in range(train.total_steps(config, len(examples))):
        rows = train.pack(train.examples_for_step(examples, config, step), row_tokens)
        steps.append(
            StepTokens(
                total=sum(row.input_ids.numel() for row in rows),
                labelled=sum(int((row.labels[:, 1:] != train.IGNORE).sum()) for row in rows),
                rows=len(rows),
                largest_row=max(row.input_ids.numel() for row in rows),
            )
        )
    return steps


class StepClock:
    """Callbacks that time each step's end. CUDA runs ahead of Python, so the clock waits for
    the device first: otherwise a step's optimizer update would count in the next step."""

    def __init__(self, device: str):
        self.device = device
        self.loop_started = 0.0
        self.step_ended: dict[int, float] = {}
        self.losses: dict[int, float] = {}

    def _now(self) -> float:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize(self.device)
        return time.monotonic()

    def on_loop_start(self) -> None:
        self.loop_started = self._now()

    def on_progress(self, progress: train.Progress) -> None:
        self.step_ended[progress.step] = self._now()
        self.losses[progress.step] = progress.loss

    def callbacks(self) -> train.Callbacks:
        return train.Callbacks(on_progress=self.on_progress, on_loop_start=self.on_loop_start)


def train_and_measure(
    base, method: str, examples: list[train.Tokenized], sizes: Sizes, device: str
) -> dict:
    """One job's training through engine.train.train, timed step by step."""
    config = TrainConfig(
        method=method,
        n_epochs=1,
        batch_size=sizes.batch_size,
        max_seq_length=sizes.max_length,
        lora_rank=sizes.lora_rank,
        lora_alpha=2 * sizes.lora_rank,
        mixed_precision="bf16" if device.startswith("cuda") else "auto",
        checkpoint_every=10_000_000,  # only the one train() always writes after the last step
        seed=sizes.seed,
    )
    steps = tokens_by_step(examples, config)
    clock = StepClock(device)
    # The peak from here on: the base is in memory, what an earlier run or the quantized load
    # left cached in the allocator is not (it would stay in max_memory_reserved).
    free_device_memory()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
    with tempfile.TemporaryDirectory(prefix="loft-gpu-bench-") as work_dir:
        model, result = train.train(
            config,
            examples,
            [],
            base,
            device=device,
            work_dir=Path(work_dir),
            callbacks=clock.callbacks(),
        )
    memory = peak_memory(device)
    model.unload()  # the base without this run's adapter

    warm, last = sizes.warmup_steps, len(steps)
    measured = steps[warm:]
    seconds = clock.step_ended[last] - clock.step_ended[warm]
    return {
        "method": method,
        "precision": result.precision,
        "steps_measured": len(measured),
        "seconds_measured": seconds,
        "tokens_per_second": sum(s.total for s in measured) / seconds,
        "labelled_tokens_per_second": sum(s.labelled for s in measured) / seconds,
        "tokens_per_step": sum(s.total for s in measured) / len(measured),
        "rows_per_step": sum(s.rows for s in measured) / len(measured),
        "largest_row_tokens": max(s.largest_row for s in steps),
        "warmup_seconds": clock.step_ended[warm] - clock.loop_started,
        "seconds_to_first_step": result.seconds_to_first_step,
        "loss_first_step": clock.losses[1],
        "loss_last_step": clock.losses[last],
        "peak_memory": memory,
        "config": asdict(config),
    }


def peak_memory(device: str) -> dict:
    if device.startswith("cuda"):
        return {
            "allocated_bytes": torch.cuda.max_memory_allocated(device),
            "reserved_bytes": torch.cuda.max_memory_reserved(device),
        }
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes; peak of the process so far, earlier runs included.
    return {"process_peak_rss_bytes": rss if sys.platform == "darwin" else rss * 1024}


def measured_peak_bytes(memory: dict) -> int:
    """What must fit in the worker's memory: the CUDA allocator's reservation (its slack
    included, as the planner's overhead is), or the process's RSS."""
    return memory.get("reserved_bytes", memory.get("process_peak_rss_bytes", 0))


# --- against the planner and the hardware ----------------------------------------------------


def planner_estimate(shape: plan.ModelShape, run: dict, bytes_per_activation: int) -> dict:
    """engine.plan.peak_memory for the run's settings, as the pre-flight check sizes a job
    (jobs/preflight.py), beside the peak measured."""
    config = TrainConfig(**run["config"])
    batch = plan.micro_batch(
        packing=config.packing,
        batch_size=config.batch_size,
        max_seq_length=config.max_seq_length,
        max_row_tokens=config.max_seq_length,
    )
    parts = plan.peak_memory(
        shape,
        quantization=config.quantization,
        lora_rank=config.lora_rank,
        batch=batch,
        bytes_per_activation=bytes_per_activation,
    )
    return {
        "micro_batch_tokens": batch.tokens,
        "bytes_per_activation": bytes_per_activation,
        "bytes": parts,
        "measured_over_estimate": measured_peak_bytes(run["peak_memory"]) / parts["total"],
    }


def peak_bf16_flops(device: str, override: float | None) -> tuple[float | None, str]:
    """The device's dense bf16 peak and where the figure came from."""
    if override:
        return override, "--peak-flops"
    if not device.startswith("cuda"):
        return None, "a CPU: pass --peak-flops for MFU"
    name = torch.cuda.get_device_name(device)
    for pattern, flops in BF16_PEAK_FLOPS:
        if re.search(pattern, name, re.IGNORECASE):
            return flops, f"table: {pattern}"
    return None, f"{name} is not in the table: pass --peak-flops for MFU"


def model_flop_utilisation(shape: plan.ModelShape, run: dict, peak: float | None) -> dict:
    head = shape.vocab_size * shape.hidden_size
    decoder = shape.parameters - shape.embedding_parameters
    flops = 4 * (decoder * run["tokens_per_second"] + head * run["labelled_tokens_per_second"])
    naive = 4 * shape.parameters * run["tokens_per_second"]
    return {
        "model_flops_per_second": flops,
        "mfu": flops / peak if peak else None,
        "mfu_naive": naive / peak if peak else None,
    }


# --- the benchmark ---------------------------------------------------------------------------


def qlora_unavailable(device: str, dry_run: bool, refused: bool) -> str | None:
    """Why QLoRA is not run, or None. A dry run also tries it on a CPU (bitsandbytes trains
    there too, as Loft's CPU workers do), so the GPU box meets no untried code."""
    if refused:
        return "--no-qlora"
    if not device.startswith("cuda") and not dry_run:
        return "no CUDA device"
    try:
        import bitsandbytes  # noqa: F401
    except Exception as error:  # an ImportError, or a CUDA setup error raised as it loads
        return f"bitsandbytes does not import: {type(error).__name__}: {error}"
    return None


def benchmark_model(
    figures: dict, args, sizes: Sizes, device: str, save: Callable[[], None]
) -> None:
    """LoRA, then QLoRA on the same random weights, into ``figures`` (which names the model
    and its LlamaConfig arguments), saved after each run; a failed run is recorded, not fatal."""
    started = time.monotonic()
    name, llama_arguments = figures["name"], figures["llama_config"]
    base = build_random_model(llama_arguments, device)
    shape = model_shape(base)
    bytes_per_activation = base.dtype.itemsize
    figures.update(
        parameters=shape.parameters,
        attention_implementation=base.config._attn_implementation,
        base_dtype=str(base.dtype),
        runs=[],
    )
    examples = random_examples(sizes, llama_arguments["vocab_size"])
    peak, peak_source = peak_bf16_flops(device, args.peak_flops)
    skip_qlora = qlora_unavailable(device, args.dry_run, args.no_qlora)

    with tempfile.TemporaryDirectory(prefix="loft-gpu-bench-model-") as folder:
        for method in ("lora", "qlora"):
            if method == "qlora" and skip_qlora:
                print(f"  {name} qlora: skipped ({skip_qlora})", flush=True)
                figures["runs"].append({"method": method, "skipped": skip_qlora})
                continue
            try:
                if method == "qlora":
                    base = load_quantized_copy(base, Path(folder), device)
                run = train_and_measure(base, method, examples, sizes, device)
                run["planner"] = planner_estimate(shape, run, bytes_per_activation)
                run.update(model_flop_utilisation(shape, run, peak))
                run["peak_flops_source"] = peak_source
                print("  " + summary_line(name, run), flush=True)
            except Exception as error:
                traceback.print_exc()
                run = {"method": method, "error": f"{type(error).__name__}: {error}"}
                print(f"  {name} {method}: FAILED {run['error']}", flush=True)
            figures["runs"].append(run)
            save()
            free_device_memory()
    del base
    free_device_memory()
    figures["seconds"] = time.monotonic() - started


def free_device_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def machine_description(device: str) -> dict:
    def version(package: str) -> str | None:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return None

    machine = {
        "device": device,
        "device_name": torch.cuda.get_device_name(device)
        if device.startswith("cuda")
        else platform.processor() or platform.machine(),
        "gpu_memory_bytes": torch.cuda.get_device_properties(device).total_memory
        if device.startswith("cuda")
        else None,
        "cuda": torch.version.cuda,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    for package in ("torch", "transformers", "peft", "bitsandbytes", "safetensors"):
        machine[package] = version(package)
    return machine


def summary_line(name: str, run: dict) -> str:
    memory = measured_peak_bytes(run["peak_memory"]) / GIB
    planned = run["planner"]["bytes"]["total"] / GIB
    mfu = "MFU n/a"
    if run["mfu"] is not None:
        mfu = f"MFU {run['mfu']:.1%} (naive {run['mfu_naive']:.1%})"
    return (
        f"{name:<13} {run['method']:<5} {run['precision']:<4} "
        f"{run['tokens_per_second']:>9,.0f} tok/s ({run['labelled_tokens_per_second']:,.0f} "
        f"labelled)  peak {memory:.2f} GiB, planned {planned:.2f} GiB  {mfu}"
    )


def default_out(dry_run: bool, now: datetime) -> Path:
    if dry_run:
        handle, path = tempfile.mkstemp(prefix="loft-gpu-dry-run-", suffix=".json")
        os.close(handle)
        return Path(path)
    return PROJECT_DIR / "bench" / "results" / f"gpu-{now:%Y-%m-%d-%H%M}.json"


def main() -> int:
    args = parse_arguments()
    from transformers.utils import logging as transformers_logging

    # Loading and saving bars would bury the table; the figures say what happened.
    transformers_logging.disable_progress_bar()
    sizes = sizes_from(args)
    if sizes.steps < 1 or sizes.warmup_steps < 1:
        raise SystemExit("--steps and --warmup-steps must be at least 1")
    device = "cuda:0" if torch.cuda.is_available() else "cpu"
    now = datetime.now(UTC)
    unknown = [name for name in args.models.split(",") if name not in MODEL_SHAPES]
    if unknown:
        raise SystemExit(f"unknown model {unknown[0]!r}; known: {', '.join(MODEL_SHAPES)}")
    if device == "cpu" and not args.dry_run:
        print("No CUDA device: the default sizes are a GPU's, this will be slow.", flush=True)

    machine = machine_description(device)
    print(f"{machine['device_name']} ({device}), torch {machine['torch']}, {asdict(sizes)}")
    started = time.monotonic()
    models = []
    report = {
        "benchmark": "bench/gpu_engine.py",
        "date": now.isoformat(timespec="seconds"),
        "dry_run": args.dry_run,
        "machine": machine,
        "sizes": {**asdict(sizes), "examples": sizes.examples},
        "peak_flops": peak_bf16_flops(device, args.peak_flops)[0],
        "mfu_formula": MFU_FORMULA,
        "peak_memory_note": "CUDA: max_memory_reserved is compared with the planner; on a CPU "
        "ru_maxrss is the process's peak so far, earlier runs included",
        "seconds": None,
        "models": models,
    }
    out = args.out or default_out(args.dry_run, now)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        # After every run: a benchmark cut short by a machine's time limit keeps what it did.
        report["seconds"] = time.monotonic() - started
        out.write_text(json.dumps(report, indent=2) + "\n")

    for name in args.models.split(","):
        arguments = MODEL_SHAPES[name]
        if args.dry_run:
            arguments = {**arguments, **DRY_RUN_SHAPE}
            name = f"{name}-dry"
        models.append({"name": name, "llama_config": arguments})
        benchmark_model(models[-1], args, sizes, device, save)
    save()
    print(f"{MFU_FORMULA}\nWrote {out} in {report['seconds']:.0f} s.")
    failed = [run for model in models for run in model["runs"] if "error" in run]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
