"""Warm start: a training worker loads a base model as it starts, before its first job asks.

A worker keeps the base it trained on between jobs (engine/base_models.py WarmBaseModels); this
spares the first job after a start the load too (~10-20 s for the bundled model on a CPU). The
base is the newest job's (what the next one most likely wants), at that job's precision; on a
fresh install, the default base at the default method's. A job that wants another one loads it
as before. The load runs in a thread of the process that runs the tasks — a prefork pool's child
or the solo pool's worker (``worker_process_init``; a prefork parent must not touch CUDA), or
the threads pool's worker (``worker_ready``) — so the worker takes messages meanwhile; a job
that arrives during the load waits for it rather than loading a second copy.

Only workers that consume their class's training queue (train.<class>) load anything;
LOFT_WORKER_PRELOAD=0 turns it off.

Every worker, as it starts, shares base models through object storage (jobs/shared_models.py):
what it loads it fetches from there when another host converted it first, and what it converts
it uploads for the others. Its own LOFT_HOME is only a cache.
"""

from __future__ import annotations

import logging
import threading

from celery import current_app, signals
from django.conf import settings
from django.db import connections

from engine import model_cache
from engine.base_models import training_device, warm_base_models
from engine.hyperparameters import ConfigError, TrainConfig, as_stored
from jobs.models import BaseModel, FineTuneJob
from jobs.shared_models import S3SharedModels
from jobs.tasks import training_queue
from worker.tokenizer import tokenizer_for

logger = logging.getLogger(__name__)


def runs_training(queues) -> bool:
    """Whether a worker consuming ``queues`` (None: Celery's default) runs training jobs."""
    return queues is None or training_queue(settings.LOFT_WORKER_CLASS) in queues


def expected_base() -> tuple[BaseModel, str]:
    """The base model and precision the next job most likely trains on."""
    latest = FineTuneJob.objects.select_related("base_model").order_by("-created_at").first()
    if latest is not None and latest.base_model.enabled:
        try:
            config = TrainConfig(**as_stored(latest.hyperparameters))
        except (ConfigError, TypeError):  # stored by a version that knew other settings
            pass
        else:
            return latest.base_model, config.quantization
    return BaseModel.default(), TrainConfig().quantization


def preload() -> None:
    try:
        base_model, quantization = expected_base()
        tokenizer_for(base_model)
        device = training_device()
        cache = settings.LOFT_HOME / "models"
        warm_base_models.preload(base_model.spec, cache, quantization, device)
        logger.info("preloaded %s (%s) on %s", base_model.name, quantization, device)
    except Exception:  # noqa: BLE001 - a failed preload only means the first job loads it
        logger.warning("could not preload a base model", exc_info=True)
    finally:
        connections.close_all()  # this thread's own, which it ends without


def start_preloading() -> None:
    if not settings.LOFT_WORKER_PRELOAD or not runs_training(current_app.amqp.queues.consume_from):
        return
    threading.Thread(target=preload, name="preload-base", daemon=True).start()


@signals.worker_init.connect
def share_base_models(**kwargs):
    # In the worker's main process, before its pool starts: the pool's processes inherit it.
    model_cache.share_models_through(S3SharedModels())


@signals.worker_process_init.connect
def preload_in_pool_process(**kwargs):
    start_preloading()


@signals.worker_ready.connect
def preload_in_threads_worker(sender, **kwargs):
    if type(sender.pool).__module__ == "celery.concurrency.thread":  # sends no process init
        start_preloading()
