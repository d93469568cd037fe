"""Iteration speed: from submitting a small fine-tuning job to a succeeded job with its
evaluation, and where the time went.

    .venv/bin/python bench/iteration.py                          # 2 rounds, with the medium job
    .venv/bin/python bench/iteration.py --rounds 1 --no-medium    # a quick look (~10 minutes)
    .venv/bin/python bench/iteration.py --out bench/results/iteration-DATE-COMMIT.txt
    .venv/bin/python bench/iteration.py --rounds 1 --medium-only  # cold, then the 400-row job

Each configuration runs on a fresh stack of its own (make run's supervisor, in a temporary
LOFT_HOME deleted at the end), through the official ``openai`` client with default
hyperparameters, as a new user would:

    LOFT_EVAL_KEEP_BASE_SCORES=1   the default: the base model's evaluation results are kept
                                   between jobs (worker/base_scores.py)
    LOFT_EVAL_KEEP_BASE_SCORES=0   every evaluation scores the base again (the behaviour before)

and, on each stack, in turn:

    cold             the first 40-row job, right after the stack is ready (a fresh worker)
    warm, same file  a second job on the same uploaded file (a user iterating on settings)
    warm, new file   a 40-row job on a new file (other rows, other held-out rows)
    medium           a 400-row job on the warm worker (~1000 steps; skipped with --no-medium)

The configurations are interleaved, round by round (their order alternates, so that neither
always runs first). Every stack reads one model cache, converted from the bundled model before
the first stack starts, so that the one-off conversion (~25 s) is in no job's figures.

For each job: the job's own ``timings`` (queue, setup, training, evaluation, upload, total, in
seconds, measured by the worker and the database), the wall seconds the client saw from the
create call to ``succeeded``, ``outside = total - training`` and ``ratio = total / training``;
then the median and range over the rounds, and kept against not kept in the same run.
Targets (issue 18), on every warm 40-row job of the kept configuration (both warm scenarios):
``total <= 2 x training`` and ``total - training <= 20 s``. Exit status 1 on a miss, and on a
job that fails or is cancelled.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import multiprocessing
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import psutil
from openai import OpenAI

PROJECT_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_DIR))

from bench.upload import start_stack  # noqa: E402
from loft.embedded import free_port  # noqa: E402
from tests.dates import date_rows  # noqa: E402

BASE_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMALL_ROWS, MEDIUM_ROWS = 40, 400
# One seed per file: the same rows in every round and configuration, so rounds are repeats.
SEEDS = {"first": 1, "new": 2, "medium": 3}
POLL_SECONDS = 0.5
JOB_TIMEOUT_SECONDS = 30 * 60
STOP_TIMEOUT_SECONDS = 60

CONFIGURATIONS = {"kept": "1", "not kept": "0"}  # name → LOFT_EVAL_KEEP_BASE_SCORES
COLD, WARM_SAME, WARM_NEW, MEDIUM = "cold", "warm, same file", "warm, new file", "medium"
WARM_SCENARIOS = (WARM_SAME, WARM_NEW)
PHASES = ("queue", "setup", "training", "evaluation", "upload")

TARGET_RATIO = 2.0  # total <= 2 x training
TARGET_OUTSIDE_SECONDS = 20.0  # total - training <= 20 s


@dataclass
class Measurement:
    configuration: str
    scenario: str
    round: int
    wall: float  # seconds the client saw, from the create call to "succeeded"
    timings: dict  # the job's own, in seconds
    evaluation: dict
    steps: int

    @property
    def total(self) -> float:
        return self.timings["total"]

    @property
    def training(self) -> float:
        return self.timings["training"]

    @property
    def outside(self) -> float:
        return self.total - self.training

    @property
    def ratio(self) -> float:
        return self.total / self.training

    def figure(self, name: str) -> float:
        """A column of the report by name: a phase, or one of the figures above."""
        if name in PHASES:
            return self.timings[name]
        return getattr(self, name)


class Tee:
    """Writes to the terminal and, with --out, to a file too."""

    def __init__(self, *streams):
        self.streams = streams

    def write(self, text: str) -> int:
        for stream in self.streams:
            stream.write(text)
            stream.flush()  # a long run shows its progress as it goes
        return len(text)

    def flush(self) -> None:
        for stream in self.streams:
            stream.flush()


# --- the machine and the stack ------------------------------------------------------------------


def commit() -> str:
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=PROJECT_DIR, capture_output=True, text=True, check=True
        ).stdout.strip()

    return git("rev-parse", "--short", "HEAD") + ("+dirty" if git("status", "--porcelain") else "")


def print_header(args) -> None:
    versions = ", ".join(
        f"{name} {importlib.metadata.version(name)}" for name in ("torch", "transformers", "peft")
    )
    memory = psutil.virtual_memory().total / 2**30
    load = " ".join(f"{value:.2f}" for value in os.getloadavg())
    print(f"bench/iteration.py, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; Loft {commit()}")
    print(
        f"{platform.platform()}; {psutil.cpu_count()} CPUs ({psutil.cpu_count(logical=False)} "
        f"cores), {memory:.0f} GiB; load average before {load}"
    )
    print(f"Python {platform.python_version()}; {versions}")
    print(
        f"{args.rounds} round(s), configurations interleaved; {BASE_MODEL}, default "
        f"hyperparameters; {SMALL_ROWS}-row jobs"
        + (f", and a {MEDIUM_ROWS}-row one" if args.medium else " (no medium job)")
    )
    print()


def convert_bundled_model(cache: Path) -> None:
    """Fill the model cache every stack reads (the tokenizer and the converted weights)."""
    os.environ["TQDM_DISABLE"] = "1"  # transformers' progress bars would fill the report
    from engine.base_models import model_folder, tokenizer_folder
    from engine.model_cache import BUNDLED_BASE_MODEL, BaseModelSpec

    spec = BaseModelSpec(
        **{k: BUNDLED_BASE_MODEL[k] for k in ("name", "source", "revision", "context_length")}
    )
    tokenizer_folder(spec, cache)
    model_folder(spec, cache)


def prepare_model_cache(cache: Path) -> float:
    """Convert the bundled model into ``cache`` once; returns the seconds it took. In a child
    process, so that this one does not hold torch and the weights while the stacks train."""
    started = time.monotonic()
    child = multiprocessing.get_context("spawn").Process(
        target=convert_bundled_model, args=(cache,)
    )
    child.start()
    child.join()
    if child.exitcode != 0:
        raise SystemExit(f"converting the bundled model into {cache} failed")
    return time.monotonic() - started


@contextlib.contextmanager
def running_stack(folder: Path, model_cache: Path, keep_base_scores: str) -> Iterator[str]:
    """A fresh stack in ``folder/home`` with LOFT_EVAL_KEEP_BASE_SCORES set; yields its URL.
    start_stack copies this process's environment, so the setting goes there for the start."""
    home = folder / "home"
    home.mkdir(parents=True)
    # Loft has no setting for its model cache: it is always $LOFT_HOME/models.
    (home / "models").symlink_to(model_cache, target_is_directory=True)
    port = free_port()
    before = os.environ.get("LOFT_EVAL_KEEP_BASE_SCORES")
    os.environ["LOFT_EVAL_KEEP_BASE_SCORES"] = keep_base_scores
    try:
        stack = start_stack(home, port)
    finally:
        if before is None:
            del os.environ["LOFT_EVAL_KEEP_BASE_SCORES"]
        else:
            os.environ["LOFT_EVAL_KEEP_BASE_SCORES"] = before
    try:
        yield f"http://127.0.0.1:{port}"
    except BaseException:
        print_log_tail(folder / "stack.log")
        raise
    finally:
        stack.send_signal(signal.SIGTERM)
        try:
            stack.wait(timeout=STOP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            stack.kill()
            stack.wait()


def print_log_tail(log: Path, lines: int = 40) -> None:
    if log.exists():
        print(f"--- the last {lines} lines of the stack's log ---")
        print("\n".join(log.read_text(errors="replace").splitlines()[-lines:]))
        print("---")


def create_api_key(home: Path) -> str:
    return subprocess.run(
        [sys.executable, "manage.py", "create_api_key", "--org", "bench"],
        cwd=PROJECT_DIR, env={"PATH": os.environ["PATH"], "LOFT_HOME": str(home)},
        capture_output=True, text=True, check=True,
    ).stdout.strip().splitlines()[-1]  # fmt: skip


# --- jobs ---------------------------------------------------------------------------------------


def upload_rows(client: OpenAI, rows: int, seed: int) -> str:
    data = "".join(json.dumps(row) + "\n" for row in date_rows(rows, seed)).encode()
    return client.files.create(file=("train.jsonl", data), purpose="fine-tune").id


def run_job(client: OpenAI, file_id: str) -> tuple[dict, float]:
    """Submit a job with default hyperparameters and wait for it; returns Loft's own members of
    the job (timings, evaluation, metrics) and the wall seconds from the create call to seeing
    it succeeded."""
    started = time.monotonic()
    job = client.fine_tuning.jobs.create(training_file=file_id, model=BASE_MODEL)
    while job.status not in ("succeeded", "failed", "cancelled"):
        if time.monotonic() - started > JOB_TIMEOUT_SECONDS:
            raise SystemExit(f"job {job.id} is still {job.status} after {JOB_TIMEOUT_SECONDS} s")
        time.sleep(POLL_SECONDS)
        job = client.fine_tuning.jobs.retrieve(job.id)
    wall = time.monotonic() - started
    if job.status != "succeeded":
        raise SystemExit(f"job {job.id} {job.status}: {job.error}")
    extra = job.model_extra  # the client keeps the members it does not know here
    if not (extra.get("evaluation") or {}).get("adapter"):
        raise SystemExit(f"job {job.id} succeeded without an evaluation of its adapter")
    if not extra.get("timings"):
        raise SystemExit(f"job {job.id} succeeded without timings")
    return extra, wall


def measure_stack(
    configuration: str,
    round_number: int,
    folder: Path,
    model_cache: Path,
    medium: bool,
    warm_small: bool = True,
) -> list[Measurement]:
    """The scenarios, in order, on one fresh stack of ``configuration``."""
    print(f"round {round_number}, {configuration}: starting a fresh stack")
    measurements = []
    with running_stack(folder, model_cache, CONFIGURATIONS[configuration]) as url:
        client = OpenAI(base_url=f"{url}/v1", api_key=create_api_key(folder / "home"))

        def measure_job(scenario: str, file_id: str) -> None:
            job, wall = run_job(client, file_id)
            measurement = Measurement(
                configuration,
                scenario,
                round_number,
                wall,
                timings=job["timings"],
                evaluation=job["evaluation"],
                steps=job["metrics"]["steps"],
            )
            print_job(measurement)
            measurements.append(measurement)

        # Each file is uploaded just before its job, as a user iterating would.
        first = upload_rows(client, SMALL_ROWS, SEEDS["first"])
        measure_job(COLD, first)
        if warm_small:
            measure_job(WARM_SAME, first)
            measure_job(WARM_NEW, upload_rows(client, SMALL_ROWS, SEEDS["new"]))
        if medium:
            measure_job(MEDIUM, upload_rows(client, MEDIUM_ROWS, SEEDS["medium"]))
    return measurements


# --- the report ---------------------------------------------------------------------------------


def print_job(m: Measurement) -> None:
    phases = " ".join(f"{p} {m.timings[p]:6.1f}" for p in PHASES)
    base, adapter = m.evaluation["base"], m.evaluation["adapter"]
    exact = (
        f"exact match {base['exact_match']:.2f} → {adapter['exact_match']:.2f}"
        if base and base.get("exact_match") is not None and adapter.get("exact_match") is not None
        else "exact match n/a"
    )
    retried = f"  (attempt {m.timings['attempt']})" if m.timings.get("attempt", 1) != 1 else ""
    print(
        f"  {m.scenario:<16} total {m.total:6.1f}  wall {m.wall:6.1f}  {phases}  "
        f"outside {m.outside:6.1f}  ratio {m.ratio:5.2f}  {m.steps} steps "
        f"({m.training / m.steps:.2f} s each)  {exact}{retried}"
    )


def spread(values: list[float]) -> str:
    """The median, and the range where there is more than one value."""
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.median(values):.1f} ({min(values):.1f}–{max(values):.1f})"


def select(measurements: list[Measurement], configuration: str, scenario: str):
    return [m for m in measurements if (m.configuration, m.scenario) == (configuration, scenario)]


def print_summary(measurements: list[Measurement], scenarios: list[str], rounds: int) -> None:
    print(f"\nmedians over {rounds} round(s), in seconds; total and evaluation with their range")
    columns = ["queue", "setup", "training", "upload", "wall", "outside", "ratio"]
    header = f"{'configuration':<13} {'scenario':<16} {'total':>18} {'evaluation':>18}"
    header += "".join(f" {c:>8}" for c in columns)
    print(header)
    print("-" * len(header))
    for configuration in CONFIGURATIONS:
        for scenario in scenarios:
            jobs = select(measurements, configuration, scenario)
            line = f"{configuration:<13} {scenario:<16} {spread([m.total for m in jobs]):>18} "
            line += f"{spread([m.figure('evaluation') for m in jobs]):>18}"
            for column in columns:
                median = statistics.median(m.figure(column) for m in jobs)
                line += f" {median:8.2f}" if column == "ratio" else f" {median:8.1f}"
            print(line)


def print_comparison(measurements: list[Measurement], scenarios: list[str]) -> None:
    print("\nkept / not kept, medians of this run")
    for scenario in scenarios:
        parts = []
        for figure in ("evaluation", "total"):
            kept, not_kept = (
                statistics.median(m.figure(figure) for m in select(measurements, c, scenario))
                for c in CONFIGURATIONS
            )
            parts.append(
                f"{figure} {kept:.1f} / {not_kept:.1f} s = {kept / not_kept:.2f} "
                f"({kept - not_kept:+.1f} s)"
            )
        print(f"  {scenario:<16} " + "; ".join(parts))


def check_targets(measurements: list[Measurement]) -> bool:
    """Issue 18's targets on every warm 40-row job of the kept configuration."""
    print()
    met = True
    for scenario in WARM_SCENARIOS:
        jobs = select(measurements, "kept", scenario)
        if not jobs:
            print(f"(no {scenario} 40-row job measured: no target checked)")
            continue
        worst_ratio = max(m.ratio for m in jobs)
        worst_outside = max(m.outside for m in jobs)
        for ok, line in (
            (
                worst_ratio <= TARGET_RATIO,
                f"total <= {TARGET_RATIO:g} x training: largest ratio {worst_ratio:.2f}",
            ),
            (
                worst_outside <= TARGET_OUTSIDE_SECONDS,
                f"total - training <= {TARGET_OUTSIDE_SECONDS:g} s: largest {worst_outside:.1f} s",
            ),
        ):
            print(f"{'PASS' if ok else 'MISS'} kept, {scenario}: {line} ({len(jobs)} job(s))")
            met = met and ok
    return met


# --- main ---------------------------------------------------------------------------------------


def measure(args, work: Path) -> bool:
    print_header(args)
    model_cache = Path(args.model_cache).resolve() if args.model_cache else work / "models"
    model_cache.mkdir(parents=True, exist_ok=True)
    print(f"model cache {model_cache} ready in {prepare_model_cache(model_cache):.1f} s\n")

    measurements: list[Measurement] = []
    for round_number in range(1, args.rounds + 1):
        order = list(CONFIGURATIONS)
        if round_number % 2 == 0:
            order.reverse()
        for configuration in order:
            folder = work / f"{configuration.replace(' ', '-')}-{round_number}"
            measurements += measure_stack(
                configuration, round_number, folder, model_cache, args.medium, not args.medium_only
            )
            shutil.rmtree(folder, ignore_errors=True)  # a stack's home takes ~1 GB

    warm = [] if args.medium_only else list(WARM_SCENARIOS)
    scenarios = [COLD, *warm] + ([MEDIUM] if args.medium else [])
    print_summary(measurements, scenarios, args.rounds)
    print_comparison(measurements, scenarios)
    return check_targets(measurements)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=2, help="stacks per configuration")
    parser.add_argument(
        "--no-medium", dest="medium", action="store_false", help="skip the 400-row job"
    )
    parser.add_argument(
        "--medium-only",
        action="store_true",
        help="on each stack only the cold 40-row job, then the 400-row one",
    )
    parser.add_argument("--out", help="also write everything printed to this file")
    parser.add_argument(
        "--model-cache",
        help="a model cache to use and keep (e.g. .loft/models); default: a temporary one",
    )
    args = parser.parse_args()
    # A SIGTERM (from `timeout`, say) unwinds like Ctrl-C: the stacks stop and the files go.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    work = Path(tempfile.mkdtemp(prefix="loft-bench-iteration-"))
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(shutil.rmtree, work, ignore_errors=True)
        if args.out:
            out = cleanup.enter_context(open(args.out, "w"))  # noqa: SIM115
            cleanup.enter_context(contextlib.redirect_stdout(Tee(sys.stdout, out)))
        return 0 if measure(args, work) else 1


if __name__ == "__main__":
    sys.exit(main())
