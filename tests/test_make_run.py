"""`make run` end to end: the supervisor (python -m loft.stack) on a fresh LOFT_HOME.

It must bring /healthz to 200 with a live worker, let a second terminal create a key that lists
the bundled model, leave no process behind on SIGTERM, and find the same data when restarted.
"""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import openai
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from loft.embedded import free_port
from tests.helpers import PROJECT_DIR, wait_for

pytestmark = pytest.mark.slow

OUTSIDE_SERVICES = [
    "DATABASE_URL",
    "CELERY_BROKER_URL",
    "REDIS_URL",
    "S3_ENDPOINT_URL",
    "S3_ACCESS_KEY_ID",
    "S3_SECRET_ACCESS_KEY",
    "S3_BUCKET",
    "DJANGO_SECRET_KEY",
]


def get_json(url: str, key: str | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(url)
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


class MakeRun:
    def __init__(self, home, port):
        # Only LOFT_HOME and LOFT_PORT: the embedded stack must start on its own.
        self.env = {k: v for k, v in os.environ.items() if k not in OUTSIDE_SERVICES}
        self.env.update(LOFT_HOME=str(home), LOFT_PORT=str(port), LOFT_METRICS_TOKEN="scrape")
        self.url = f"http://127.0.0.1:{port}"
        self.log = home.parent / f"make-run-{time.monotonic_ns()}.log"

    def start(self):
        with open(self.log, "wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "loft.stack"],
                cwd=PROJECT_DIR,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def wait_healthy(self, timeout=180, workers: int = 1) -> float:
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            assert self.process.poll() is None, self.output()
            try:
                status, body = get_json(f"{self.url}/healthz", self.env["LOFT_METRICS_TOKEN"])
                if status == 200 and body["workers"] >= workers:
                    return time.monotonic() - started
            except (OSError, ValueError):
                pass
            time.sleep(0.5)
        raise AssertionError(f"not healthy within {timeout}s:\n{self.output()}")

    def manage(self, *args) -> str:
        """A second terminal: nothing but LOFT_HOME, as a person would have."""
        env = {"PATH": os.environ["PATH"], "LOFT_HOME": self.env["LOFT_HOME"]}
        result = subprocess.run(
            [sys.executable, "manage.py", *args],
            cwd=PROJECT_DIR,
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        return result.stdout

    def stop(self) -> list[psutil.Process]:
        """SIGTERM the supervisor; return every process of the stack that was running."""
        tree = psutil.Process(self.process.pid).children(recursive=True)
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(90)
        return tree

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-5000:]


def exercise_files_with_the_openai_client(url: str, key: str) -> None:
    """The official client, unchanged, against the running stack (gunicorn, worker, S3)."""
    client = openai.OpenAI(api_key=key, base_url=f"{url}/v1", max_retries=0)
    row = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hey"}]}
    content = json.dumps(row).encode() + b"\n"
    created = client.files.create(file=("hello.jsonl", content), purpose="fine-tune")
    assert created.status == "processed"
    assert client.files.retrieve(created.id).bytes == len(content)
    assert created.id in [f.id for f in client.files.list()]
    assert client.files.content(created.id).read() == content
    assert client.files.delete(created.id).deleted


def check_metrics_and_logs(run: MakeRun) -> None:
    """/metrics adds up the gunicorn processes' request timings and counts the workers'
    heartbeats; every part of the stack logs JSON lines naming itself."""
    request = urllib.request.Request(f"{run.url}/metrics")
    request.add_header("Authorization", f"Bearer {run.env['LOFT_METRICS_TOKEN']}")
    with urllib.request.urlopen(request, timeout=10) as response:
        families = {f.name: f for f in text_string_to_metric_families(response.read().decode())}
    timed = [
        s
        for s in families["loft_http_request_duration_seconds"].samples
        if s.name.endswith("_count")
    ]
    assert sum(s.value for s in timed) >= 5, timed  # the files calls above, at least

    def workers_online():
        with urllib.request.urlopen(request, timeout=10) as response:
            text = response.read().decode()
        return {f.name: f for f in text_string_to_metric_families(text)}["loft_workers_online"]

    online = wait_for(
        workers_online,
        lambda family: family.samples[0].value >= 2,
        timeout=30,
        interval=1,
        what="two workers online",
    )
    assert online.samples[0].value >= 2  # the training and the inference worker
    services = set()
    for line in run.log.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            services.add(json.loads(line).get("service"))
    assert {"web", "worker", "inference", "beat"} <= services, services


def check_supervision(run: MakeRun) -> None:
    """A worker and beat that die are restarted, and the output says so."""
    children = psutil.Process(run.process.pid).children()

    def child(*words: str) -> psutil.Process:
        return next(p for p in children if all(w in p.cmdline() for w in words))

    for victim in (child("worker", "worker@%h"), child("beat")):
        victim.kill()
    log = wait_for(
        lambda: run.log.read_text(errors="replace"),
        lambda log: "worker restarted" in log and "beat restarted" in log,
        timeout=60,
        interval=0.5,
        what="the worker and beat restarted",
        explain=lambda log: log[-5000:],
    )
    assert "worker stopped (exit -9); restarting it" in log, run.output()
    assert "beat restarted" in log, run.output()
    run.wait_healthy(workers=2)  # the training worker is back beside the inference one


def alive(processes: list[psutil.Process]) -> list[psutil.Process]:
    gone, still = psutil.wait_procs(processes, timeout=10)
    return [p for p in still if p.status() != psutil.STATUS_ZOMBIE]


def test_make_run_starts_stops_and_restarts_with_the_same_data(tmp_path):
    run = MakeRun(tmp_path / "home", free_port())
    run.start()
    try:
        seconds = run.wait_healthy()
        print(f"healthy in {seconds:.1f}s")
        assert "shown once" in run.log.read_text(errors="replace")

        key = (
            run.manage("create_api_key", "--org", "acme", "--name", "test").strip().splitlines()[-1]
        )
        status, models = get_json(f"{run.url}/v1/models", key)
        assert status == 200
        assert "HuggingFaceTB/SmolLM2-135M-Instruct" in [m["id"] for m in models["data"]]
        _, keys = get_json(f"{run.url}/v1/api_keys", key)
        exercise_files_with_the_openai_client(run.url, key)
        check_metrics_and_logs(run)
        check_supervision(run)
        stack_processes = run.stop()
    finally:
        if run.process.poll() is None:
            run.process.kill()
    assert len(stack_processes) >= 5  # postgres, valkey, weed, worker, web at least
    assert alive(stack_processes) == [], run.output()

    again = MakeRun(tmp_path / "home", free_port())
    again.start()
    try:
        again.wait_healthy()
        status, keys_again = get_json(f"{again.url}/v1/api_keys", key)
        assert status == 200
        # The same organization and key: the key created in the first run still works.
        assert [k["id"] for k in keys_again["data"]] == [k["id"] for k in keys["data"]]
        assert "shown once" not in again.log.read_text(errors="replace")
        stack_processes = again.stop()
    finally:
        if again.process.poll() is None:
            again.process.kill()
    assert alive(stack_processes) == []
