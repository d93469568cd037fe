"""Pre-flight for a job request: read its hyperparameters (engine/hyperparameters.py), resolve
"auto" from the data, and estimate the run (engine/plan.py) on the worker class of the training
queue."""

from __future__ import annotations

from typing import TYPE_CHECKING

from django.conf import settings

from engine import plan as planning
from engine.hyperparameters import METHODS, TrainConfig, from_request
from jobs.models.catalogue import BaseModel
from jobs.models.files import File

if TYPE_CHECKING:
    from jobs.models.adapters import Adapter


class JobTooLarge(Exception):
    def __init__(self, plan: planning.Plan):
        super().__init__(too_large_message(plan))
        self.plan = plan


def worker_class() -> planning.WorkerClass:
    return planning.WorkerClass(
        name=settings.LOFT_WORKER_CLASS,
        memory_bytes=settings.LOFT_WORKER_MEMORY_BYTES,
        tokens_per_second_135m=settings.LOFT_WORKER_TOKENS_PER_SECOND,
        bytes_per_activation=settings.LOFT_WORKER_BYTES_PER_ACTIVATION,
    )


def model_shape(base_model: BaseModel) -> planning.ModelShape:
    arch = base_model.architecture or {}
    try:
        return planning.ModelShape(
            parameters=base_model.parameters,
            hidden_size=arch["hidden_size"],
            num_layers=arch["num_layers"],
            intermediate_size=arch["intermediate_size"],
            vocab_size=arch["vocab_size"],
            tied_embeddings=arch.get("tied_embeddings", False),
            num_attention_heads=arch.get("num_attention_heads", 0),
        )
    except KeyError:
        return planning.ModelShape.from_parameters(base_model.parameters)


def data_stats(file: File) -> planning.DataStats:
    per_row = (file.report or {}).get("tokens_per_row") or {}
    return planning.DataStats(
        rows=file.rows or 0,
        tokens=file.tokens or 0,
        max_row_tokens=per_row.get("max", 0),
    )


def resolve_hyperparameters(
    requested: dict,
    training_file: File,
    validation_file: File | None,
    base_model: BaseModel,
    parent: Adapter | None = None,
) -> dict:
    """TrainConfig's arguments from a request's hyperparameters: "auto" (or absent) resolved
    from the training data when it has been measured. A job that continues an adapter keeps
    its parent's base precision unless told otherwise: the parent learned to correct that base.
    Raises ConfigError naming the field."""
    config = from_request(requested)
    if parent is not None:
        config.setdefault("method", METHODS[parent.base_quantization])
    if files_measured(training_file, validation_file):
        config = planning.resolve_auto(
            config,
            data_stats(training_file),
            model_shape(base_model),
            worker_class(),
            context_length=base_model.context_length,
            has_validation_file=validation_file is not None,
        )
    TrainConfig(**config)  # raises ConfigError naming the first bad field
    return config


def files_measured(training_file: File, validation_file: File | None) -> bool:
    return all(
        f.status == File.Status.PROCESSED for f in (training_file, validation_file) if f is not None
    )


def plan(
    config: TrainConfig,
    base_model: BaseModel,
    training_file: File,
    validation_file: File | None,
    parent_adapter=None,
) -> planning.Plan | None:
    """The run's estimate on the training queue's worker class; None while a file is still
    being validated (there is nothing to count yet). A job with a parent adapter also trains
    on the rows it replays of its ancestors' data (worker/training.py ``replay_rows``)."""
    if not files_measured(training_file, validation_file):
        return None
    stats = data_stats(training_file)
    examples = planning.training_examples(stats, config, validation_file is not None)
    if parent_adapter is not None:
        available = sum(
            file.rows or 0
            for ancestor in parent_adapter.lineage()
            if (file := ancestor.training_file()) is not None
        )
        examples += planning.replayed_rows(examples, config, available)
    return planning.estimate(
        model_shape(base_model), stats, worker_class(), config, training_examples=examples
    )


def too_large_message(plan: planning.Plan) -> str:
    gib = 2**30
    return (
        f"This job would need about {plan.estimated_peak_memory_bytes / gib:.1f} GiB at its "
        f"peak, more than the {plan.worker_memory_bytes / gib:.1f} GiB of a "
        f"{plan.worker_class} worker. {plan.suggestion}"
    )


def refuse_if_too_large(plan: planning.Plan) -> None:
    if not plan.fits:
        raise JobTooLarge(plan)
