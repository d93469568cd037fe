"""Every training hyperparameter, declared once.

``TrainConfig`` is what one fine-tuning run does; each field carries, in its metadata, what every
surface needs (TRL's ``ModelConfig`` style): the name the API takes it by, whether "auto"
resolves it from the data, its bounds, a label and help text. From it come the API's
hyperparameters object (``from_request``, ``public``, ``API_FIELDS``), its OpenAPI
documentation (jobs/api/serializers.py), the wizard's fields and presets
(jobs/views/wizard.py), the CLI's check (tests/test_cli.py) and the engine's run
(engine/train.py). Adding an option is one field here and its use in the training loop, and in
the planner (engine/plan.py) where it changes memory or time.

Standard library only: the web imports this module, and it must not import torch.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

AUTO = "auto"
BASE_LEARNING_RATE = 2e-4  # learning_rate_multiplier 1.0
METHODS = {"nf4": "qlora", "none": "lora"}  # the API's quantization → the engine's method
# How the learning rate falls after warmup (transformers' get_*_schedule_with_warmup).
SCHEDULES = ("cosine", "linear", "constant")
PRECISIONS = (AUTO, "bf16", "fp32")
ALL_LINEAR, ATTENTION = "all-linear", "attention"  # target_modules' named choices
# OpenAI's method.type: what a job learns from. Supervised reads one answer per row; DPO reads a
# preference file's pairs (engine/data.py format "preference") and learns which answer is better.
SUPERVISED, DPO = "supervised", "dpo"
METHOD_TYPES = (SUPERVISED, DPO)
PREFERENCE_FORMAT = "preference"  # engine/data.py's name for OpenAI's preference rows


class ConfigError(ValueError):
    """A training setting is out of range; the message names the field."""


@dataclass(frozen=True)
class Rule:
    """A bound on a value, and how an error message says it."""

    holds: Callable[[Any], bool]
    text: str


def between(low: int, high: int) -> Rule:
    return Rule(lambda v: low <= v <= high, f"between {low:,} and {high:,}")


def fraction(*, open_high: bool = True) -> Rule:
    if open_high:
        return Rule(lambda v: 0 <= v < 1, "in [0, 1)")
    return Rule(lambda v: 0 < v <= 1, "in (0, 1]")


def at_least(low: float) -> Rule:
    return Rule(lambda v: v >= low, f"at least {low:g}")


POSITIVE = Rule(lambda v: v > 0, "positive")


@dataclass(frozen=True)
class ApiName:
    """A field the API takes under another name or in other units."""

    name: str
    to_config: Callable[[Any], Any]
    from_config: Callable[[Any], Any]
    kind: type
    rule: Rule | None = None
    choices: tuple[str, ...] = ()


LEARNING_RATE_MULTIPLIER = ApiName(
    "learning_rate_multiplier",
    to_config=lambda multiplier: BASE_LEARNING_RATE * multiplier,
    from_config=lambda rate: round(rate / BASE_LEARNING_RATE, 6),
    kind=float,
    rule=Rule(lambda v: 0 < v <= 100, "in (0, 100]"),
)
QUANTIZATION = ApiName(
    "quantization",
    to_config=METHODS.__getitem__,
    from_config={method: q for q, method in METHODS.items()}.__getitem__,
    kind=str,
    choices=tuple(METHODS),
)


def hyperparameter(
    default,
    help: str,
    *,
    rule: Rule | None = None,
    api: bool | ApiName = True,
    openai: bool = False,
    auto: bool = False,
    label: str = "",
    form: str = "",
    choices: tuple[str, ...] = (),
    only_for: str | None = None,
):
    """A TrainConfig field.

    api: False when the API does not take it; an ApiName when it takes it under another name.
    openai: one of OpenAI's own hyperparameters (listed first).
    auto: "auto" (or leaving it out) resolves it from the measured data (engine/plan.py).
    form: how the wizard shows it: "number" or "choice" (a list of ``choices``) under Advanced,
    or "" where the page has its own control (method, packing) or none.
    choices: the values a text field takes (the API refuses others by name).
    only_for: the one method (OpenAI's method.type) the field belongs to, None for all; the
    API shows it only for jobs of that method and refuses it for others.
    """
    return field(
        default=default,
        metadata={
            "help": help,
            "rule": rule,
            "api": api,
            "openai": openai,
            "auto": auto,
            "label": label,
            "form": form,
            "choices": choices,
            "only_for": only_for,
        },
    )


@dataclass
class TrainConfig:
    """What one fine-tuning run does. Saved beside the adapter as training_config.json."""

    n_epochs: int = hyperparameter(
        1,
        "Passes over the training rows, or auto.",
        rule=between(1, 100),
        openai=True,
        auto=True,
        label="Epochs",
        form="number",
    )
    batch_size: int = hyperparameter(
        8,
        "Examples per optimizer step, or auto.",
        rule=between(1, 1024),
        openai=True,
        auto=True,
        label="Batch size",
        form="number",
    )
    learning_rate: float = hyperparameter(
        BASE_LEARNING_RATE,
        f"× {BASE_LEARNING_RATE:g}.",
        rule=fraction(open_high=False),
        api=LEARNING_RATE_MULTIPLIER,
        openai=True,
        label="Learning rate multiplier",
        form="number",
    )
    lora_rank: int = hyperparameter(
        16, "Size of the adapter (r).", rule=between(1, 256), label="LoRA rank", form="number"
    )
    lora_alpha: int = hyperparameter(
        32,
        "Scaling of the adapter's update.",
        rule=between(1, 4096),
        label="LoRA alpha",
        form="number",
    )
    # 0, chosen on bench/quality.py (bench/results/quality-*): with the same examples in the same
    # order, 0.05 left the dates task where it was and held-out loss on docstrings 0.2 % higher,
    # and without it a step is ~12 % faster (peft skips the dropout layer).
    lora_dropout: float = hyperparameter(
        0.0,
        "Dropout on the adapter's input, 0 to 1.",
        rule=fraction(),
        label="LoRA dropout",
        form="number",
    )
    method: str = hyperparameter(
        "lora",
        "auto: LoRA on the full-precision base when it fits the worker with room to spare, "
        "else QLoRA; nf4 forces QLoRA (4-bit base), none forces LoRA.",
        rule=Rule(lambda v: v in METHODS.values(), "qlora or lora"),
        api=QUANTIZATION,
        auto=True,
    )
    max_seq_length: int = hyperparameter(
        1024,
        "Tokens per row, or auto; longer examples are truncated.",
        rule=between(16, 131072),
        auto=True,
        label="Max sequence length",
        form="number",
    )
    max_steps: int | None = hyperparameter(
        None,
        "Stop after this many steps; empty for no limit.",
        rule=between(1, 10_000_000),
        label="Max steps",
        form="number",
    )
    packing: bool = hyperparameter(True, "Pack examples into rows (no padding).")
    # auto: on only when the plan finds that the job would not fit its worker without it
    # (engine/plan.py): each block's activations are recomputed in the backward pass instead
    # of kept, a third more compute for a fraction of the activation memory.
    gradient_checkpointing: bool = hyperparameter(
        False,
        "Recompute activations in the backward pass instead of keeping them: less memory, "
        "slower steps; auto turns it on when the job would not fit otherwise.",
        auto=True,
        label="Gradient checkpointing",
    )
    # auto: bf16 autocast where the worker's hardware computes in bf16 (engine/base_models.py
    # resolve_precision, measured there), fp32 elsewhere; the job records what ran.
    mixed_precision: str = hyperparameter(
        AUTO,
        "What the forward passes compute in: auto (bf16 where the worker's hardware computes "
        "in it, else fp32), bf16 or fp32. The adapter's weights are fp32 either way.",
        rule=Rule(lambda v: v in PRECISIONS, ", ".join(PRECISIONS)),
        choices=PRECISIONS,
        label="Precision",
        form="choice",
    )
    # 0: with 0.03, a short run's first step had a learning rate of 0 (a wasted step); measured
    # on bench/quality.py it made no difference beyond the noise of the random draws.
    warmup_ratio: float = hyperparameter(
        0.0,
        "Share of steps warming up, 0 to 1.",
        rule=fraction(),
        label="Warmup ratio",
        form="number",
    )
    # linear, chosen on bench/quality.py: on the docstrings task cosine's held-out loss was
    # 0.3 % higher with the same examples in the same order; on dates neither won.
    lr_scheduler: str = hyperparameter(
        "linear",
        "How the learning rate falls after warmup: cosine, linear or constant.",
        rule=Rule(lambda v: v in SCHEDULES, "cosine, linear or constant"),
        choices=SCHEDULES,
        label="Learning-rate schedule",
        form="choice",
    )
    # Continual jobs only (a parent adapter). 0.5, chosen on bench/continual.py (two samples,
    # bench/results/continual-2026-12-06-*): a child on a new rule kept 0 % of its parent's rule
    # without replay, 89 % and 98 % with 0.25, 105 % and 100 % with 0.5, and learned the new
    # rule as well with either (0.53-0.68); 0.5 doubles the rows trained, on what are usually
    # small files of traffic.
    replay_fraction: float = hyperparameter(
        0.5,
        "For a job with a parent adapter: the share of its training rows drawn from the "
        "ancestors' training data (0 to 1), so that it keeps what they learned.",
        rule=fraction(),
        label="Replay fraction",
    )
    # Off by default: a held-out pass costs a share of a step per held-out row, and the job's
    # evaluation measures the held-out loss after training anyway.
    eval_every: int | None = hyperparameter(
        None,
        "Measure the held-out loss every this many steps, and keep the adapter of the step "
        "where it was lowest; empty to measure it once, after training.",
        rule=between(1, 10_000_000),
        label="Evaluate every (steps)",
        form="number",
    )
    early_stopping_patience: int | None = hyperparameter(
        None,
        "With eval_every: stop when the held-out loss has not improved for this many "
        "measurements; empty to train every step.",
        rule=between(1, 10_000),
        label="Early stopping patience",
        form="number",
    )
    checkpoint_every: int = hyperparameter(
        50, "Steps between checkpoints.", rule=between(1, 10_000_000)
    )
    validation_fraction: float = hyperparameter(
        0.1, "Share of the rows held out when no validation file is given.", rule=fraction()
    )
    target_modules: str = hyperparameter(
        ALL_LINEAR,
        "Which layers get the adapter: all-linear (every linear layer of every block), "
        "attention (the attention projections), or module names separated by commas "
        "(q_proj,v_proj).",
        rule=Rule(
            lambda v: v in (ALL_LINEAR, ATTENTION) or re.fullmatch(r"\w+(,\w+)*", v) is not None,
            "all-linear, attention, or module names separated by commas",
        ),
        label="Target modules",
    )
    # peft's LoRA variants. DoRA splits each update into a direction and a magnitude (learns a
    # little more per rank, costs more a step, and is served in batches of its own:
    # engine/batching.py); rsLoRA scales the update by alpha/sqrt(rank) instead of alpha/rank,
    # which keeps high ranks learning.
    use_dora: bool = hyperparameter(False, "DoRA (weight-decomposed LoRA).", label="DoRA")
    use_rslora: bool = hyperparameter(
        False, "rsLoRA: scale the update by alpha/sqrt(rank).", label="rsLoRA"
    )
    # DPO's beta, OpenAI's own: how strongly the adapter is held to the reference (the base, or
    # the parent adapter it starts from). auto is 0.1, TRL's and the DPO paper's default.
    beta: float = hyperparameter(
        0.1,
        "DPO only: how close the adapter is held to its reference model, or auto (0.1); lower "
        "lets it move further from it toward the preferred answers.",
        rule=Rule(lambda v: 0 < v <= 2, "in (0, 2]"),
        openai=True,
        auto=True,
        label="Beta (DPO)",
        form="number",
        only_for=DPO,
    )
    # Where the job runs (engine/plan.py route): the cheapest worker class that fits it unless
    # one is named, and on how many of that class's devices at once (data parallel, one process
    # per device: worker/training.py).
    worker_class: str | None = hyperparameter(
        None,
        "Run on this worker class (its name) rather than on the cheapest class the job fits.",
        rule=Rule(
            lambda v: re.fullmatch(r"[a-z0-9][a-z0-9_-]{0,62}", v) is not None,
            "a worker class's name (lower-case letters, digits, - and _)",
        ),
        label="Worker class",
    )
    gpus: int = hyperparameter(
        1,
        "Devices the job trains on at once, each taking a share of every step's rows; the job "
        "runs on a worker class with at least this many.",
        rule=between(1, 64),
        label="GPUs",
    )
    # OpenAI's method.type, taken from the request's method object rather than its
    # hyperparameters (from_request).
    objective: str = hyperparameter(
        SUPERVISED,
        "supervised: learn the answer of each row; dpo: learn, from pairs of a preferred and a "
        "non-preferred answer, to prefer the first (Direct Preference Optimization).",
        rule=Rule(lambda v: v in METHOD_TYPES, " or ".join(METHOD_TYPES)),
        api=False,
    )
    weight_decay: float = hyperparameter(0.0, "AdamW weight decay.", rule=at_least(0), api=False)
    max_grad_norm: float = hyperparameter(1.0, "Gradient clipping.", rule=POSITIVE, api=False)
    # The job's top-level ``seed`` (OpenAI's), not one of its hyperparameters.
    seed: int = hyperparameter(42, "Makes a run repeatable.", api=False)

    def __post_init__(self):
        for spec in fields(self):
            rule, value = spec.metadata["rule"], getattr(self, spec.name)
            if rule is not None and value is not None and not rule.holds(value):
                raise ConfigError(f"{spec.name} must be {rule.text}, got {value!r}")
        if self.objective == DPO and self.gpus > 1:
            raise ConfigError("gpus must be 1 for a DPO job: DPO trains on one device for now.")

    @property
    def sides(self) -> int:
        """Sequences per training example: 1, or a DPO pair's preferred and non-preferred."""
        return 2 if self.objective == DPO else 1

    @property
    def quantization(self) -> str:
        return QUANTIZATION.from_config(self.method)


# --- the API's view ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ApiField:
    """One hyperparameter as the API, the wizard and the CLI see it."""

    name: str
    config_name: str
    kind: type
    default: Any
    help: str
    auto: bool
    openai: bool
    nullable: bool
    label: str
    form: str
    choices: tuple[str, ...]
    convert: ApiName | None
    only_for: str | None  # the only method (method.type) it applies to; None for every method


def _api_fields() -> tuple[ApiField, ...]:
    found = []
    for spec in fields(TrainConfig):
        api = spec.metadata["api"]
        if api is False:
            continue
        convert = api if isinstance(api, ApiName) else None
        # The annotation is a string here (postponed evaluation): "int", "int | None", "bool"…
        kinds = {"int": int, "float": float, "bool": bool}
        kind = convert.kind if convert else kinds.get(str(spec.type).split(" ")[0], str)
        found.append(
            ApiField(
                name=convert.name if convert else spec.name,
                config_name=spec.name,
                kind=kind,
                default=convert.from_config(spec.default) if convert else spec.default,
                help=spec.metadata["help"],
                auto=spec.metadata["auto"],
                openai=spec.metadata["openai"],
                nullable=spec.default is None,
                label=spec.metadata["label"] or spec.name,
                form=spec.metadata["form"],
                choices=convert.choices if convert else spec.metadata["choices"],
                convert=convert,
                only_for=spec.metadata["only_for"],
            )
        )
    return tuple(sorted(found, key=lambda f: not f.openai))  # OpenAI's first, as it lists them


API_FIELDS = _api_fields()
API_NAMES = tuple(f.name for f in API_FIELDS)
AUTO_RESOLVED = tuple(f.name for f in API_FIELDS if f.auto)
_BY_NAME = {f.name: f for f in API_FIELDS}


def from_request(requested: dict, method_type: str = SUPERVISED) -> dict:
    """TrainConfig's arguments from the API's hyperparameters for a job of ``method_type``
    (OpenAI's method.type): types checked, names and units converted; "auto", null and absent
    left out (the plan resolves them). Raises ConfigError naming the field."""
    if not isinstance(requested, dict):
        raise ConfigError("hyperparameters must be an object.")
    if method_type not in METHOD_TYPES:
        raise ConfigError(f"method.type must be {' or '.join(METHOD_TYPES)}, got {method_type!r}")
    unknown = sorted(set(requested) - set(API_NAMES))
    if unknown:
        raise ConfigError(
            f"Unknown hyperparameter {unknown[0]!r}; Loft takes {', '.join(API_NAMES)}."
        )
    config = {} if method_type == SUPERVISED else {"objective": method_type}
    for name, value in requested.items():
        owner = _BY_NAME[name].only_for
        if owner not in (None, method_type):
            raise ConfigError(f"{name} applies to {owner} jobs only (method.type {owner!r}).")
        if value == AUTO or value is None:
            continue
        api_field = _BY_NAME[name]
        value = _checked(api_field, value)
        if api_field.convert:
            if api_field.convert.rule and not api_field.convert.rule.holds(value):
                raise ConfigError(f"{name} must be {api_field.convert.rule.text}, got {value}")
            value = api_field.convert.to_config(value)
        config[api_field.config_name] = value
    return config


# What a job stored before a field existed ran with, where that is not the field's default.
BEFORE_THE_FIELD = {"lr_scheduler": "cosine", "replay_fraction": 0.0, "mixed_precision": "fp32"}


def as_stored(config: dict) -> dict:
    """A job's stored TrainConfig arguments, with every field added since filled in as the job
    ran: a resumed or shown job keeps its settings across an upgrade."""
    defaults = {spec.name: spec.default for spec in fields(TrainConfig)}
    return {**defaults, **BEFORE_THE_FIELD, **config}


def public(config: dict) -> dict:
    """A stored TrainConfig as the API shows it: OpenAI's names first, then Loft's; those of
    another method than the job's left out."""
    config = as_stored(config)
    shown = {}
    for f in API_FIELDS:
        if f.only_for not in (None, config["objective"]):
            continue
        value = config[f.config_name]
        shown[f.name] = f.convert.from_config(value) if f.convert else value
    return shown


def method_type_of(config: dict) -> str:
    """A stored TrainConfig's method (OpenAI's method.type)."""
    return as_stored(config)["objective"]


def method_object(config: dict, shown: dict) -> dict:
    """OpenAI's ``method`` member of a job: its type, and the hyperparameters as shown."""
    method_type = method_type_of(config)
    return {"type": method_type, method_type: {"hyperparameters": shown}}


def method_fits_file(method_type: str, file_format: str) -> str | None:
    """None where a file of ``file_format`` (engine/data.py's name; empty while unmeasured)
    can train a job of ``method_type``; else the sentence that says why not."""
    if method_type == DPO and file_format not in ("", PREFERENCE_FORMAT):
        return (
            f"A DPO job needs a preference file (rows of input, preferred_output and "
            f"non_preferred_output); this file is in the {file_format} format."
        )
    return None


def api_defaults() -> dict:
    """Every API hyperparameter at its default, "auto" where the data decides."""
    return {f.name: AUTO if f.auto else f.default for f in API_FIELDS}


def _number(value, name: str) -> float:
    """A finite float; huge integers and NaN are refused here rather than overflow later."""
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        number = math.nan
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(number):
        raise ConfigError(f"{name} must be a number or 'auto', got {str(value)[:40]}")
    return number


def _checked(api_field: ApiField, value):
    name, kind = api_field.name, api_field.kind
    if api_field.choices:
        if value not in api_field.choices:
            allowed = [AUTO, *api_field.choices] if api_field.auto else list(api_field.choices)
            raise ConfigError(
                f"{name} must be {', '.join(allowed[:-1])} or {allowed[-1]}, "
                f"got {str(value)[:40]!r}"
            )
        return value
    if kind is float:
        return _number(value, name)
    if kind is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name} must be a string, got {str(value)[:40]}")
        return value
    if kind is bool:
        ok = isinstance(value, bool)
    else:  # a whole number: 2 or 2.0, never true
        ok = not isinstance(value, bool) and (
            isinstance(value, int) or (isinstance(value, float) and value.is_integer())
        )
    if not ok:
        wanted = "true or false" if kind is bool else "an integer"
        raise ConfigError(f"{name} must be {wanted} or 'auto', got {str(value)[:40]}")
    return int(value) if kind is int else value


# --- the wizard's presets ------------------------------------------------------------------------


@dataclass(frozen=True)
class Preset:
    label: str
    help: str
    changes: dict  # API names → values, over api_defaults()

    @property
    def values(self) -> dict:
        return {**api_defaults(), **self.changes}


PRESETS = {
    "quick": Preset(
        "Quick",
        "One pass over the data with a small adapter: a first result in minutes.",
        {"n_epochs": 1, "lora_rank": 8, "lora_alpha": 16, "learning_rate_multiplier": 2.0},
    ),
    "balanced": Preset(
        "Balanced",
        "Epochs chosen from the data size (OpenAI's rule), a medium adapter.",
        {"lora_rank": 16, "lora_alpha": 32, "learning_rate_multiplier": 1.0},
    ),
    "thorough": Preset(
        "Thorough",
        "More epochs, a larger adapter and a gentler learning rate; takes longest.",
        {"n_epochs": 5, "lora_rank": 32, "lora_alpha": 64, "learning_rate_multiplier": 0.5},
    ),
}
