"""Read latency of the fine-tuning jobs API under load: 32 keep-alive clients, 1,000 jobs.

    .venv/bin/python bench/api_load.py          # starts its own stack (make run's supervisor)
    .venv/bin/python bench/api_load.py --url http://127.0.0.1:8000 --loft-home .loft   # a running
        # one: 1,000 jobs go into a new organization in its database, deleted at the end
    .venv/bin/python bench/api_load.py --url http://127.0.0.1:8000 --key sk-loft-…   # a running
        # one, measured on that key's tenant as it is (nothing written)

The jobs are written straight into the database with the ORM, finished (mostly succeeded, each
with its adapter, some failed or cancelled): through the API the concurrent-jobs quota would
refuse them and a worker would train them. Each client is a thread with its own HTTP/1.1
keep-alive connection (``--processes`` spreads them over processes); every scenario runs
``--seconds`` after a warm-up, and once more with a single client for the service time alone.
The baseline, measured in the same run, is ``GET /v1/models/{base model}``: the same key
authentication and middleware, one small query. (``GET /v1/models`` lists the tenant's
adapters too, so it grows with the tenant; it is measured as a scenario of its own.)
Scenarios run in turn, ``--rounds`` times (interleaved, so that a busy moment of the machine
falls on all of them), and each scenario's requests are pooled over the rounds.
Prints requests/s, p50/p95/p99/max latency, p95 against the baseline's, the queries a request
makes, and where the CPU went (the clients share the machine with the server).
Targets (issue 16), as p95 against the baseline's in the same run: the jobs list's first page
and a job's retrieve within 1.5x, ``limit=100`` and the deep page within 3x, ``GET /v1/models``
with a thousand adapters within 2x. Exit status 1 on a non-200 answer or a miss.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import multiprocessing
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections import Counter
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import django
import psutil
import rest_framework

PROJECT_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_DIR))

from bench.upload import start_stack, web_pids  # noqa: E402
from loft.embedded import free_port  # noqa: E402

SINGLE_CLIENT_SECONDS = 2.0
SUFFIXES = ["support-bot", "sql-gen", "triage", "summarise", "", "legal-qa", "tone"]
ADAPTER_FILES = {
    "adapter_model.safetensors": 18_874_368,
    "adapter_config.json": 812,
    "tokenizer.json": 2_104_424,
    "tokenizer_config.json": 3_764,
    "special_tokens_map.json": 655,
    "chat_template.jinja": 433,
    "training_config.json": 402,
    "README.md": 1_874,
}


@dataclass
class Scenario:
    name: str
    paths: list[str]  # each request takes one at random
    target: float | None = None  # the largest p95 allowed, as a multiple of the baseline's


@dataclass
class Result:
    latencies: list[float] = field(default_factory=list)  # ms
    errors: Counter = field(default_factory=Counter)
    client_cpu: float = 0.0  # seconds of the clients' processes within the measured window
    seconds: float = 0.0

    def merge(self, other: Result) -> None:
        self.latencies += other.latencies
        self.errors += other.errors
        self.client_cpu += other.client_cpu
        self.seconds = max(self.seconds, other.seconds)

    def percentile(self, p: int) -> float:
        return statistics.quantiles(self.latencies, n=100, method="inclusive")[p - 1]


# --- seeding ------------------------------------------------------------------------------------


def setup_django(home: Path, own_stack: bool) -> None:
    """Django in this process, on the stack's database (settings read ``$LOFT_HOME/env``)."""
    if own_stack:  # the URLs are the ones our stack wrote, whatever this shell exports
        for name in [n for n in os.environ if n.startswith(("DATABASE_URL", "CELERY_", "REDIS_"))]:
            del os.environ[name]
    os.environ["LOFT_HOME"] = str(home)
    os.environ["DJANGO_SETTINGS_MODULE"] = "loft.settings"
    import django

    django.setup()


def seed_tenant(jobs: int, rng: random.Random) -> tuple[str, str]:
    """A new organization with ``jobs`` finished jobs, an adapter for each succeeded one, one
    processed training file, spread over the last 90 days. Returns (organization id, API key)."""
    from dataclasses import asdict

    from django.db import connection, transaction
    from django.utils import timezone

    from engine.hyperparameters import TrainConfig
    from jobs import preflight
    from jobs.models import Adapter, BaseModel, File, FineTuneJob
    from loft.models import ApiKey, Organization

    with transaction.atomic():
        slug = f"bench-api-{os.urandom(4).hex()}"
        org = Organization.objects.create(name=slug, slug=slug)
        _, secret = ApiKey.issue(org, name="bench/api_load.py")
        base_model = BaseModel.seed_bundled()
        training_file = File.objects.create(
            org=org,
            filename="support-chats.jsonl",
            purpose=File.Purpose.FINE_TUNE,
            bytes=4_812_331,
            sha256=os.urandom(32).hex(),
            s3_key=f"orgs/{org.id}/files/bench/support-chats.jsonl",
            status=File.Status.PROCESSED,
            rows=12_000,
            tokens=1_650_000,
            format="chat",
            file_type="jsonl",
            report={"tokens_per_row": {"max": 40}},
        )
        config = TrainConfig()
        plan = preflight.plan(config, base_model, training_file, None).as_dict()
        hyperparameters = asdict(config)
        now = timezone.now()
        rows, adapters = [], []
        for number in range(jobs):
            created = now - timedelta(seconds=(jobs - number) * 90 * 86400 / jobs)
            started = created + timedelta(seconds=rng.uniform(1, 120))
            seconds = rng.uniform(60, 3600)
            status = rng.choices(["succeeded", "failed", "cancelled"], [85, 10, 5])[0]
            steps = plan["steps"] if status == "succeeded" else rng.randint(1, plan["steps"])
            loss = round(rng.uniform(0.6, 1.8), 4)
            job = FineTuneJob(
                org=org,
                base_model=base_model,
                training_file=training_file,
                method=config.method,
                requested_hyperparameters={"n_epochs": "auto", "lora_rank": config.lora_rank},
                hyperparameters=hyperparameters,
                seed=config.seed,
                suffix=rng.choice(SUFFIXES),
                status=status,
                attempt=1,
                worker="worker@gpu-a10-1",
                heartbeat_at=started + timedelta(seconds=seconds),
                progress={
                    "step": steps,
                    "total_steps": plan["steps"],
                    "epoch": round(steps / plan["steps"], 3),
                    "loss": loss,
                    "learning_rate": 2e-6,
                    "tokens_per_second": round(rng.uniform(2000, 9000), 1),
                    "eta_seconds": 0.0 if status == "succeeded" else seconds,
                    "trained_tokens": steps * plan["tokens_per_step"],
                },
                metrics={
                    "train_loss": loss,
                    "validation_loss": round(loss + rng.uniform(0.01, 0.2), 4),
                    "steps": steps,
                    "resumed_from_step": 0,
                    "trained_tokens": steps * plan["tokens_per_step"],
                    "seconds": round(seconds, 2),
                }
                if status == "succeeded"
                else {},
                error={"code": "out_of_memory", "message": "CUDA out of memory.", "param": None}
                if status == "failed"
                else None,
                trained_tokens=steps * plan["tokens_per_step"],
                compute_seconds=seconds,
                metadata={"team": rng.choice(["search", "support", "legal"]), "run": str(number)},
                plan=plan,
            )
            job.created_at, job.started_at = created, started
            job.finished_at = started + timedelta(seconds=seconds)
            rows.append(job)
            if status == "succeeded":
                adapter = Adapter(org=org, job=job, base_model=base_model, metrics=job.metrics)
                adapter.name = f"ft:{base_model.name}:{org.slug}:{job.suffix}:{job.id}"
                adapter.s3_prefix = f"orgs/{org.id}/adapters/{adapter.id}/"
                adapter.manifest = {
                    "files": {
                        name: {"sha256": os.urandom(32).hex(), "bytes": size}
                        for name, size in ADAPTER_FILES.items()
                    },
                    "total_bytes": sum(ADAPTER_FILES.values()),
                }
                adapter.size_bytes = adapter.manifest["total_bytes"]
                adapter.created_at = job.finished_at
                adapters.append(adapter)
        # created_at is auto_now_add: bulk_create stamps "now" on each object, the update puts
        # the times back.
        for model, objects in ((FineTuneJob, rows), (Adapter, adapters)):
            created = [o.created_at for o in objects]
            model.objects.bulk_create(objects, batch_size=500)
            for o, moment in zip(objects, created, strict=True):
                o.created_at = moment
            model.objects.bulk_update(objects, ["created_at"], batch_size=500)
    # Statistics as autovacuum keeps them: until it has analysed the fresh rows, PostgreSQL
    # believes the organization has a handful of jobs, sorts all 1,000 for every page (8 ms
    # instead of 0.2 ms) and the bench would measure the seeding, not the API.
    with connection.cursor() as cursor:
        for table in (FineTuneJob._meta.db_table, Adapter._meta.db_table):
            cursor.execute(f"VACUUM ANALYZE {table}")
    return org.id, secret


def query_counts(key: str, paths: dict[str, str]) -> dict[str, int]:
    """SQL queries one request makes, in this process through the whole middleware stack
    (Django's per-request connection health check, a ``SELECT 1``, is not counted)."""
    from django.conf import settings
    from django.db import connection
    from django.test import Client
    from django.test.utils import CaptureQueriesContext

    client = Client(HTTP_HOST=settings.ALLOWED_HOSTS[0], HTTP_AUTHORIZATION=f"Bearer {key}")
    counts = {}
    for name, path in paths.items():
        client.get(path)  # the key's last-use write, once a minute, is not part of the figure
        with CaptureQueriesContext(connection) as queries:
            response = client.get(path)
        if response.status_code != 200:
            raise SystemExit(f"in-process GET {path}: {response.status_code}")
        counts[name] = len(queries)
    return counts


# --- load ---------------------------------------------------------------------------------------


def get(connection: http.client.HTTPConnection, path: str, key: str) -> tuple[int, bytes]:
    connection.request("GET", path, headers={"Authorization": f"Bearer {key}"})
    response = connection.getresponse()
    return response.status, response.read()


def drive(
    url: str, key: str, paths: list[str], clients: int, start: float, warmup: float, seconds: float
) -> Result:
    """``clients`` threads, each with one keep-alive connection, GET a random one of ``paths``
    back to back from ``start`` (a time.time()) on; the requests that begin in the window after
    the warm-up count. Runs in the calling process (or a pool process)."""
    parsed = urllib.parse.urlsplit(url)
    begin, end = start + warmup, start + warmup + seconds
    result = Result(seconds=seconds)
    lock = threading.Lock()

    def client(number: int) -> None:
        rng = random.Random(number)  # noqa: S311 - which job to read, not a secret
        latencies, errors = [], Counter()
        connection = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=60)
        time.sleep(max(0.0, start - time.time()))
        while (now := time.time()) < end:
            path = rng.choice(paths)
            started = time.perf_counter()
            try:
                status, body = get(connection, path, key)
            except (OSError, http.client.HTTPException) as error:
                status, body = 0, type(error).__name__.encode()
                connection.close()
            elapsed = (time.perf_counter() - started) * 1000
            if now >= begin:
                latencies.append(elapsed)
                if status != 200:
                    errors[f"{status} {body[:200].decode(errors='replace')}"] += 1
        connection.close()
        with lock:
            result.latencies.extend(latencies)
            result.errors.update(errors)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    for thread in threads:
        thread.start()
    me = psutil.Process()
    time.sleep(max(0.0, begin - time.time()))
    cpu_before = sum(me.cpu_times()[:2])
    time.sleep(max(0.0, end - time.time()))
    result.client_cpu = sum(me.cpu_times()[:2]) - cpu_before
    for thread in threads:
        thread.join()
    return result


class CpuMeter:
    """CPU seconds of process trees (a server and its workers), and of the whole machine, over
    a window. Workers and database backends come and go: a tree's figure is what its live
    processes used plus what its ended ones did (counted in their parent once it reaped them)."""

    def __init__(self, roots: dict[str, psutil.Process]):
        self.roots = roots

    def _sample(self) -> dict[str, float]:
        sample = {}
        for name, root in self.roots.items():
            sample[name] = 0.0
            for process in [root, *root.children(recursive=True)]:
                with contextlib.suppress(psutil.NoSuchProcess):
                    sample[name] += sum(process.cpu_times()[:4])
        times = psutil.cpu_times()
        sample["machine"] = sum(times) - times.idle - getattr(times, "iowait", 0.0)
        return sample

    def start(self) -> None:
        self.before = self._sample()

    def stop(self) -> dict[str, float]:
        after = self._sample()
        return {name: after[name] - self.before[name] for name in after}


def run_scenario(
    pool, url: str, key: str, scenario: Scenario, args, meter: CpuMeter
) -> tuple[Result, dict[str, float]]:
    start = time.time() + (1.0 if pool else 0.1)  # time for the pool to start every process
    shares = [
        args.clients // args.processes + (i < args.clients % args.processes)
        for i in range(args.processes)
    ]
    jobs = [(url, key, scenario.paths, n, start, args.warmup, args.seconds) for n in shares]
    cpu: dict[str, float] = {}
    timers = [
        threading.Timer(start + args.warmup - time.time(), meter.start),
        threading.Timer(
            start + args.warmup + args.seconds - time.time(), lambda: cpu.update(meter.stop())
        ),
    ]
    for timer in timers:
        timer.start()
    parts = pool.starmap(drive, jobs) if pool else [drive(*jobs[0])]
    for timer in timers:
        timer.join()
    result = Result()
    for part in parts:
        result.merge(part)
    return result, cpu


def job_ids(url: str, key: str) -> list[str]:
    """Every job id of the tenant, newest first, through the list endpoint's cursor."""
    parsed = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=60)
    ids: list[str] = []
    after = ""
    while True:
        status, body = get(connection, f"/v1/fine_tuning/jobs?limit=100{after}", key)
        if status != 200:
            raise SystemExit(f"GET /v1/fine_tuning/jobs: {status} {body[:300]!r}")
        page = json.loads(body)
        ids += [job["id"] for job in page["data"]]
        if not page["has_more"]:
            return ids
        after = f"&after={page['last_id']}"


def gunicorn_master(port: int) -> psutil.Process:
    """The web server's master. Its workers share its listening socket, and psutil names one
    holder of a shared socket only: a worker, whose parent is then the master."""
    holder = psutil.Process(web_pids(port)[0])
    parent = holder.parent()
    return parent if parent is not None and parent.cmdline() == holder.cmdline() else holder


def gunicorn_shape(master: psutil.Process) -> str:
    argv = master.cmdline()
    if "--workers" not in argv:
        return "the web server"
    workers = argv[argv.index("--workers") + 1]
    threads = argv[argv.index("--threads") + 1] if "--threads" in argv else "1"
    return f"gunicorn {workers} workers x {threads} threads"


def database_server() -> psutil.Process | None:
    """The PostgreSQL server this process's settings name, when it runs on this machine."""
    from django.conf import settings

    port = int(settings.DATABASES["default"].get("PORT") or 5432)
    try:
        return psutil.Process(web_pids(port)[0])
    except SystemExit:
        return None


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", help="a running Loft, e.g. http://127.0.0.1:8000")
    parser.add_argument("--key", help="an API key of that Loft: measure its tenant as it is")
    parser.add_argument("--loft-home", help="that Loft's LOFT_HOME, to seed jobs in its database")
    parser.add_argument("--jobs", type=int, default=1000, help="jobs to seed in the tenant")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--processes", type=int, default=1, help="client processes")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured, per scenario")
    parser.add_argument("--rounds", type=int, default=2, help="times each scenario runs")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds, per scenario")
    args = parser.parse_args()
    args.processes = max(1, min(args.processes, args.clients))

    work = Path(tempfile.mkdtemp(prefix="loft-bench-"))
    stack = pool = None
    seeded_org = None
    try:
        load_before = os.getloadavg()
        if args.url:
            url = args.url.rstrip("/")
        else:
            home, port = work / "home", free_port()
            home.mkdir()
            stack = start_stack(home, port)
            url = f"http://127.0.0.1:{port}"
        seeding = not args.key
        if seeding:
            if args.url:
                home = Path(args.loft_home or os.environ.get("LOFT_HOME", ".loft")).resolve()
            setup_django(home, own_stack=stack is not None)
            started = time.perf_counter()
            seeded_org, key = seed_tenant(args.jobs, random.Random(0))
            seed_seconds = time.perf_counter() - started
        else:
            key = args.key

        ids = job_ids(url, key)
        if len(ids) <= 20:
            raise SystemExit(f"the tenant has {len(ids)} jobs; the bench needs more than 20")
        base, jobs = "/v1/models/HuggingFaceTB/SmolLM2-135M-Instruct", "/v1/fine_tuning/jobs"
        scenarios = [
            Scenario("baseline GET /v1/models/{base}", [base]),
            Scenario("GET /v1/fine_tuning/jobs", [jobs], target=1.5),
            Scenario("GET /v1/fine_tuning/jobs?limit=100", [f"{jobs}?limit=100"], target=3),
            Scenario(
                "GET /v1/fine_tuning/jobs/{id}",
                [f"{jobs}/{i}" for i in ids],
                target=1.5,
            ),
            Scenario("GET …/jobs?after=<deep> (last page)", [f"{jobs}?after={ids[-21]}"], target=3),
            Scenario("GET /v1/models (lists the adapters)", ["/v1/models"], target=2),
        ]
        queries = query_counts(key, {s.name: s.paths[0] for s in scenarios}) if seeding else {}

        server = gunicorn_master(urllib.parse.urlsplit(url).port)
        roots = {"web": server}
        if seeding and (database := database_server()) is not None:
            roots["db"] = database
        meter = CpuMeter(roots)
        if args.processes > 1:
            pool = multiprocessing.get_context("spawn").Pool(args.processes)

        rows = [(scenario, Result(), Result(), Counter()) for scenario in scenarios]
        for _ in range(args.rounds):
            for scenario, loaded, single, cpu in rows:
                single.merge(
                    drive(url, key, scenario.paths, 1, time.time(), 0.5, SINGLE_CLIENT_SECONDS)
                )
                this_round, round_cpu = run_scenario(pool, url, key, scenario, args, meter)
                this_round.seconds += loaded.seconds  # pooled: the rounds' seconds add up
                loaded.merge(this_round)
                cpu.update(round_cpu)

        print_report(args, url, rows, queries, load_before, gunicorn_shape(server), ids)
        if seeding:
            print(f"(seeded {args.jobs} jobs straight into the database in {seed_seconds:.1f} s)")
        answered = all(not r[1].errors and not r[2].errors for r in rows)
        base_p95 = rows[0][1].percentile(95)
        targets_ok = all(r[1].percentile(95) <= r[0].target * base_p95 for r in rows if r[0].target)
        return 0 if answered and targets_ok else 1
    finally:
        if pool is not None:
            pool.close()
            pool.join()
        if seeded_org is not None and stack is None:
            from loft.models import Organization

            Organization.objects.filter(pk=seeded_org).delete()
        if seeded_org is not None:
            from django.db import connections

            connections.close_all()
        if stack is not None:
            stack.send_signal(signal.SIGTERM)
            stack.wait(120)
        shutil.rmtree(work, ignore_errors=True)


def print_report(args, url, rows, queries, load_before, server, ids) -> None:
    cores = psutil.cpu_count()
    commit = subprocess.run(
        ["git", "-C", str(PROJECT_DIR), "describe", "--always", "--dirty"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    print(
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; Loft {commit}; "
        f"{platform.processor() or platform.machine()}, Python {platform.python_version()}, "
        f"Django {django.get_version()}, DRF {rest_framework.VERSION}; "
        f"{args.rounds} round(s), scenarios interleaved"
    )
    print(
        f"Loft {url}: {server}; {len(ids)} jobs in the tenant; {cores} cores, "
        f"load average before {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}"
    )
    print(
        f"{args.clients} keep-alive clients ({args.processes} process(es)), "
        f"{args.seconds:g} s measured per scenario after {args.warmup:g} s warm-up; "
        f"'1 client': {SINGLE_CLIENT_SECONDS:g} s with one client (the service time alone)"
    )
    print()
    header = (
        f"{'scenario':<40} {'req/s':>7} {'p50':>7} {'p95':>7} {'p99':>7} {'max':>7} "
        f"{'p95/base':>8} {'1 client p50/p95':>16} {'queries':>7}"
    )
    print(header + "   (latencies in ms)")
    print("-" * len(header))
    base_p95 = rows[0][1].percentile(95)
    for scenario, loaded, single, _ in rows:
        if len(loaded.latencies) < 2:
            print(f"{scenario.name:<40} too few requests")
            continue
        p95 = loaded.percentile(95)
        print(
            f"{scenario.name:<40} {len(loaded.latencies) / loaded.seconds:7.0f} "
            f"{loaded.percentile(50):7.1f} {p95:7.1f} {loaded.percentile(99):7.1f} "
            f"{max(loaded.latencies):7.1f} {p95 / base_p95:8.2f} "
            f"{single.percentile(50):8.1f}/{single.percentile(95):<7.1f} "
            f"{queries.get(scenario.name, '?'):>7}"
        )
    print()
    print(
        f"{'CPU ms per request':<40} {'web':>7} {'db':>7} {'client':>7}   "
        f"{'machine busy (of ' + str(cores) + ' cores)'}"
    )
    for scenario, loaded, _, cpu in rows:
        n = len(loaded.latencies) or 1
        db = f"{cpu['db'] * 1000 / n:7.2f}" if "db" in cpu else f"{'?':>7}"
        print(
            f"{scenario.name:<40} {cpu.get('web', 0) * 1000 / n:7.2f} {db} "
            f"{loaded.client_cpu * 1000 / n:7.2f}   "
            f"{cpu.get('machine', 0) / loaded.seconds * 100 / cores:5.0f}%"
        )
    print(
        f"\n{args.clients} requests are always in flight, so latency = {args.clients} / "
        "(requests/s) and a p95 ratio is mostly a ratio of CPU per request (web and database); "
        "'1 client' is the latency without the queue."
    )
    print()
    for scenario, loaded, single, _ in rows:
        for message, count in (loaded.errors + single.errors).most_common(5):
            print(f"ERROR {scenario.name}: {count} x {message}")
    for scenario, loaded, _, _ in rows:
        if scenario.target and loaded.latencies:
            ratio = loaded.percentile(95) / base_p95
            verdict = "PASS" if ratio <= scenario.target else "FAIL"
            print(
                f"{verdict} {scenario.name}: p95 {ratio:.2f}x the baseline's, target <= "
                f"{scenario.target:g}x"
            )


if __name__ == "__main__":
    sys.exit(main())
