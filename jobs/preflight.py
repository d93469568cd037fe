"""Pre-flight for a job request: read its hyperparameters (engine/hyperparameters.py), resolve
"auto" from the data, and plan the run (engine/plan.py) on every known worker class, routing it
to the one where it costs least among those it fits (or to the class it names)."""

from __future__ import annotations

from dataclasses import asdict
from typing import TYPE_CHECKING

from django.conf import settings

from engine import plan as planning
from engine.hyperparameters import METHODS, SUPERVISED, TrainConfig, from_request
from jobs.models.catalogue import BaseModel
from jobs.models.files import File
from jobs.models.workers import WorkerHeartbeat

if TYPE_CHECKING:
    from jobs.models.adapters import Adapter


class JobTooLarge(Exception):
    def __init__(self, plan: planning.Plan):
        super().__init__(too_large_message(plan))
        self.plan = plan


def own_class() -> planning.WorkerClass:
    """The class this process's settings describe: a training worker's own (what it publishes
    and consumes the queue of), or on the web the embedded worker's."""
    return planning.WorkerClass(
        name=settings.LOFT_WORKER_CLASS,
        memory_bytes=settings.LOFT_WORKER_MEMORY_BYTES,
        tokens_per_second_135m=settings.LOFT_WORKER_TOKENS_PER_SECOND,
        bytes_per_activation=settings.LOFT_WORKER_BYTES_PER_ACTIVATION,
        device_kind=settings.LOFT_WORKER_DEVICE_KIND,
        devices=settings.LOFT_WORKER_DEVICES,
        cost_per_hour=settings.LOFT_WORKER_COST_PER_HOUR,
    )


def known_classes() -> list[planning.WorkerClass]:
    """Every class a job may be routed to: those the operator declares (LOFT_WORKER_CLASSES) or,
    without a declaration, the one the settings describe; then any other class a worker
    published lately. Where both name a class, the declaration is what jobs are planned on."""
    declared = [planning.WorkerClass.from_dict(spec) for spec in settings.LOFT_WORKER_CLASSES]
    known = {worker.name: worker for worker in declared or [own_class()]}
    for spec in WorkerHeartbeat.classes_seen():
        if spec and spec.get("name") not in known:
            known[spec["name"]] = planning.WorkerClass.from_dict(spec)
    return list(known.values())


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
    method_type: str = SUPERVISED,
) -> dict:
    """TrainConfig's arguments from a request's hyperparameters: "auto" (or absent) resolved
    from the training data when it has been measured, for the worker class the job is routed
    to, which they then name. A job that continues an adapter keeps its parent's base precision
    unless told otherwise: the parent learned to correct that base. ``method_type`` is OpenAI's
    method.type (supervised or dpo). Raises ConfigError naming the field."""
    config = from_request(requested, method_type)
    if parent is not None:
        config.setdefault("method", METHODS[parent.base_quantization])
    planning.refuse_unknown_class(config, known_classes())  # now, not once files are measured
    if files_measured(training_file, validation_file):
        stats, shape = data_stats(training_file), model_shape(base_model)

        def plan_on(given: dict, worker: planning.WorkerClass) -> tuple[dict, planning.Plan]:
            resolved = planning.resolve_auto(
                given,
                stats,
                shape,
                worker,
                context_length=base_model.context_length,
                has_validation_file=validation_file is not None,
            )
            run = TrainConfig(**resolved)
            examples = training_examples(run, training_file, validation_file, parent)
            plan = planning.estimate(shape, stats, worker, run, training_examples=examples)
            return resolved, plan

        config, _ = planning.route(config, known_classes(), plan_on)
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
    """The run's estimate on the worker class its settings name (``resolve_hyperparameters``
    routed it there); None while a file is still being validated (there is nothing to count
    yet). Raises ConfigError when no known class has that name any more."""
    if not files_measured(training_file, validation_file):
        return None
    classes = known_classes()
    shape, stats = model_shape(base_model), data_stats(training_file)
    examples = training_examples(config, training_file, validation_file, parent_adapter)

    def plan_on(given: dict, worker: planning.WorkerClass) -> tuple[dict, planning.Plan]:
        return given, planning.estimate(shape, stats, worker, config, training_examples=examples)

    # On the class the settings name, with what every other class would cost; a job stored
    # before classes names none and goes to the cheapest it fits.
    _, routed = planning.route(asdict(config), classes, plan_on)
    return routed


def training_examples(
    config: TrainConfig, training_file: File, validation_file: File | None, parent_adapter=None
) -> int:
    """The examples a run trains on: its training rows (less what it holds out), and for a job
    with a parent adapter the rows it replays of its ancestors' data (worker/training.py
    ``replay_rows``)."""
    stats = data_stats(training_file)
    examples = planning.training_examples(stats, config, validation_file is not None)
    if parent_adapter is not None:
        available = sum(
            file.rows or 0
            for ancestor in parent_adapter.lineage()
            if (file := ancestor.training_file()) is not None
        )
        examples += planning.replayed_rows(examples, config, available)
    return examples


def too_large_message(plan: planning.Plan) -> str:
    gib = 2**30
    if plan.estimated_peak_memory_bytes <= plan.worker_memory_bytes:  # too many devices
        return plan.suggestion
    return (
        f"This job would need about {plan.estimated_peak_memory_bytes / gib:.1f} GiB at its "
        f"peak, more than the {plan.worker_memory_bytes / gib:.1f} GiB of a "
        f"{plan.class_name} worker. {plan.suggestion}"
    )


def refuse_if_too_large(plan: planning.Plan) -> None:
    if not plan.fits:
        raise JobTooLarge(plan)
