"""Serving throughput: 16 clients streaming chat completions from 8 adapters of one base, with
the batched engine and with the same requests answered one at a time.

    .venv/bin/python bench/serve.py                 # 2 rounds, each mode once per round
    .venv/bin/python bench/serve.py --rounds 1 --model-cache .loft/models
    .venv/bin/python bench/serve.py --out           # also bench/results/serve-DATE-COMMIT.txt

The bench starts a stack of its own in a temporary LOFT_HOME (deleted at the end) from
loft/stack.py's pieces, not make run's supervisor, because it restarts the inference worker
with another environment between modes: the embedded services, migrations and ``bootstrap``,
the web server (``web_child``: make run's gunicorn) and one inference worker (``worker_child``),
no training worker. The organization's inference limits are lifted for the run
(``LOFT_INFERENCE_CONCURRENT_PER_ORG=64``, ``LOFT_INFERENCE_TOKENS_PER_MINUTE_PER_ORG=0``), so
that only the engine is measured.

Eight LoRA adapters (random weights, full precision; Loft's default shape, rank 16 on every
linear layer, or with ``--adapter-shape small`` rank 4 on q_proj and v_proj, as tests/helpers.py
``random_adapter``) are built on the bundled base and registered for the bench's organization
straight through Django, their folders uploaded as a job's would be.

Each round runs both modes, in alternating order (so that neither always runs first):

    batched        LOFT_INFERENCE_BATCH_ROWS=32 (the default): requests share the running batch
    one at a time  LOFT_INFERENCE_BATCH_ROWS=1: the worker answers one request, then the next

Before each mode the inference worker is restarted with that setting and warmed up: one
request that loads the base, then one short request per adapter, so that no measured request
waits for an adapter's download (``--cold-adapters``: the one request only). Then 16 clients
(threads, the official ``openai`` client, ``stream=True``) start together, client i on adapter
i mod 8, each asking for a long story on its own topic, 64 new tokens, greedy
(``temperature=0``). For each mode: generated tokens/s (the completion tokens of all 16 over
the round's wall time, first request sent to last answer read), p50 and p95 time to first token
(request sent to first content), the answers that stopped before 64 tokens; and whether each
greedy answer is the same text in both modes, request by request.

Targets (issue 19): batched >= 3x the one-at-a-time throughput (medians over the rounds), and
p95 time to first token < 1 s batched (over every round's requests). Exit status 1 on a miss,
on a failed request, or on answers that differ between the modes.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import logging
import os
import platform
import secrets
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import psutil
from openai import OpenAI

PROJECT_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_DIR))

from bench.api_load import setup_django  # noqa: E402
from bench.iteration import Tee, commit, create_api_key, prepare_model_cache  # noqa: E402
from loft.embedded import Child, EmbeddedStack, free_port, wait_until  # noqa: E402
from loft.stack import manage, web_child, worker_child  # noqa: E402

CLIENTS = 16
ADAPTERS = 8
NEW_TOKENS = 64
MODES = {"batched": "32", "one at a time": "1"}  # name → LOFT_INFERENCE_BATCH_ROWS
# Batched, with the clients arriving one every STAGGER seconds instead of all at once: each joins
# a batch that is already running, which is what its time to first token is judged on.
JOINING = "joining"
STAGGER = 0.25
TOPICS = [
    "a lighthouse keeper who finds a map",
    "a city built on the back of a whale",
    "the last train out of a mountain town",
    "a robot learning to bake bread",
    "two rival gardeners and a storm",
    "a library that rearranges itself at night",
    "a detective who cannot remember faces",
    "a village where it always snows in July",
    "a violin found in an attic",
    "a ship's cat on its first voyage",
    "a clockmaker who repairs time",
    "a kite that will not come down",
    "a market that only opens at midnight",
    "an astronaut's letter home",
    "a fox who runs a bakery",
    "the oldest tree in the forest",
]
# The stack's settings for the run: the organization's limits lifted (only the engine is
# measured), and a request given time to wait for a cold worker and for 15 requests before it.
STACK_SETTINGS = {
    "LOFT_INFERENCE_CONCURRENT_PER_ORG": "64",
    "LOFT_INFERENCE_TOKENS_PER_MINUTE_PER_ORG": "0",
    "LOFT_INFERENCE_TIMEOUT_SECONDS": "600",
    "LOFT_INFERENCE_ADAPTERS": str(ADAPTERS),
}
READY_TIMEOUT_SECONDS = 180
WARM_UP_TIMEOUT_SECONDS = 600
TARGET_RATIO = 3.0
TARGET_P95_TTFT_SECONDS = 1.0


@dataclass
class Answer:
    client: int
    model: str
    sent: float = 0.0  # time.perf_counter()
    first: float | None = None  # the first content
    ended: float = 0.0
    text: str = ""
    finish_reason: str | None = None
    completion_tokens: int = 0
    error: str = ""

    @property
    def ttft(self) -> float:
        return (self.first or self.ended) - self.sent


@dataclass
class Round:
    mode: str
    number: int
    answers: list[Answer] = field(default_factory=list)
    wall: float = 0.0

    @property
    def tokens(self) -> int:
        return sum(a.completion_tokens for a in self.answers)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.wall

    @property
    def failed(self) -> list[Answer]:
        return [a for a in self.answers if a.error]


# --- the machine ----------------------------------------------------------------------------


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def accelerator() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda})"
    return "no GPU: the inference worker runs on the CPU"


def print_header(args) -> None:
    versions = ", ".join(
        f"{name} {importlib.metadata.version(name)}"
        for name in ("torch", "transformers", "peft", "openai")
    )
    memory = psutil.virtual_memory().total / 2**30
    print(f"bench/serve.py, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; Loft {commit()}")
    print(
        f"{cpu_model()}; {psutil.cpu_count(logical=False)} cores, {psutil.cpu_count()} CPUs, "
        f"{memory:.0f} GiB; {accelerator()}"
    )
    print(f"{platform.platform()}; Python {platform.python_version()}; {versions}")
    print(
        f"{args.rounds} round(s), modes interleaved; {CLIENTS} streaming clients over "
        f"{ADAPTERS} random LoRA adapters of the bundled base (full precision; "
        + (
            "rank 4 on q/v), "
            if args.adapter_shape == "small"
            else "Loft's default shape: rank 16 on every linear layer), "
        )
        + f"{NEW_TOKENS} new tokens each, greedy; warm-up: "
        + ("one request" if args.cold_adapters else "one request, then one per adapter")
    )
    print()


# --- the stack ------------------------------------------------------------------------------


class Stack:
    """The embedded services, the web server and one inference worker, in ``home``; the worker
    restarts with another LOFT_INFERENCE_BATCH_ROWS."""

    def __init__(self, work: Path, model_cache: Path):
        self.work = work
        self.home = work / "home"
        self.home.mkdir(parents=True)
        # Loft has no setting for its model cache: it is always $LOFT_HOME/models.
        (self.home / "models").symlink_to(model_cache, target_is_directory=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.services = EmbeddedStack(self.home, persistent=False)
        self.env: dict[str, str] = {}
        self.web: Child | None = None
        self.inference: Child | None = None

    def start(self) -> None:
        print(f"starting a stack in {self.home} …")
        started = time.monotonic()
        self.env = {
            **os.environ,
            **self.services.start(),
            **STACK_SETTINGS,
            "LOFT_HOME": str(self.home),
            "LOFT_METRICS_TOKEN": secrets.token_urlsafe(24),
            "TQDM_DISABLE": "1",
        }
        manage(self.env, "migrate", "--noinput", "-v", "0")
        manage(self.env, "bootstrap")
        self.web = web_child(self.env, "127.0.0.1", self.port, self.home)
        self.web.log_path = self.work / "web.log"
        self.web.start()
        wait_until(
            lambda: urllib.request.urlopen(f"{self.url}/healthz", timeout=5).status == 200,  # noqa: S310
            READY_TIMEOUT_SECONDS,
            "the web server",
            self.web,
        )
        print(f"stack ready at {self.url} in {time.monotonic() - started:.0f} s")

    def start_inference(self, batch_rows: str) -> None:
        if self.inference is not None:
            self.inference.stop()
        env = {**self.env, "LOFT_INFERENCE_BATCH_ROWS": batch_rows}
        self.inference = worker_child(
            env, "inference", env.get("LOFT_INFERENCE_QUEUE", "inference")
        )
        self.inference.log_path = self.work / "inference.log"
        self.inference.start()

    def stop(self) -> None:
        for child in (self.inference, self.web):
            if child is not None:
                child.stop()
        self.services.stop()

    def print_logs(self, lines: int = 40) -> None:
        for child in (self.web, self.inference):
            if child is not None and child.tail(lines):
                print(f"--- the last {lines} lines of {child.name}'s log ---")
                print(child.tail(lines))
        print("---")


# --- the adapters ---------------------------------------------------------------------------


def build_adapters(home: Path, count: int, shape: str = "default") -> tuple[list[str], float]:
    """``count`` random LoRA adapters of the bundled base for the organization "bench" (made by
    create_api_key), registered and uploaded as a finished job's would be; their ids, and the
    seconds it took. ``shape`` "small": rank 4 on q/v (tests/helpers.py random_adapter);
    "default": the shape Loft trains by default, rank 16 (alpha 32) on every linear layer."""
    import torch
    from peft import LoraConfig, get_peft_model

    from engine import artifacts
    from engine.base_models import load_base_model
    from jobs.models import Adapter, BaseModel
    from loft import storage
    from loft.models import Organization
    from tests.helpers import SMOLLM2, random_adapter

    started = time.monotonic()
    org = Organization.objects.get(slug="bench")
    base = BaseModel.seed_bundled()
    ids = []
    for number in range(count):
        folder = home / "bench-adapters" / f"serve-{number}"
        torch.manual_seed(number)  # the LoRA weights are drawn from torch's generator
        if shape == "small":
            random_adapter(home / "models", folder)
        else:
            config = LoraConfig(
                r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False
            )
            base_model = load_base_model(SMOLLM2, home / "models", "none", "cpu")
            get_peft_model(base_model, config).save_pretrained(folder)
        adapter = Adapter(
            org=org, name=f"ft:{base.name}:{org.slug}:serve-{number}:bench", base_model=base
        )
        adapter.s3_prefix = f"orgs/{org.id}/adapters/{adapter.id}/"
        adapter.manifest = artifacts.build_manifest(folder)
        storage.upload_folder(folder, adapter.s3_prefix, adapter.manifest)
        adapter.size_bytes = adapter.manifest["total_bytes"]
        adapter.save()
        ids.append(adapter.id)
    return ids, time.monotonic() - started


# --- the clients ----------------------------------------------------------------------------


def client_for(url: str, key: str) -> OpenAI:
    # No retries: a refused or failed request is a finding, not something to hide.
    return OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=900)


def ask(client: OpenAI, answer: Answer, prompt: str, max_tokens: int = NEW_TOKENS) -> None:
    answer.sent = time.perf_counter()
    try:
        stream = client.chat.completions.create(
            model=answer.model,
            messages=[{"role": "user", "content": prompt}],
            max_tokens=max_tokens,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        pieces = []
        for chunk in stream:
            for choice in chunk.choices:
                if choice.delta.content:
                    if answer.first is None:
                        answer.first = time.perf_counter()
                    pieces.append(choice.delta.content)
                answer.finish_reason = choice.finish_reason or answer.finish_reason
            if chunk.usage:
                answer.completion_tokens = chunk.usage.completion_tokens
        answer.text = "".join(pieces)
    except Exception as error:  # noqa: BLE001 - every failure is reported, by client
        answer.error = f"{type(error).__name__}: {error}"
    answer.ended = time.perf_counter()


def prompt_of(client: int) -> str:
    return f"Write a long story about {TOPICS[client % len(TOPICS)]}."


def warm_up(url: str, key: str, adapters: list[str], every_adapter: bool) -> float:
    """One request (it waits for the worker to start and load the base), then one short request
    per adapter; the seconds it took. A failure ends the bench."""
    started = time.monotonic()
    client = client_for(url, key)
    for model in adapters if every_adapter else adapters[:1]:
        answer = Answer(-1, model)
        ask(client, answer, "Say hello.", max_tokens=2)
        if answer.error:
            raise SystemExit(f"the warm-up request to {model} failed: {answer.error}")
    return time.monotonic() - started


def run_round(
    url: str, key: str, adapters: list[str], mode: str, number: int, stagger: float = 0.0
) -> Round:
    """CLIENTS threads, each streaming one answer: released together, or client i ``stagger``
    × i seconds after the first (each then joins a batch that is already running)."""
    result = Round(mode, number)
    result.answers = [Answer(i, adapters[i % len(adapters)]) for i in range(CLIENTS)]
    clients = [client_for(url, key) for _ in range(CLIENTS)]
    start = threading.Barrier(CLIENTS + 1)

    def client_thread(i: int) -> None:
        start.wait()
        time.sleep(stagger * i)
        ask(clients[i], result.answers[i], prompt_of(i))

    threads = [threading.Thread(target=client_thread, args=(i,)) for i in range(CLIENTS)]
    for thread in threads:
        thread.start()
    start.wait()
    began = time.perf_counter()
    for thread in threads:
        thread.join()
    result.wall = max(a.ended for a in result.answers) - began
    return result


# --- the report -----------------------------------------------------------------------------


def percentile(values: list[float], p: int) -> float:
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[p - 1]


def print_round(r: Round) -> None:
    ttfts = [a.ttft for a in r.answers if not a.error]
    short = [a for a in r.answers if not a.error and a.finish_reason != "length"]
    line = (
        f"  {r.mode:<13} {r.tokens:5d} tokens in {r.wall:6.2f} s = {r.tokens_per_second:7.1f} "
        f"tok/s; TTFT p50 {percentile(ttfts, 50):6.3f} s, p95 {percentile(ttfts, 95):6.3f} s"
        if ttfts
        else f"  {r.mode:<13} every request failed"
    )
    if short:
        line += f"; {len(short)} stopped early ({', '.join(str(a.finish_reason) for a in short)})"
    print(line)
    for answer in r.failed:
        print(f"    client {answer.client} ({answer.model}) failed: {answer.error}")


def compare_outputs(rounds: list[Round]) -> bool:
    """Each request's greedy answer in every round of both modes against the first batched
    one; prints the verdict and the first difference of each request that differs."""
    reference = next(r for r in rounds if r.mode == "batched")
    same = True
    for r in rounds:
        if r is reference:
            continue
        differing = [
            (mine, theirs)
            for mine, theirs in zip(r.answers, reference.answers, strict=True)
            if mine.text != theirs.text
        ]
        print(
            f"  round {r.number} {r.mode} vs round {reference.number} batched: "
            f"{CLIENTS - len(differing)}/{CLIENTS} answers identical"
        )
        for mine, theirs in differing[:4]:
            at = next(
                (i for i, (a, b) in enumerate(zip(mine.text, theirs.text, strict=False)) if a != b),
                min(len(mine.text), len(theirs.text)),
            )
            print(
                f"    client {mine.client}: from character {at}: "
                f"{mine.text[at : at + 30]!r} vs {theirs.text[at : at + 30]!r}"
            )
        same = same and not differing
    return same


def summarize(rounds: list[Round]) -> bool:
    """Medians over the rounds, the ratio, the targets; True when every target is met."""
    by_mode = {mode: [r for r in rounds if r.mode == mode] for mode in [*MODES, JOINING]}
    print(f"\nover {len(by_mode['batched'])} round(s)")
    throughput, p95 = {}, {}
    for mode, runs in by_mode.items():
        ttfts = [a.ttft for r in runs for a in r.answers if not a.error]
        throughput[mode] = statistics.median(r.tokens_per_second for r in runs)
        p95[mode] = percentile(ttfts, 95) if ttfts else float("inf")
        spread = ", ".join(f"{r.tokens_per_second:.1f}" for r in runs)
        print(
            f"  {mode:<13} {throughput[mode]:7.1f} tok/s (median; rounds: {spread}); "
            f"TTFT p50 {percentile(ttfts, 50) if ttfts else float('inf'):.3f} s, "
            f"p95 {p95[mode]:.3f} s (all {len(ttfts)} requests)"
        )
    ratio = throughput["batched"] / throughput["one at a time"]
    by_mode.pop(JOINING)
    per_round = ", ".join(
        f"{b.tokens_per_second / o.tokens_per_second:.2f}"
        for b, o in zip(by_mode["batched"], by_mode["one at a time"], strict=True)
    )
    print(f"  ratio batched / one at a time: {ratio:.2f} (rounds: {per_round})")

    print("\ngreedy answers, batched against one at a time (and round against round)")
    same = compare_outputs(rounds)

    print()
    met = True
    for ok, line in (
        (ratio >= TARGET_RATIO, f"throughput batched >= {TARGET_RATIO:g}x: {ratio:.2f}x"),
        (
            p95[JOINING] < TARGET_P95_TTFT_SECONDS,
            f"p95 TTFT of requests joining the running batch < {TARGET_P95_TTFT_SECONDS:g} s: "
            f"{p95[JOINING]:.3f} s",
        ),
    ):
        print(f"{'PASS' if ok else 'MISS'} {line}")
        met = met and ok
    print(
        f"note: p95 TTFT of {CLIENTS} requests arriving at once, the batch starting: "
        f"{p95['batched']:.3f} s (their {CLIENTS} prompts are prefilled before any first token)"
    )
    failed = sum(len(r.failed) for r in rounds)
    if failed:
        print(f"FAIL {failed} request(s) failed")
    if not same:
        print("FAIL the greedy answers differ between runs")
    return met and same and not failed


# --- main -----------------------------------------------------------------------------------


def measure(args, work: Path) -> bool:
    print_header(args)
    model_cache = Path(args.model_cache).resolve() if args.model_cache else work / "models"
    model_cache.mkdir(parents=True, exist_ok=True)
    print(f"model cache {model_cache} ready in {prepare_model_cache(model_cache):.1f} s")

    stack = Stack(work, model_cache)
    try:
        stack.start()
        key = create_api_key(stack.home)
        setup_django(stack.home, own_stack=True)
        for name in ("httpx", "httpx2", "openai"):  # a line per request would bury the report
            logging.getLogger(name).setLevel(logging.WARNING)
        adapters, seconds = build_adapters(stack.home, ADAPTERS, args.adapter_shape)
        print(f"{len(adapters)} adapters built and uploaded in {seconds:.1f} s\n")
        if args.dry_run:
            stack.start_inference(MODES["batched"])
            print(f"dry run: warm-up answered in {warm_up(stack.url, key, adapters, True):.1f} s")
            return True

        rounds: list[Round] = []
        for number in range(1, args.rounds + 1):
            order = list(MODES) if number % 2 else list(MODES)[::-1]
            print(f"round {number}")
            for mode in order:
                stack.start_inference(MODES[mode])
                warmed = warm_up(stack.url, key, adapters, not args.cold_adapters)
                print(f"  ({mode}: worker restarted, warmed up in {warmed:.1f} s)")
                result = run_round(stack.url, key, adapters, mode, number)
                print_round(result)
                rounds.append(result)
                if mode == "batched":  # the same worker: clients arriving while it answers
                    joining = run_round(stack.url, key, adapters, JOINING, number, STAGGER)
                    print_round(joining)
                    rounds.append(joining)
        return summarize(rounds)
    except BaseException:
        stack.print_logs()
        raise
    finally:
        stack.stop()


def default_out() -> Path:
    return PROJECT_DIR / "bench" / "results" / f"serve-{datetime.now(UTC):%Y-%m-%d}-{commit()}.txt"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=2, help="rounds, each running both modes")
    parser.add_argument(
        "--out",
        nargs="?",
        const="",
        help="also write everything printed to this file "
        "(no value: bench/results/serve-DATE-COMMIT.txt)",
    )
    parser.add_argument(
        "--model-cache",
        help="a model cache to use and keep (e.g. .loft/models); default: a temporary one",
    )
    parser.add_argument(
        "--adapter-shape",
        choices=["small", "default"],
        default="default",
        help="small: rank 4 on q/v; default: Loft's default shape, rank 16 on every linear layer",
    )
    parser.add_argument(
        "--cold-adapters",
        action="store_true",
        help="warm up with one request only: the first requests to each adapter download it",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="start the stack, build the adapters, warm the worker up, measure nothing",
    )
    args = parser.parse_args()
    # A SIGTERM (from `timeout`, say) unwinds like Ctrl-C: the stack stops and the files go.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    os.environ["TQDM_DISABLE"] = "1"  # transformers' progress bars would fill the report
    # The bench's stack is its own: services configured in this shell are not used.
    for name in [
        n for n in os.environ if n.startswith(("DATABASE_URL", "CELERY_", "REDIS_", "S3_"))
    ]:
        del os.environ[name]

    work = Path(tempfile.mkdtemp(prefix="loft-bench-serve-"))
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(shutil.rmtree, work, ignore_errors=True)
        if args.out is not None:
            out_path = Path(args.out) if args.out else default_out()
            out = cleanup.enter_context(open(out_path, "w"))  # noqa: SIM115
            cleanup.enter_context(contextlib.redirect_stdout(Tee(sys.stdout, out)))
        return 0 if measure(args, work) else 1


if __name__ == "__main__":
    sys.exit(main())
