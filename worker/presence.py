"""A worker's presence: every ``LOFT_WORKER_HEARTBEAT_SECONDS`` each Celery worker process
writes a ``WorkerHeartbeat`` row with its host, pid, queues, device, memory and current job, and
a training worker its class (LOFT_WORKER_CLASS and its figures), which pre-flight routes to.
The ops dashboard and ``loft_workers_online`` read those rows; a worker that stops writing is
shown as gone after three missed beats.

Started by Celery's ``worker_ready`` signal (loft/celery.py) in the worker's main process.
It never touches CUDA itself: a parent that initialised CUDA would break the pool's forked
children, so GPU figures come from ``nvidia-smi``, which reads the driver.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import subprocess
import threading

import psutil
from celery import signals
from django.conf import settings
from django.db import close_old_connections
from django.utils import timezone

from jobs import preflight
from jobs.models import FineTuneJob, WorkerHeartbeat
from jobs.tasks import training_queue

logger = logging.getLogger(__name__)
MIB = 2**20


def gpu_memory() -> tuple[str, int, int] | None:
    """(name, used bytes, total bytes) of the first GPU this process may use, or None."""
    if shutil.which("nvidia-smi") is None:
        return None
    command = [
        "nvidia-smi",
        "--query-gpu=name,memory.used,memory.total",
        "--format=csv,noheader,nounits",
    ]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
    if visible:
        command.append(f"--id={visible}")
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=5, check=True)
        name, used, total = (part.strip() for part in out.stdout.splitlines()[0].split(","))
        return name, int(used) * MIB, int(total) * MIB
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def process_memory() -> int:
    """Resident memory of this worker and its pool processes, where a model lives on a CPU."""
    me = psutil.Process()
    total = 0
    for process in [me, *me.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):  # a pool process that just ended
            total += process.memory_info().rss
    return total


def measure() -> dict:
    gpu = gpu_memory()
    if gpu is not None:
        name, used, total = gpu
        return {"device": name, "memory_used_bytes": used, "memory_total_bytes": total}
    return {
        "device": f"cpu ({socket.gethostname()}, {os.cpu_count()} cores)",
        "memory_used_bytes": process_memory(),
        "memory_total_bytes": psutil.virtual_memory().total,
    }


class Presence(threading.Thread):
    def __init__(self, hostname: str, queues: list[str], every: float):
        super().__init__(daemon=True, name="worker-presence")
        self.hostname, self.queues, self.every = hostname, queues, every
        self.started = timezone.now()
        self.stopped = threading.Event()

    def own_class(self) -> dict:
        """The worker's class and its name, for a worker that consumes its class's training
        queue (it publishes the class, which pre-flight then routes jobs to); nothing for the
        others (inference, webhooks)."""
        spec = preflight.own_class()
        if training_queue(spec.name) not in self.queues:
            return {"class_name": "", "class_spec": None}
        return {"class_name": spec.name, "class_spec": spec.as_dict()}

    def beat(self, **extra) -> None:
        current = (
            FineTuneJob.objects.filter(worker=self.hostname, status=FineTuneJob.Status.RUNNING)
            .values_list("id", flat=True)
            .first()
        )
        WorkerHeartbeat.objects.update_or_create(
            hostname=self.hostname,
            defaults={
                "pid": os.getpid(),
                "queues": self.queues,
                "current_job": current or "",
                "started_at": self.started,
                "last_seen": timezone.now(),
                **self.own_class(),
                **measure(),
                **extra,
            },
        )

    def run(self) -> None:
        try:
            while True:
                try:
                    self.beat(stopped_at=None)
                except Exception as error:  # noqa: BLE001 - a missed beat must not end the thread
                    logger.warning("worker heartbeat of %s failed: %s", self.hostname, error)
                    close_old_connections()
                if self.stopped.wait(self.every):
                    return
        finally:
            close_old_connections()


_presence: Presence | None = None


def start_presence(hostname: str, queues: list[str]) -> None:
    global _presence
    _presence = Presence(hostname, queues, settings.LOFT_WORKER_HEARTBEAT_SECONDS)
    _presence.start()


def stop_presence() -> None:
    """A clean shutdown says so at once, rather than leaving the row to go stale."""
    if _presence is None:
        return
    _presence.stopped.set()
    _presence.join(timeout=5)
    try:
        WorkerHeartbeat.objects.filter(hostname=_presence.hostname).update(
            stopped_at=timezone.now()
        )
    except Exception as error:  # noqa: BLE001
        logger.warning("could not record that %s stopped: %s", _presence.hostname, error)
    finally:
        close_old_connections()


@signals.worker_ready.connect
def start_reporting_presence(sender, **kwargs):
    queues = sorted(sender.app.amqp.queues.consume_from or [])
    start_presence(sender.hostname, queues)


@signals.worker_shutdown.connect
def stop_reporting_presence(**kwargs):
    stop_presence()
