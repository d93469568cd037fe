"""gunicorn hooks for `make run` and docker-compose's web service (``--config
python:loft.gunicorn_conf``): each gunicorn process times its requests into files under
``PROMETHEUS_MULTIPROC_DIR``, which /metrics adds up (jobs/metrics.py). The folder is emptied
when gunicorn starts, so that an earlier run's processes are not counted, and a process that
exits is marked dead, as prometheus_client's multiprocess mode requires."""

import os
import shutil
from pathlib import Path


def on_starting(server):
    folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if folder:
        shutil.rmtree(folder, ignore_errors=True)
        Path(folder).mkdir(parents=True)


def child_exit(server, worker):
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)
