"""Pre-flight: resolve "auto" settings from the data, and estimate a run before it is queued.

A job that cannot fit on the worker should be refused with numbers and a way out when it is
submitted, not die of out-of-memory an hour later. The estimates are deliberately simple and
err high: weights + LoRA and its optimizer state + the activations kept for the backward pass
of one micro-batch + the vocabulary projection of its trained tokens.

No Django here: the API turns a File's validation report into ``DataStats`` and the base model
row into ``ModelShape``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields

from engine.hyperparameters import METHODS, QUANTIZATION, ConfigError, TrainConfig

# OpenAI's published defaults for "auto" epochs: aim at 3 epochs, but see at least 100 and at
# most 25,000 examples in total.
TARGET_EPOCHS = 3
MIN_TARGET_EXAMPLES = 100
MAX_TARGET_EXAMPLES = 25_000
MAX_AUTO_EPOCHS = 25
# Startup before the first step: loading the base model, tokenizing, the first checkpoint.
STARTUP_SECONDS = 30
# Added to the sum of the parts: the estimate should err high, not low.
MEMORY_MARGIN = 0.2
# quantization "auto" trains LoRA on the full-precision base when its estimate (margin included)
# takes at most this share of the worker's memory, QLoRA otherwise. Full precision learns better
# (a QLoRA adapter is trained to correct a 4-bit base, and loses on the full-precision base users
# load: bench/quality.py) and, on a CPU, trains faster; QLoRA is for bases that do not fit.
LORA_MEMORY_SHARE = 0.75
GIB = 2**30
# A step's examples are packed into forwards of at least this many tokens (engine/train.py),
# each example attending only to itself (engine/attention.py), because one big forward costs
# less than several small ones: fewer passes over the weights, bigger matmuls. Measured on a
# 2-core Xeon CPU with AMX (SmolLM2-135M, LoRA r16 on all linear layers, bf16, steps of 8
# examples of 68-301 tokens): forwards of 512 tokens 174 label tokens/s, 1024 192, 2048 220
# (the whole step). A forward of 2048 doubles what it holds, so the method and gradient
# checkpointing are chosen for forwards of 1024, and a job takes 2048 only where that still
# leaves the room LORA_MEMORY_SHARE asks for (``forward_tokens``). (Before attention was per
# example, its mask grew with the square of the row and 512 was the best size.) On a GPU,
# unverified.
FORWARD_TOKENS = 1024
FORWARD_TOKENS_WITH_ROOM = 2048
# The trained positions whose logits exist at once (engine/train.py LinearCrossEntropy).
LOSS_CHUNK = 256


@dataclass(frozen=True)
class ModelShape:
    """What memory and speed depend on. ``from_parameters`` guesses it when a catalogue entry
    has no architecture recorded."""

    parameters: int
    hidden_size: int
    num_layers: int
    intermediate_size: int
    vocab_size: int
    tied_embeddings: bool = True
    num_attention_heads: int = 0  # 0: hidden_size / 64

    @property
    def heads(self) -> int:
        return self.num_attention_heads or max(1, self.hidden_size // 64)

    @classmethod
    def from_parameters(cls, parameters: int) -> ModelShape:
        """A guess that errs high where it matters: a large vocabulary (logits) and untied
        embeddings (kept unquantized)."""
        layers = 32
        hidden = int(math.sqrt(parameters / (12 * layers)))
        return cls(parameters, hidden, layers, int(hidden * 8 / 3), 152_064, False)

    @property
    def embedding_parameters(self) -> int:
        """The input embeddings and the output projection: bitsandbytes leaves them
        unquantized, and peft's prepare_model_for_kbit_training keeps them in float32."""
        return self.vocab_size * self.hidden_size * (1 if self.tied_embeddings else 2)

    def lora_parameters(self, rank: int) -> int:
        """LoRA on every linear layer of every block (peft's "all-linear"): A and B matrices
        on q, k, v, o (hidden→hidden, an upper bound for grouped k/v) and gate, up, down."""
        attention = 4 * rank * (2 * self.hidden_size)
        mlp = 3 * rank * (self.hidden_size + self.intermediate_size)
        return self.num_layers * (attention + mlp)


@dataclass(frozen=True)
class DataStats:
    rows: int
    tokens: int
    max_row_tokens: int

    @classmethod
    def of_lengths(cls, lengths: list[int]) -> DataStats:
        """From each row's token count (a script's tokenized rows; the API has a report)."""
        return cls(rows=len(lengths), tokens=sum(lengths), max_row_tokens=max(lengths, default=0))


@dataclass(frozen=True)
class WorkerClass:
    """The machines one training queue's workers run on (``train.<name>``): each worker
    declares its class and publishes it with its heartbeat. Memory is per device; throughput
    is measured for a 135M-parameter model on one device (bench/train.py) and scaled by
    parameter count for others. ``cost_per_hour`` is what an hour of one worker of the class
    costs, in whatever unit the operator prices in: a job goes to the class where it costs
    least (``route``)."""

    name: str
    memory_bytes: int
    tokens_per_second_135m: float
    bytes_per_activation: int = 4  # float32 on CPU; 2 on a GPU with bf16
    device_kind: str = "cpu"  # cpu | cuda
    devices: int = 1
    cost_per_hour: float = 1.0

    def tokens_per_second(self, parameters: int) -> float:
        return self.tokens_per_second_135m * 135e6 / max(parameters, 1)

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, declared: dict) -> WorkerClass:
        """A class as a worker published it or an operator declared it; unknown keys (from a
        newer worker) are left out, missing optional ones take their defaults."""
        known = {f.name for f in fields(cls)}
        try:
            return cls(**{key: value for key, value in declared.items() if key in known})
        except (TypeError, AttributeError) as error:
            raise ConfigError(
                f"{declared!r} is not a worker class ({error}); each needs name, memory_bytes "
                "and tokens_per_second_135m."
            ) from None


# --- "auto" ----------------------------------------------------------------------------------


def auto_epochs(train_rows: int) -> int:
    if train_rows * TARGET_EPOCHS < MIN_TARGET_EXAMPLES:
        return min(MAX_AUTO_EPOCHS, max(1, MIN_TARGET_EXAMPLES // max(train_rows, 1)))
    if train_rows * TARGET_EPOCHS > MAX_TARGET_EXAMPLES:
        return max(1, MAX_TARGET_EXAMPLES // train_rows)
    return TARGET_EPOCHS


def auto_batch_size(train_rows: int) -> int:
    """About 0.2 % of the examples, a power of two between 1 and 32 (OpenAI's rule, capped)."""
    wanted = max(1.0, train_rows * 0.002)
    return min(32, 2 ** round(math.log2(wanted)))


def auto_max_seq_length(
    max_row_tokens: int, context_length: int, fits: Callable[[int], bool] = lambda length: True
) -> int:
    """The longest row rounded up to a power of two, at least 128, at most the context; then
    halved while a run at that length would not fit (a rare long row is truncated instead of
    the job refused)."""
    length = min(context_length, max(128, 2 ** math.ceil(math.log2(max(max_row_tokens, 1)))))
    while length > 128 and not fits(length):
        length //= 2
    return length


def training_examples(stats: DataStats, config: TrainConfig, has_validation_file: bool) -> int:
    return train_rows(stats, config.validation_fraction, has_validation_file)


def replayed_rows(new_rows: int, config: TrainConfig, available: int) -> int:
    """How many of its ancestors' rows a job with a parent adapter trains on beside its
    ``new_rows``: so many that they make ``replay_fraction`` of the rows, at most ``available``
    (worker/training.py draws them)."""
    if not 0 < config.replay_fraction < 1:
        return 0
    wanted = round(new_rows * config.replay_fraction / (1 - config.replay_fraction))
    return min(wanted, available)


def train_rows(stats: DataStats, validation_fraction: float, has_validation_file: bool) -> int:
    """Rows left for training once a share is held out (train.split_validation's rule)."""
    if has_validation_file or validation_fraction <= 0 or stats.rows < 2:
        return stats.rows
    return stats.rows - min(500, max(1, round(stats.rows * validation_fraction)))


def auto_quantization(lora_peak_bytes: int, worker: WorkerClass) -> str:
    """ "none" (LoRA on the full-precision base) when its estimated peak fits the worker with
    room to spare, "nf4" (QLoRA) when memory demands it."""
    return "none" if lora_peak_bytes <= LORA_MEMORY_SHARE * worker.memory_bytes else "nf4"


def resolve_auto(
    given: dict,
    stats: DataStats,
    shape: ModelShape,
    worker: WorkerClass,
    *,
    context_length: int,
    has_validation_file: bool,
) -> dict:
    """TrainConfig's arguments with what "auto" left open (epochs, batch size, method, sequence
    length) chosen from the measured data and the worker; what was given is kept.

    The method is chosen for the sequence length the data asks for (its longest row), before
    that length is fitted to the method: a job is not quantized to keep a rare long row."""
    config = dict(given)
    settled = {**asdict(TrainConfig()), **config}
    rows = train_rows(stats, settled["validation_fraction"], has_validation_file)
    config.setdefault("n_epochs", auto_epochs(rows))
    config.setdefault("batch_size", auto_batch_size(rows))
    if "method" not in config:
        wanted_length = config.get("max_seq_length") or auto_max_seq_length(
            stats.max_row_tokens, context_length
        )
        lora_peak = peak_memory(
            shape,
            quantization="none",
            lora_rank=settled["lora_rank"],
            batch=micro_batch(
                packing=settled["packing"],
                batch_size=config["batch_size"],
                max_seq_length=wanted_length,
                max_row_tokens=stats.max_row_tokens,
            ),
            bytes_per_activation=worker.bytes_per_activation,
        )["total"]
        quantization = auto_quantization(lora_peak, worker)
        config["method"] = settled["method"] = METHODS[quantization]
    quantization = QUANTIZATION.from_config(settled["method"])

    def fits(length: int, checkpointing: bool) -> bool:
        batch = micro_batch(
            packing=settled["packing"],
            batch_size=config["batch_size"],
            max_seq_length=length,
            max_row_tokens=stats.max_row_tokens,
        )
        return fits_in_memory(
            shape,
            worker,
            quantization=quantization,
            lora_rank=settled["lora_rank"],
            batch=batch,
            gradient_checkpointing=checkpointing,
        )

    if "gradient_checkpointing" not in config:
        # On where the rows the data asks for fit only with it: slower steps rather than
        # truncated rows.
        length = config.get("max_seq_length") or auto_max_seq_length(
            stats.max_row_tokens, context_length
        )
        config["gradient_checkpointing"] = not fits(length, False) and fits(length, True)
    if "max_seq_length" not in config:
        config["max_seq_length"] = auto_max_seq_length(
            stats.max_row_tokens,
            context_length,
            fits=lambda length: fits(length, config["gradient_checkpointing"]),
        )
    return config


# --- the estimate ----------------------------------------------------------------------------


@dataclass
class Plan:
    training_examples: int
    tokens_per_epoch: int
    n_epochs: int
    steps: int
    trained_tokens: int
    tokens_per_step: int
    forward_tokens: int  # the tokens of one forward pass (engine/train.py packs rows of them)
    worker_class: str
    quantization: str  # the API's name: "none" (LoRA) or "nf4" (QLoRA)
    method_reason: str  # which method, and why, in a sentence
    peak_memory_by_quantization: dict  # both methods sized for this worker, "none" and "nf4"
    estimated_seconds: int
    estimated_peak_memory_bytes: int
    memory_breakdown: dict
    worker_memory_bytes: int
    fits: bool
    suggestion: str | None
    gpus: int = 1  # devices the job trains on at once, all of its worker class's kind
    estimated_cost: float = 0.0  # the class's cost_per_hour times the estimated hours
    # Every class the job was planned on when it was routed (``route``): name, whether it
    # fits, estimated seconds and cost; the chosen one is ``worker_class``.
    classes_considered: list = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"object": "fine_tuning.job.plan", **asdict(self)}

    @property
    def class_name(self) -> str:
        return self.worker_class

    @staticmethod
    def class_name_of(stored: dict | None) -> str | None:
        """The worker class a stored plan (``as_dict``) routed its job to; None for no plan."""
        return (stored or {}).get("worker_class")


def peak_memory(
    shape: ModelShape,
    *,
    quantization: str,
    lora_rank: int,
    batch: MicroBatch,
    bytes_per_activation: int,
    gradient_checkpointing: bool = False,
) -> dict:
    """Bytes by part for training on one micro-batch, with a margin. With gradient
    checkpointing, only each block's input is kept for the backward pass, and one block's
    activations at a time are recomputed (derived from the same coefficients, not measured)."""
    linear = max(shape.parameters - shape.embedding_parameters, 0)
    fp32_base = quantization != "nf4" and bytes_per_activation == 4
    if quantization == "nf4":  # 4-bit blocks + their scales; embeddings stay in float32
        weights = linear * 0.55 + shape.embedding_parameters * 4
    else:
        weights = shape.parameters * bytes_per_activation
    lora = shape.lora_parameters(lora_rank)
    # Kept for backward, per token and layer: the inputs and outputs of every projection,
    # norm, activation and LoRA dropout, in the activation dtype. The coefficients are fitted
    # to peak RSS measured on SmolLM2-135M on a CPU (bench/plan_memory.py): ~4 MiB a token.
    per_token = shape.num_layers * (30 * shape.hidden_size + 8 * shape.intermediate_size)
    layers_kept = shape.num_layers
    if gradient_checkpointing:
        per_token = per_token // shape.num_layers + shape.num_layers * shape.hidden_size
        layers_kept = 1
    parts = {
        "weights": int(weights),
        # An fp32 base's linear layers also in bf16 while a bf16 run trains (engine/train.py
        # FrozenWeightsInBf16); counted for every fp32 base, bf16 run or not.
        "bf16_weight_copy": linear * 2 if fp32_base else 0,
        # fp32 LoRA weights, their gradients and AdamW's two moments.
        "lora_and_optimizer": lora * 16,
        "activations": batch.tokens * per_token * bytes_per_activation,
        # Attention probabilities where the kernel materialises them (the CPU's math path):
        # heads × length² per sequence and layer (each packed example is its own sequence).
        "attention": layers_kept * shape.heads * batch.tokens * batch.sequence_length * 4,
        # The float32 logits of LOSS_CHUNK trained positions and their softmax (the loss
        # computes the head's gradient a chunk at a time).
        "logits": min(batch.tokens, LOSS_CHUNK) * shape.vocab_size * 4 * 2,
        # The framework itself: torch, the tokenizer, allocator slack (~1 GiB measured).
        "overhead": GIB,
    }
    parts["margin"] = int(sum(parts.values()) * MEMORY_MARGIN)
    parts["total"] = sum(parts.values())
    return parts


def fits_in_memory(
    shape: ModelShape,
    worker: WorkerClass,
    *,
    quantization: str,
    lora_rank: int,
    batch: MicroBatch,
    gradient_checkpointing: bool = False,
) -> bool:
    total = peak_memory(
        shape,
        quantization=quantization,
        lora_rank=lora_rank,
        batch=batch,
        bytes_per_activation=worker.bytes_per_activation,
        gradient_checkpointing=gradient_checkpointing,
    )["total"]
    return total <= worker.memory_bytes


@dataclass(frozen=True)
class MicroBatch:
    """What goes through the model at once: its tokens, in sequences of this length."""

    tokens: int
    sequence_length: int


def micro_batch(
    *,
    packing: bool,
    batch_size: int,
    max_seq_length: int,
    max_row_tokens: int,
    forward_tokens: int = FORWARD_TOKENS,
    sides: int = 1,
) -> MicroBatch:
    """Packed: one row of max_seq_length tokens at a time (train.py backs each row off on its
    own), or of ``forward_tokens`` where rows are shorter; its examples attend each to itself,
    so none is longer than max_seq_length. A DPO pair (``sides`` 2) is packed whole, so a row
    holds up to twice that. Padded: the whole batch at once (``batch_size`` sequences), padded
    to its longest sequence."""
    if packing:
        return MicroBatch(max(max_seq_length * sides, forward_tokens), max_seq_length)
    length = min(max_seq_length, max_row_tokens)
    return MicroBatch(batch_size * length, length)


def estimate(
    shape: ModelShape,
    stats: DataStats,
    worker: WorkerClass,
    config: TrainConfig,
    *,
    training_examples: int,
) -> Plan:
    mean_tokens = stats.tokens / max(stats.rows, 1)  # a DPO pair's: both its answers' rows
    per_example = min(mean_tokens, config.max_seq_length * config.sides)
    steps_per_epoch = math.ceil(training_examples / config.batch_size)
    steps = steps_per_epoch * config.n_epochs
    if config.max_steps:
        steps = min(steps, config.max_steps)
    examples_seen = min(config.n_epochs * training_examples, steps * config.batch_size)
    trained_tokens = int(examples_seen * per_example)
    forward = forward_tokens(shape, stats, worker, config)
    memory = job_peak_memory(shape, stats, worker, config, forward_tokens=forward)
    # Data parallel: each device takes a share of every step's rows (engine/train.py).
    throughput = worker.tokens_per_second(shape.parameters) * config.gpus
    seconds = STARTUP_SECONDS + trained_tokens / throughput
    if config.sides == 2:  # DPO's reference: one forward pass over the pairs before training,
        # about a third of a training step's work per token (a forward of forward + backward)
        seconds += training_examples * per_example / throughput / 3
    enough_devices = config.gpus <= worker.devices
    fits = memory["total"] <= worker.memory_bytes and enough_devices
    # Both methods as "auto" weighs them: at the forward size the method is chosen for.
    both = {
        quantization: job_peak_memory(shape, stats, worker, config, quantization)["total"]
        for quantization in ("none", "nf4")
    }
    return Plan(
        training_examples=training_examples,
        tokens_per_epoch=int(training_examples * per_example),
        n_epochs=config.n_epochs,
        steps=steps,
        trained_tokens=trained_tokens,
        tokens_per_step=int(min(config.batch_size, training_examples) * per_example),
        forward_tokens=forward,
        worker_class=worker.name,
        quantization=config.quantization,
        method_reason=method_reason(worker, config.quantization, both),
        peak_memory_by_quantization=both,
        estimated_seconds=int(seconds),
        estimated_peak_memory_bytes=memory["total"],
        memory_breakdown=memory,
        worker_memory_bytes=worker.memory_bytes,
        fits=fits,
        suggestion=(
            None
            if fits
            else _suggestion(shape, stats, worker, config)
            if enough_devices
            else f"A {worker.name} worker has {worker.devices} device(s); ask for at most "
            f"that many gpus, or for a worker class with more."
        ),
        gpus=config.gpus,
        estimated_cost=round(worker.cost_per_hour * seconds / 3600, 6),
    )


# --- routing: which worker class a job runs on ---------------------------------------------------


def route(
    requested: dict,
    classes: list[WorkerClass],
    plan_on: Callable[[dict, WorkerClass], tuple[dict, Plan]],
) -> tuple[dict, Plan]:
    """The job's settings and plan on the class it goes to: the class its settings name, or
    else the one where it costs least among those it fits (its estimated hours times the
    class's cost per hour; the smaller memory on a tie). ``plan_on(settings, class)`` gives the
    settings with "auto" resolved for that class and the job's plan there, since what fits
    depends on the class (a method, a gradient-checkpointing choice). None fits: the plan on
    the class with the most devices and memory, whose suggestion says what would. The job is
    planned on every class either way (``classes_considered``), and the settings returned name
    the chosen one, so that it is planned there again later."""
    named = requested.get("worker_class")
    if named is not None:
        class_named(classes, named)  # refused by name when no class has it
    options = [(worker, *plan_on(requested, worker)) for worker in classes]
    fitting = [option for option in options if option[2].fits]
    if named is not None:
        [(worker, settings, plan)] = [option for option in options if option[0].name == named]
    elif fitting:
        worker, settings, plan = min(
            fitting, key=lambda o: (o[2].estimated_cost, o[0].memory_bytes)
        )
    else:
        worker, settings, plan = max(options, key=lambda o: (o[0].devices, o[0].memory_bytes))
    plan.classes_considered = [
        {
            "name": other.name,
            "fits": other_plan.fits,
            "estimated_seconds": other_plan.estimated_seconds,
            "estimated_cost": other_plan.estimated_cost,
        }
        for other, _, other_plan in options
    ]
    return {**settings, "worker_class": worker.name}, plan


def refuse_unknown_class(requested: dict, classes: list[WorkerClass]) -> None:
    """Settings that name a class no worker declares are refused (ConfigError) by name."""
    if requested.get("worker_class") is not None:
        class_named(classes, requested["worker_class"])


def class_named(classes: list[WorkerClass], name: str) -> WorkerClass:
    """The known class of that name; a name no worker declared is refused with the names that
    are."""
    for worker in classes:
        if worker.name == name:
            return worker
    known = ", ".join(worker.name for worker in classes)
    raise ConfigError(
        f"worker_class must be one of the known worker classes ({known}), got {name!r}"
    )


def job_peak_memory(
    shape: ModelShape,
    stats: DataStats,
    worker: WorkerClass,
    config: TrainConfig,
    quantization: str | None = None,
    *,
    forward_tokens: int = FORWARD_TOKENS,
) -> dict:
    """peak_memory for a job's settings on the worker (with another ``quantization`` if
    given), its packed forwards of ``forward_tokens``."""
    return peak_memory(
        shape,
        quantization=quantization or config.quantization,
        lora_rank=config.lora_rank,
        batch=micro_batch(
            packing=config.packing,
            batch_size=config.batch_size * config.sides,
            max_seq_length=config.max_seq_length,
            max_row_tokens=stats.max_row_tokens,
            forward_tokens=forward_tokens,
            sides=config.sides,
        ),
        bytes_per_activation=worker.bytes_per_activation,
        gradient_checkpointing=config.gradient_checkpointing,
    )


def forward_tokens(
    shape: ModelShape, stats: DataStats, worker: WorkerClass, config: TrainConfig
) -> int:
    """The tokens a packed forward holds: FORWARD_TOKENS_WITH_ROOM (faster) where that peak
    still leaves the worker the room LORA_MEMORY_SHARE asks for, else FORWARD_TOKENS (what the
    method and gradient checkpointing were chosen for); max_seq_length where it is longer."""
    if not config.packing or config.max_seq_length >= FORWARD_TOKENS_WITH_ROOM:
        return max(config.max_seq_length, FORWARD_TOKENS)
    roomy = job_peak_memory(shape, stats, worker, config, forward_tokens=FORWARD_TOKENS_WITH_ROOM)[
        "total"
    ]
    if roomy <= LORA_MEMORY_SHARE * worker.memory_bytes:
        return FORWARD_TOKENS_WITH_ROOM
    return max(config.max_seq_length, FORWARD_TOKENS)


def method_reason(worker: WorkerClass, quantization: str, peaks: dict) -> str:
    """Which method the job trains with, and why, in a sentence: what "auto" weighs (the
    estimated peak of each method, ``peaks``, against the worker's memory), and whether the job
    was given the method or the plan chose it."""

    def gib(quantization: str) -> str:
        return f"{peaks[quantization] / GIB:.1f} GiB"

    memory = f"{worker.memory_bytes / GIB:.1f} GiB"
    chosen = auto_quantization(peaks["none"], worker)
    if quantization == "none":
        why = (
            "it fits with room to spare"
            if chosen == "none"
            else "not the plan's choice, QLoRA would leave more room"
        )
        return (
            f"LoRA on the full-precision base ({gib('none')} of the {worker.name} worker's "
            f"{memory}): {why}."
        )
    if chosen == "nf4":
        return (
            f"QLoRA on a 4-bit base ({gib('nf4')}): LoRA on the full-precision base would "
            f"need {gib('none')}, more than {LORA_MEMORY_SHARE:.0%} of the {worker.name} "
            f"worker's {memory}."
        )
    return (
        f"QLoRA on a 4-bit base ({gib('nf4')}), not the plan's choice (given, or kept from the "
        f"parent adapter): LoRA on the full-precision base would fit ({gib('none')} of {memory}) "
        "and usually learns better."
    )


def _suggestion(shape, stats, worker, config: TrainConfig) -> str:
    """The nearest settings that fit, in words: turn packing on, then gradient checkpointing,
    then halve what drives memory."""
    quantization, packing = config.quantization, config.packing
    batch_size, max_seq_length = config.batch_size, config.max_seq_length

    def fits(checkpointing: bool = config.gradient_checkpointing, **changes) -> bool:
        settings = {
            "packing": packing,
            "batch_size": batch_size,
            "max_seq_length": max_seq_length,
            **changes,
        }
        return fits_in_memory(
            shape,
            worker,
            quantization=quantization,
            lora_rank=config.lora_rank,
            batch=micro_batch(max_row_tokens=stats.max_row_tokens, **settings),
            gradient_checkpointing=checkpointing,
        )

    if not packing and fits(packing=True):
        return "Set packing to true: packed rows are trained one at a time."
    if not config.gradient_checkpointing and fits(checkpointing=True):
        return (
            "Set gradient_checkpointing to true: activations are then recomputed in the "
            "backward pass instead of kept (steps take about a third longer)."
        )
    if not packing:
        size = batch_size
        while size > 1 and not fits(batch_size=size):
            size //= 2
        if fits(batch_size=size):
            return f"Lower batch_size to {size}, or set packing to true."
    length = max_seq_length
    while length > 16 and not fits(max_seq_length=length, packing=True):
        length //= 2
    if fits(max_seq_length=length, packing=True):
        return f"Lower max_seq_length to {length} with packing on."
    if quantization != "nf4":
        return "Use quantization nf4 (QLoRA): the base model then takes a quarter of the memory."
    return f"This base model does not fit on {worker.name} workers; pick a smaller one."
