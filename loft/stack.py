"""``make run``: the whole Loft stack in the foreground, stopped as a whole by Ctrl-C or SIGTERM.

    python -m loft.stack

Starts the embedded services (loft/embedded.py) unless their URLs are set, migrates, runs
``bootstrap`` (bucket, base-model catalogue, demo organization, staff user, first API key),
then a training worker, an inference (playground) worker, a webhook worker, beat and the web
server, and waits until ``/healthz`` reports a live worker (asked with the operators' token,
``LOFT_METRICS_TOKEN``; one is made up for this run when none is set). A worker, beat or the
web server that dies is restarted (``Restarts``); an embedded service that dies stops the
whole stack.
Data stays in ``$LOFT_HOME`` (default ``./.loft``); the next run finds it again.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import signal
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from loft.embedded import BIN_DIR, Child, EmbeddedStack, StackError, wait_until
from loft.env import loft_home

PROJECT_DIR = Path(__file__).resolve().parent.parent
READY_TIMEOUT_SECONDS = 120


def say(message: str) -> None:
    print(f"[loft] {message}", flush=True)


def manage(env: dict[str, str], *args: str) -> None:
    import subprocess

    result = subprocess.run(
        [sys.executable, str(PROJECT_DIR / "manage.py"), *args], env=env, cwd=PROJECT_DIR
    )
    if result.returncode != 0:
        raise StackError(
            f"`manage.py {' '.join(args)}` failed with exit status {result.returncode}."
        )


def worker_child(env: dict[str, str], name: str = "worker", queue: str = "default") -> Child:
    return Child(
        name,
        [
            str(BIN_DIR / "celery"),
            "-A",
            "loft",
            "worker",
            "--loglevel",
            "INFO",
            "--concurrency",
            "1",
            "--hostname",
            f"{name}@%h",
            "--queues",
            queue,
        ],
        env={**env, "LOFT_SERVICE": name},
    )


def visible_gpus() -> int:
    """The NVIDIA GPUs this host shows (``nvidia-smi --list-gpus``), without importing torch."""
    import shutil
    import subprocess

    if shutil.which("nvidia-smi") is None:
        return 0
    listed = subprocess.run(["nvidia-smi", "--list-gpus"], capture_output=True, text=True)
    return sum(line.startswith("GPU ") for line in listed.stdout.splitlines())


def worker_devices(gpus: int) -> list[str]:
    """The devices of a host's training workers, one process each: every visible GPU its own
    (two processes on one GPU would share its memory, and neither plans for the other), or the
    CPU on a host without any. Each worker reads its own as LOFT_DEVICE
    (engine/base_models.py ``training_device``)."""
    return [f"cuda:{index}" for index in range(gpus)] or ["cpu"]


def training_queue(env: dict[str, str]) -> str:
    """The queue of this host's worker class, as jobs/tasks.py ``training_queue`` names it
    (read from the environment here: this process does not load Django)."""
    return f"{env.get('LOFT_TRAINING_QUEUE') or 'train'}.{env.get('LOFT_WORKER_CLASS') or 'cpu'}"


def training_workers(env: dict[str, str], gpus: int | None = None) -> list[Child]:
    """One training worker per visible GPU, each pinned to its own (``LOFT_DEVICE``), or one
    on the CPU; one for all of them where the class runs multi-device jobs
    (``LOFT_WORKER_DEVICES`` > 1: its jobs' ranks take a device each). Each consumes the
    default queue (uploads to validate) and its class's training queue."""
    queues = f"default,{training_queue(env)}"
    devices = worker_devices(visible_gpus() if gpus is None else gpus)
    if devices == ["cpu"] or int(env.get("LOFT_WORKER_DEVICES") or 1) > 1:
        return [worker_child(env, queue=queues)]
    return [
        worker_child({**env, "LOFT_DEVICE": device}, f"worker{index}", queues)
        for index, device in enumerate(devices)
    ]


def beat_child(env: dict[str, str], home: Path) -> Child:
    return Child(
        "beat",
        [
            str(BIN_DIR / "celery"),
            "-A",
            "loft",
            "beat",
            "--loglevel",
            "INFO",
            "--schedule",
            str(home / "celerybeat-schedule"),
        ],
        env={**env, "LOFT_SERVICE": "beat"},
    )


def web_child(env: dict[str, str], host: str, port: int, home: Path) -> Child:
    # Each gunicorn process times its own requests into this folder; /metrics adds them up.
    metrics_dir = home / "prometheus"
    return Child(
        "web",
        [
            str(BIN_DIR / "gunicorn"),
            "loft.wsgi:application",
            "--config",
            "python:loft.gunicorn_conf",
            "--bind",
            f"{host}:{port}",
            "--workers",
            "2",
            # A streamed answer holds its thread for as long as it is generated (the thread
            # waits on the answer's Redis list), so threads, not CPU, bound how many clients
            # stream at once; 2 x 4 queued the 9th behind the first 8. 16 per process, since
            # gunicorn does not spread connections evenly: one process alone takes 16 streams
            # (bench/serve.py), the other stays free for pages and API calls.
            "--threads",
            "16",
            "--timeout",
            "120",
            # No access log: Loft logs each request itself, as JSON (loft/observability.py).
            "--no-control-socket",
        ],
        env={**env, "LOFT_SERVICE": "web", "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)},
    )


class Restarts:
    """Loft's own processes are restarted when they die, as docker-compose's restart policy
    does in production: a worker killed mid-job comes back, and the reaper hands it the job
    again. One that dies again within a minute of its start waits longer each time (1 s, 2 s,
    4 s … 60 s), so a process that cannot start does not spin."""

    QUICK_DEATH_SECONDS = 60
    LONGEST_WAIT_SECONDS = 60

    def __init__(self):
        self.started_at: dict[str, float] = {}
        self.quick_deaths: dict[str, int] = {}
        self.due_at: dict[str, float] = {}

    def restart(self, child: Child) -> None:
        now = time.monotonic()
        name = child.name
        if name not in self.due_at:
            lived = now - self.started_at.get(name, 0.0)
            quick = self.quick_deaths.get(name, 0) + 1 if lived < self.QUICK_DEATH_SECONDS else 0
            self.quick_deaths[name] = quick
            wait = min(2.0**quick, self.LONGEST_WAIT_SECONDS) if quick else 0.0
            self.due_at[name] = now + wait
            say(
                f"{name} stopped (exit {child.process.returncode}); restarting it"
                + (f" in {wait:.0f} s." if wait else ".")
            )
        if now < self.due_at[name]:
            return
        del self.due_at[name]
        child.stop()  # whatever it left behind in its process group (a pool process) goes too
        child.start()
        self.started_at[name] = time.monotonic()
        say(f"{name} restarted (pid {child.process.pid}).")


def healthz(url: str, token: str) -> dict:
    """The operators' view of /healthz (anyone else hears only its status)."""
    # Our own server, at the http:// address run() built: no other scheme reaches here (S310).
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})  # noqa: S310
    try:
        with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310
            return json.load(response)
    except urllib.error.HTTPError as error:
        return json.load(error)


def hold_lock(home: Path):
    """One ``make run`` per LOFT_HOME: a second one would fight over the same data."""
    home.mkdir(parents=True, exist_ok=True)
    lock = open(home / "stack.lock", "a+")  # noqa: SIM115 - held for the life of the process
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise StackError(
            f"Loft is already running from {home}. Stop it, or set LOFT_HOME to another folder."
        ) from None
    return lock


def _raise_system_exit(signum, frame):
    raise SystemExit(128 + signum)


def run() -> int:
    home = loft_home()
    host = os.environ.get("LOFT_HOST", "127.0.0.1")
    port = int(os.environ.get("LOFT_PORT", "8000"))
    base_url = f"http://{'127.0.0.1' if host == '0.0.0.0' else host}:{port}"  # noqa: S104
    _lock = hold_lock(home)
    signal.signal(signal.SIGTERM, _raise_system_exit)

    stack = EmbeddedStack(home)
    apps: list[Child] = []
    try:
        say(f"Starting the embedded services in {home} …")
        env = {**os.environ, **stack.start(), "LOFT_HOME": str(home)}
        env.setdefault("LOFT_METRICS_TOKEN", secrets.token_urlsafe(32))
        for service in EmbeddedStack.SERVICES:
            where = "external (from the environment)" if stack.external(service) else "embedded"
            say(f"  {service}: {where}")
        manage(env, "migrate", "--noinput", "-v", "0")
        manage(env, "collectstatic", "--noinput", "-v", "0")
        manage(env, "bootstrap", "--demo")

        # Training, the playground and webhook deliveries in separate workers: an answer never
        # waits for a job, and a slow webhook receiver holds up neither.
        apps = [
            *training_workers(env),
            worker_child(env, "inference", env.get("LOFT_INFERENCE_QUEUE", "inference")),
            worker_child(env, "webhooks", env.get("LOFT_WEBHOOK_QUEUE", "webhooks")),
            beat_child(env, home),
            web_child(env, host, port, home),
        ]
        for child in apps:
            child.start()
        say(f"Waiting for the web server and a worker at {base_url}/healthz …")
        wait_until(
            lambda: (
                healthz(f"{base_url}/healthz", env["LOFT_METRICS_TOKEN"]).get("workers", 0) >= 1
            ),
            READY_TIMEOUT_SECONDS,
            "Loft (web server and worker)",
        )
        say(f"Loft is running at {base_url}/  (admin: {base_url}/admin/, API: {base_url}/v1)")
        say("Press Ctrl-C to stop every part; data stays in LOFT_HOME.")
        restarts = Restarts()
        while True:
            for child in apps:
                if not child.running:
                    restarts.restart(child)
            for child in stack.children.values():
                if not child.running:
                    raise StackError(
                        f"{child.name} stopped unexpectedly (exit {child.process.returncode})."
                    )
            time.sleep(1)
    except (KeyboardInterrupt, SystemExit):
        say("Stopping …")
        return 0
    except StackError as error:
        say(str(error))
        return 1
    finally:
        # A second Ctrl-C or SIGTERM must not cut the cleanup short and leave children behind.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        for child in reversed(apps):
            child.stop()
        stack.stop()
        say("Stopped.")


if __name__ == "__main__":
    sys.exit(run())
