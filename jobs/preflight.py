"""Pre-flight for a job request: read OpenAI's and Loft's hyperparameters, resolve "auto" from
the data, and estimate the run (engine/plan.py) on the worker class of the training queue."""

from __future__ import annotations

import math

from django.conf import settings

from engine import plan as planning
from engine.train import ConfigError, TrainConfig
from jobs.models.catalogue import BaseModel
from jobs.models.files import File

AUTO = "auto"
# OpenAI's hyperparameters, then Loft's, as a request may give them.
OPENAI_HYPERPARAMETERS = ("n_epochs", "batch_size", "learning_rate_multiplier")
LOFT_HYPERPARAMETERS = (
    "lora_rank",
    "lora_alpha",
    "lora_dropout",
    "quantization",
    "max_seq_length",
    "max_steps",
    "packing",
    "warmup_ratio",
    "checkpoint_every",
    "validation_fraction",
)
QUANTIZATION_METHODS = {"nf4": "qlora", "none": "lora"}
# What "auto" (or leaving it out) resolves from the measured data.
AUTO_RESOLVED = ("n_epochs", "batch_size", "max_seq_length")


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
) -> dict:
    """TrainConfig's arguments from a request's hyperparameters: "auto" (or absent) resolved
    from the training data when it has been measured. Raises ConfigError naming the field."""
    if not isinstance(requested, dict):
        raise ConfigError("hyperparameters must be an object.")
    unknown = set(requested) - set(OPENAI_HYPERPARAMETERS) - set(LOFT_HYPERPARAMETERS)
    if unknown:
        raise ConfigError(
            f"Unknown hyperparameter {sorted(unknown)[0]!r}; Loft takes "
            f"{', '.join(OPENAI_HYPERPARAMETERS + LOFT_HYPERPARAMETERS)}."
        )
    given = {k: v for k, v in requested.items() if v != AUTO and v is not None}
    config = {}
    if "quantization" in given:
        if given["quantization"] not in QUANTIZATION_METHODS:
            raise ConfigError(f"quantization must be nf4 or none, got {given['quantization']!r}")
        config["method"] = QUANTIZATION_METHODS[given.pop("quantization")]
    if "learning_rate_multiplier" in given:
        multiplier = _number(given.pop("learning_rate_multiplier"), "learning_rate_multiplier")
        if not 0 < multiplier <= 100:
            raise ConfigError(f"learning_rate_multiplier must be in (0, 100], got {multiplier}")
        config["learning_rate"] = planning.BASE_LEARNING_RATE * multiplier
    for name, value in given.items():
        config[name] = _checked_type(name, value)

    if files_measured(training_file, validation_file):
        stats = data_stats(training_file)
        fraction = config.get("validation_fraction", TrainConfig.validation_fraction)
        rows = planning.train_rows(stats, fraction, validation_file is not None)
        config.setdefault("n_epochs", planning.auto_epochs(rows))
        config.setdefault("batch_size", planning.auto_batch_size(rows))
        if "max_seq_length" not in config:
            method = config.get("method", TrainConfig.method)
            config["max_seq_length"] = planning.auto_max_seq_length(
                stats.max_row_tokens,
                base_model.context_length,
                fits=lambda length: planning.fits_in_memory(
                    model_shape(base_model),
                    worker_class(),
                    quantization="nf4" if method == "qlora" else "none",
                    lora_rank=config.get("lora_rank", TrainConfig.lora_rank),
                    batch=planning.micro_batch(
                        packing=config.get("packing", TrainConfig.packing),
                        batch_size=config["batch_size"],
                        max_seq_length=length,
                        max_row_tokens=stats.max_row_tokens,
                    ),
                ),
            )
    TrainConfig(**config)  # raises ConfigError naming the first bad field
    return config


def _number(value, name: str) -> float:
    """A finite float; huge integers and NaN are refused here rather than overflow later."""
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        number = math.nan
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(number):
        raise ConfigError(f"{name} must be a number or 'auto', got {str(value)[:40]}")
    return number


_TYPES = {
    "n_epochs": int,
    "batch_size": int,
    "lora_rank": int,
    "lora_alpha": int,
    "max_seq_length": int,
    "max_steps": int,
    "checkpoint_every": int,
    "lora_dropout": float,
    "warmup_ratio": float,
    "validation_fraction": float,
    "packing": bool,
}


def _checked_type(name: str, value):
    wanted = _TYPES[name]
    if wanted is float:
        return _number(value, name)
    if wanted is bool:
        ok = isinstance(value, bool)
    else:  # a whole number: 2 or 2.0, never true
        ok = not isinstance(value, bool) and (
            isinstance(value, int) or (isinstance(value, float) and value.is_integer())
        )
    if not ok:
        kind = "true or false" if wanted is bool else "an integer"
        raise ConfigError(f"{name} must be {kind} or 'auto', got {str(value)[:40]}")
    return int(value) if wanted is int else value


def public_hyperparameters(config: dict) -> dict:
    """A stored TrainConfig as the API shows it: OpenAI's names first, then Loft's."""
    return {
        "n_epochs": config["n_epochs"],
        "batch_size": config["batch_size"],
        "learning_rate_multiplier": round(config["learning_rate"] / planning.BASE_LEARNING_RATE, 6),
        "lora_rank": config["lora_rank"],
        "lora_alpha": config["lora_alpha"],
        "lora_dropout": config["lora_dropout"],
        "quantization": "nf4" if config["method"] == "qlora" else "none",
        "max_seq_length": config["max_seq_length"],
        "max_steps": config["max_steps"],
        "packing": config["packing"],
        "warmup_ratio": config["warmup_ratio"],
        "checkpoint_every": config["checkpoint_every"],
        "validation_fraction": config["validation_fraction"],
    }


def files_measured(training_file: File, validation_file: File | None) -> bool:
    return all(
        f.status == File.Status.PROCESSED for f in (training_file, validation_file) if f is not None
    )


def plan(
    config: TrainConfig, base_model: BaseModel, training_file: File, validation_file: File | None
) -> planning.Plan | None:
    """The run's estimate on the training queue's worker class; None while a file is still
    being validated (there is nothing to count yet)."""
    if not files_measured(training_file, validation_file):
        return None
    stats = data_stats(training_file)
    return planning.estimate(
        model_shape(base_model),
        stats,
        worker_class(),
        quantization=config.quantization,
        lora_rank=config.lora_rank,
        batch_size=config.batch_size,
        max_seq_length=config.max_seq_length,
        packing=config.packing,
        n_epochs=config.n_epochs,
        max_steps=config.max_steps,
        training_examples=planning.train_rows(
            stats, config.validation_fraction, validation_file is not None
        ),
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
