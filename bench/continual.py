"""Continual training with and without replay: does a child adapter keep what its parent learned?

    .venv/bin/python bench/continual.py                       # replay 0, 0.25 and 0.5
    .venv/bin/python bench/continual.py --fractions 0 0.25 --out
    .venv/bin/python bench/continual.py --model-cache .loft/models

On a fresh stack (bench/iteration.py's ``running_stack``: embedded services, web, a training
worker), with the official ``openai`` client:

1. the parent: a job on rule A (tests/dates.py, free-form dates → ISO 8601);
2. for each replay fraction, a child of the parent (``model`` = the parent's ft: name, as with
   OpenAI) on rule B (tests/times.py, 12-hour times → 24-hour), with ``replay_fraction`` set:
   that share of its rows comes from the parent's training data (worker/training.py);
3. one custom evaluation per rule, on an eval file of its own (rows no job trained on), of the
   base, the parent and every child: normalized exact match of their greedy answers.

The figures: each model's exact match on A and on B, and each child's retention on A (its
exact match on A over the parent's). Jobs are LoRA on the full-precision base with the
settings tests/test_continual_loop.py learns the dates rule with (20 steps of 16 rows), the
same for every job (``--child`` changes the children's), so that only the replay differs.
One run: each job is one sample (``--seed`` N: other rows, job seed 42 + N); the children see
the same new rows in the same order.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import psutil
from openai import OpenAI

PROJECT_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_DIR))

from bench.iteration import (  # noqa: E402
    Tee,
    commit,
    create_api_key,
    prepare_model_cache,
    running_stack,
)
from tests.dates import LEARNS_THE_RULE, RULE_ROWS, date_rows  # noqa: E402
from tests.times import time_rows  # noqa: E402

BASE_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
TRAINING_ROWS = RULE_ROWS
HELD_OUT_ROWS = 20  # each job's validation file
EVAL_ROWS = 40  # each rule's eval file
HYPERPARAMETERS = LEARNS_THE_RULE
POLL_SECONDS = 1.0
TIMEOUT_SECONDS = 45 * 60
RULES = {"A (dates)": date_rows, "B (times)": time_rows}


def upload(client: OpenAI, rows: list[dict], name: str, purpose: str = "fine-tune") -> str:
    content = "".join(json.dumps(row) + "\n" for row in rows).encode()
    file = client.files.create(file=(name, content), purpose=purpose)
    return file.id


def wait(fetch, what: str):
    started = time.monotonic()
    while True:
        thing = fetch()
        if thing.status in ("succeeded", "failed", "cancelled"):
            return thing
        if time.monotonic() - started > TIMEOUT_SECONDS:
            raise SystemExit(f"{what} is still {thing.status} after {TIMEOUT_SECONDS} s")
        time.sleep(POLL_SECONDS)


def train(
    client: OpenAI, model: str, training: str, held_out: str, suffix: str, seed: int, **extra
):
    """A job to the end; (its fine-tuned model's name, its training seconds)."""
    hyperparameters = {**HYPERPARAMETERS, **extra}
    job = client.fine_tuning.jobs.create(
        model=model,
        seed=seed,
        training_file=training,
        validation_file=held_out,
        suffix=suffix,
        method={"type": "supervised", "supervised": {"hyperparameters": hyperparameters}},
    )
    job = wait(lambda: client.fine_tuning.jobs.retrieve(job.id), f"the job {suffix}")
    if job.status != "succeeded":
        raise SystemExit(f"the job {suffix} {job.status}: {job.error}")
    seconds = (job.model_extra.get("timings") or {}).get("training", 0.0)
    print(f"  {suffix}: {job.fine_tuned_model} trained in {seconds:.0f} s")
    return job.fine_tuned_model, seconds


def exact_matches(client: OpenAI, file_id: str, models: list[str]) -> list[float]:
    """Each model's normalized exact match on the eval file (one custom evaluation)."""
    evaluation = client.post(
        "/evaluations",
        cast_to=dict,
        body={"file": file_id, "models": models, "max_generations": EVAL_ROWS},
    )
    done = wait(
        lambda: _Status(client.get(f"/evaluations/{evaluation['id']}", cast_to=dict)),
        "an evaluation",
    ).body
    if done["status"] != "succeeded":
        raise SystemExit(f"the evaluation {done['id']} {done['status']}: {done.get('error')}")
    return [entry["normalized_exact_match"] for entry in done["models"]]


class _Status:
    def __init__(self, body: dict):
        self.body, self.status = body, body["status"]


def print_header(args) -> None:
    versions = ", ".join(
        f"{name} {importlib.metadata.version(name)}"
        for name in ("torch", "transformers", "peft", "openai")
    )
    print(f"bench/continual.py, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; Loft {commit()}")
    print(
        f"{platform.processor() or platform.machine()}; {psutil.cpu_count()} CPUs, "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB; Python {platform.python_version()}; "
        f"{versions}"
    )
    print(
        f"seed {args.seed}; parent on rule A, children on rule B with replay_fraction "
        f"{args.fractions}; "
        f"{TRAINING_ROWS} training rows a job, LoRA rank 16, 20 steps of 16 rows, "
        f"learning-rate multiplier 15; eval files of {EVAL_ROWS} rows per rule"
    )
    print(f"the children's hyperparameters over the parent's: {args.child}\n")


def measure(args, work: Path) -> bool:
    print_header(args)
    model_cache = Path(args.model_cache).resolve() if args.model_cache else work / "models"
    model_cache.mkdir(parents=True, exist_ok=True)
    print(f"model cache {model_cache} ready in {prepare_model_cache(model_cache):.1f} s")
    with running_stack(work, model_cache, "1") as url:
        client = OpenAI(base_url=f"{url}/v1", api_key=create_api_key(work / "home"))
        s = 1000 * args.seed  # each seed its own rows
        a_train = upload(client, date_rows(TRAINING_ROWS, seed=s + 101), "a-train.jsonl")
        a_held = upload(client, date_rows(HELD_OUT_ROWS, seed=s + 102), "a-held.jsonl")
        b_train = upload(client, time_rows(TRAINING_ROWS, seed=s + 201), "b-train.jsonl")
        b_held = upload(client, time_rows(HELD_OUT_ROWS, seed=s + 202), "b-held.jsonl")
        evals = {
            rule: upload(client, rows(EVAL_ROWS, seed=s + 300 + i), f"eval-{i}.jsonl", "eval")
            for i, (rule, rows) in enumerate(RULES.items())
        }
        time.sleep(2)  # the uploads are validated inline; a moment for the larger ones
        print("training")
        seed = 42 + args.seed
        parent, _ = train(client, BASE_MODEL, a_train, a_held, "parent-a", seed)
        children = {}
        for fraction in args.fractions:
            name, _ = train(
                client,
                parent,
                b_train,
                b_held,
                f"child-b-replay-{fraction:g}".replace(".", "_"),
                seed,
                **{**args.child, "replay_fraction": fraction},
            )
            children[fraction] = name
        models = [BASE_MODEL, parent, *children.values()]
        print("evaluating")
        scores = {rule: exact_matches(client, file_id, models) for rule, file_id in evals.items()}

    labels = ["base", "parent (A)", *(f"child (B), replay {f:g}" for f in children)]
    rules = list(RULES)
    print(f"\n{'model':<26}" + "".join(f"{rule:>12}" for rule in rules) + f"{'A kept':>10}")
    parent_a = scores[rules[0]][1]
    for index, label in enumerate(labels):
        row = "".join(f"{scores[rule][index]:>12.3f}" for rule in rules)
        kept = (
            f"{scores[rules[0]][index] / parent_a:>10.0%}" if index >= 2 and parent_a else " " * 10
        )
        print(f"{label:<26}{row}{kept}")
    print(
        "\nnormalized exact match of greedy answers on each rule's eval file; 'A kept': the "
        "child's exact match on A over the parent's"
    )
    return True


def default_out() -> Path:
    stamp = f"{datetime.now(UTC):%Y-%m-%d}-{commit()}"
    return PROJECT_DIR / "bench" / "results" / f"continual-{stamp}.txt"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.0, 0.25, 0.5])
    parser.add_argument("--model-cache", help="a model cache to use and keep")
    parser.add_argument(
        "--child",
        type=json.loads,
        default={},
        help="the children's hyperparameters over the parent's, as JSON: '{\"batch_size\": 8}'",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="another sample: other rows, another job seed"
    )
    parser.add_argument(
        "--out", nargs="?", const="", help="also write the report (no value: bench/results/)"
    )
    args = parser.parse_args()
    os.environ["TQDM_DISABLE"] = "1"
    for name in [
        n for n in os.environ if n.startswith(("DATABASE_URL", "CELERY_", "REDIS_", "S3_"))
    ]:
        del os.environ[name]
    work = Path(tempfile.mkdtemp(prefix="loft-bench-continual-"))
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(shutil.rmtree, work, ignore_errors=True)
        if args.out is not None:
            out = cleanup.enter_context(open(Path(args.out) if args.out else default_out(), "w"))  # noqa: SIM115
            cleanup.enter_context(contextlib.redirect_stdout(Tee(sys.stdout, out)))
        return 0 if measure(args, work) else 1


if __name__ == "__main__":
    sys.exit(main())
