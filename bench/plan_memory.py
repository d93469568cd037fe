"""Pre-flight's peak-memory estimate (engine/plan.py) against the peak RSS a real run reaches.

    .venv/bin/python bench/plan_memory.py            # a few shapes, ~5 minutes on 2 CPU cores
    .venv/bin/python bench/plan_memory.py --quick    # one shape

Each shape trains two steps of SmolLM2-135M (QLoRA or LoRA, packed or padded rows whose every
token is trained: the worst case for the logits) in a fresh process, and reports that process's
peak RSS beside the estimate. The estimate must err high: ratio estimate / measured >= 1.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_DIR))

MIB = 2**20
# (max_seq_length, quantization, packing, batch_size)
SHAPES = [(1024, "nf4", True, 8), (2048, "nf4", True, 4), (256, "none", False, 16)]


def measure(length: int, quantization: str, packing: bool, batch: int, cache: Path) -> dict:
    """Runs in a child process: one training run, then its peak RSS and the estimate."""
    from engine import plan, train
    from engine.base_models import load_base_model
    from engine.hyperparameters import TrainConfig
    from engine.model_cache import BUNDLED_BASE_MODEL, BaseModelSpec

    spec = BaseModelSpec(
        BUNDLED_BASE_MODEL["name"],
        BUNDLED_BASE_MODEL["source"],
        BUNDLED_BASE_MODEL["revision"],
        BUNDLED_BASE_MODEL["context_length"],
    )
    base = load_base_model(spec, cache, quantization, "cpu")
    ids = list(range(100, 100 + length))
    rows = [train.Tokenized(ids, ids) for _ in range(batch * 2)]
    config = TrainConfig(
        method="qlora" if quantization == "nf4" else "lora",
        max_seq_length=length,
        batch_size=batch,
        max_steps=2,
        packing=packing,
        checkpoint_every=100,
        validation_fraction=0,
    )
    with tempfile.TemporaryDirectory() as work:
        train.train(config, rows, [], base, device="cpu", work_dir=Path(work))
    measured = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    arch = BUNDLED_BASE_MODEL["architecture"]
    shape = plan.ModelShape(
        BUNDLED_BASE_MODEL["parameters"],
        arch["hidden_size"],
        arch["num_layers"],
        arch["intermediate_size"],
        arch["vocab_size"],
        arch["tied_embeddings"],
        arch["num_attention_heads"],
    )
    estimated = plan.peak_memory(
        shape,
        quantization=quantization,
        lora_rank=config.lora_rank,
        batch=plan.micro_batch(
            packing=packing, batch_size=batch, max_seq_length=length, max_row_tokens=length
        ),
        bytes_per_activation=4,
    )["total"]
    return {"measured": measured, "estimated": estimated}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="only the first shape")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        length, quantization, packing, batch, cache = json.loads(args.child)
        print(json.dumps(measure(length, quantization, packing, batch, Path(cache))))
        return 0

    worst = float("inf")
    with tempfile.TemporaryDirectory(prefix="loft-plan-bench-") as cache:
        print(f"{'shape':34} {'measured MiB':>12} {'estimated MiB':>14} {'ratio':>6}")
        for length, quantization, packing, batch in SHAPES[:1] if args.quick else SHAPES:
            child = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--child",
                    json.dumps([length, quantization, packing, batch, cache]),
                ],
                capture_output=True,
                text=True,
                check=True,
                env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
            )
            result = json.loads(child.stdout.strip().splitlines()[-1])
            ratio = result["estimated"] / result["measured"]
            worst = min(worst, ratio)
            name = f"{quantization} {'packed' if packing else 'padded'} {batch}x{length}"
            print(
                f"{name:34} {result['measured'] // MIB:>12,} "
                f"{result['estimated'] // MIB:>14,} {ratio:>6.2f}"
            )
    print(f"lowest estimate / measured: {worst:.2f} ({'PASS' if worst >= 1 else 'FAIL'}: >= 1)")
    return 0 if worst >= 1 else 1


if __name__ == "__main__":
    sys.exit(main())
