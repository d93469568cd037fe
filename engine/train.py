"""The training loop: LoRA / QLoRA on a causal LM, packed, checkpointed, resumable, cancellable.

No Django, no Celery, no S3: a run takes a config, tokenized examples, a base model and
callbacks, and writes checkpoints and the adapter into local folders. It reads top to bottom:

    setup (seed, LoRA on the base, optimizer, schedule, resume)
    → train (one optimizer step = the next ``batch_size`` examples, packed into rows)
    → save (the adapter and the config)

A run is supervised (the cross-entropy of each example's answers) or, with ``objective`` "dpo",
Direct Preference Optimization on pairs of a preferred and a non-preferred answer (the DPO
section below: the reference before the first step, then the same loop on pairs).

Why a loop of its own rather than transformers' Trainer: packing with per-example
``position_ids`` and computing the vocabulary projection only where a label is trained are
what make it fast on small models (bench/train.py measures it against a padded Trainer run),
and checkpoints must be safetensors + JSON, never pickles.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import random
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from engine import artifacts, attention, data
from engine.base_models import resolve_precision
from engine.distributed import DataParallel
from engine.hyperparameters import ALL_LINEAR, ATTENTION, TrainConfig
from engine.plan import FORWARD_TOKENS, LOSS_CHUNK

IGNORE = -100
BEST_WEIGHTS = "best_adapter_model.safetensors"  # in a checkpoint: the best adapter so far


class TrainingCancelled(Exception):
    """The job was cancelled; raised at a step boundary."""


class StoppedAtCheckpoint(Exception):
    """The run stopped at a step boundary, after a checkpoint of the steps done, so that a
    later run from it loses nothing."""

    def __init__(self, step: int):
        super().__init__(f"{type(self).__name__} after step {step}")
        self.step = step


class TimeLimitReached(StoppedAtCheckpoint):
    """The run used up its time."""


class TrainingPaused(StoppedAtCheckpoint):
    """The job was paused: it waits, and goes on from this checkpoint once resumed."""


# --- examples → tokens → rows ---------------------------------------------------------------


@dataclass
class Tokenized:
    input_ids: list[int]
    labels: list[int]  # IGNORE where the token is context, the token itself where it is learned
    # A DPO pair: this is the preferred answer's sequence, ``rejected`` the non-preferred one's,
    # and ``reference`` the two sequences' log-probabilities under the reference model (set
    # before the first step: reference_logps).
    rejected: Tokenized | None = None
    reference: tuple[float, float] | None = None

    @property
    def trained_tokens(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE)

    @property
    def length(self) -> int:
        """Tokens of the example: both sequences of a pair."""
        return sum(len(side.input_ids) for side in self.sides())

    def sides(self) -> list[Tokenized]:
        """The sequences a forward pass runs: this one, then a pair's non-preferred one."""
        return [self] if self.rejected is None else [self, self.rejected]


def tokenize(
    examples: list[data.Example], tokenizer, max_seq_length: int, *, pairs: bool = False
) -> tuple[list[Tokenized], int]:
    """Examples as training sees them (data.render: the chat template, trained spans); returns
    them and how many were dropped because truncation left nothing to learn. ``pairs``: a
    preference file's rows as DPO pairs, else as their preferred answers alone."""
    return truncate([rendered_tokens(e, tokenizer) for e in examples], max_seq_length, pairs=pairs)


class Rendered(NamedTuple):
    """An example's tokens and which of them are trained; a pair's non-preferred side too."""

    input_ids: list[int]
    trained: list[bool]
    rejected: Rendered | None = None


def rendered_tokens(example: data.Example, tokenizer) -> Rendered:
    """The slow part of tokenizing (the chat template, the trained spans): a worker keeps it
    per file (worker/tokenized_cache.py), whatever length a job then truncates to."""
    preferred, *rejected = [data.render(side, tokenizer)[0] for side in example.sides()]
    return Rendered(
        preferred.input_ids,
        preferred.trained,
        Rendered(rejected[0].input_ids, rejected[0].trained) if rejected else None,
    )


def truncate(
    rendered: list[Rendered], max_seq_length: int, *, pairs: bool = False
) -> tuple[list[Tokenized], int]:
    """Rendered examples cut to ``max_seq_length`` tokens (each side of a pair alone), with
    labels; those left with nothing to learn (on either side of a pair) are dropped and
    counted. Without ``pairs`` a pair is its preferred answer alone: what a supervised job on
    a preference file trains on."""
    result, dropped = [], 0
    for example in rendered:
        sides = [example, example.rejected] if pairs and example.rejected else [example]
        cut = [_cut(side.input_ids, side.trained, max_seq_length) for side in sides]
        if any(side is None for side in cut):
            dropped += 1
            continue
        if len(cut) == 2:
            cut[0].rejected = cut[1]
        result.append(cut[0])
    return result, dropped


def _cut(input_ids: list[int], trained: list[bool], max_seq_length: int) -> Tokenized | None:
    ids = input_ids[:max_seq_length]
    labels = [t if on else IGNORE for t, on in zip(ids, trained, strict=False)]
    if all(label == IGNORE for label in labels[1:]):
        return None
    return Tokenized(ids, labels)


def split_validation(examples: list, fraction: float, seed: int) -> tuple[list, list]:
    """Hold out a share of the examples (at least one, at most 500) when no validation file
    is given; the same seed holds out the same examples."""
    if fraction <= 0 or len(examples) < 2:
        return examples, []
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    count = min(500, max(1, round(len(examples) * fraction)))
    held = set(order[:count])
    return [e for i, e in enumerate(examples) if i not in held], [examples[i] for i in sorted(held)]


@dataclass
class Row:
    """One micro-batch: tensors shaped [rows, length]. ``sequence_ids`` numbers each token's
    sequence within the micro-batch (a pair's preferred answer, then its non-preferred one) and
    ``examples`` lists the examples it holds, in that order: what DPO's per-sequence sums read."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None
    sequence_ids: torch.Tensor | None = None
    examples: list[Tokenized] | None = None

    @property
    def real_tokens(self) -> int:
        if self.attention_mask is None:
            return self.input_ids.numel()
        return int(self.attention_mask.sum())

    def to(self, device: str) -> Row:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Row(
            move(self.input_ids),
            move(self.labels),
            move(self.position_ids),
            move(self.attention_mask),
            move(self.sequence_ids),
            self.examples,
        )


def pack(examples: list[Tokenized], row_tokens: int) -> list[Row]:
    """Pack examples into rows of at most ``row_tokens`` tokens, first-fit by decreasing length
    (a DPO pair whole: both its sequences in one row, so each row's loss is its own).

    Each sequence's position_ids start at 0, which is how the attention knows where one ends
    (engine/attention.py; flash attention's varlen path; or transformers' block-causal mask,
    built only without a KV cache, see base_models.load_base_model), so no sequence attends to
    another. The first label of each sequence is ignored so none learns to predict from its
    neighbour's last token. No padding: each row is its own batch.
    """
    bins: list[list[Tokenized]] = []
    room: list[int] = []
    for example in sorted(examples, key=lambda e: e.length, reverse=True):
        size = example.length
        for index, space in enumerate(room):
            if size <= space:
                bins[index].append(example)
                room[index] -= size
                break
        else:
            bins.append([example])
            room.append(max(row_tokens, size) - size)
    rows = []
    for members in bins:
        ids, labels, positions, sequences = [], [], [], []
        for number, side in enumerate(side for example in members for side in example.sides()):
            ids += side.input_ids
            labels += [IGNORE] + side.labels[1:]
            positions += range(len(side.input_ids))
            sequences += [number] * len(side.input_ids)
        rows.append(
            Row(
                torch.tensor([ids]),
                torch.tensor([labels]),
                position_ids=torch.tensor([positions]),
                sequence_ids=torch.tensor([sequences]),
                examples=members,
            )
        )
    return rows


def pad(examples: list[Tokenized], pad_id: int) -> list[Row]:
    """The examples as one padded batch (to the longest; a pair's two sequences one row
    each): the way without packing."""
    sides = [side for example in examples for side in example.sides()]
    length = max(len(side.input_ids) for side in sides)
    ids = torch.full((len(sides), length), pad_id)
    labels = torch.full((len(sides), length), IGNORE)
    mask = torch.zeros((len(sides), length), dtype=torch.long)
    for row, side in enumerate(sides):
        n = len(side.input_ids)
        ids[row, :n] = torch.tensor(side.input_ids)
        labels[row, :n] = torch.tensor(side.labels)
        mask[row, :n] = 1
    sequences = torch.arange(len(sides))[:, None].expand(-1, length)
    return [Row(ids, labels, attention_mask=mask, sequence_ids=sequences, examples=examples)]


def forward_tokens(max_seq_length: int, planned: int = FORWARD_TOKENS) -> int:
    """The tokens of one forward pass: a step's examples are packed into rows of this many
    (each example whole, kept apart by its position ids), however short max_seq_length is
    (engine/plan.py FORWARD_TOKENS says why)."""
    return max(max_seq_length, planned)


def autocast(precision: str, device: str):
    """The context a forward pass runs in: bf16 autocast (matmuls in bf16, reductions and the
    loss in fp32; the LoRA weights and their optimizer stay fp32) or plain fp32."""
    if precision == "bf16":
        return torch.autocast("cuda" if device.startswith("cuda") else "cpu", torch.bfloat16)
    return contextlib.nullcontext()


# The linear layers that feed attention (Llama, Qwen, Mistral and SmolLM; Phi-3; GPT-2; Falcon;
# MPT): attention computes in bf16 under autocast (engine/attention.py), so their outputs are
# rounded there whatever precision their sums were kept in.
ATTENTION_INPUTS = {"q_proj", "k_proj", "v_proj", "qkv_proj", "c_attn", "query_key_value", "Wqkv"}


def keep_adapter_sums_in_fp32(model) -> list:
    """Under bf16 autocast, make each LoRA layer's base output fp32 before the adapter's update
    is added to it (returns the hooks, to remove after the run). Added in bf16 (8 bits of
    mantissa), an update smaller than 1/256 of the activation is rounded away: measured on
    SmolLM2 after 20 steps on dates, held-out loss 0.378 with every sum in bf16 against 0.283
    in fp32 (then with masked attention); now, with the sums in fp32 on every layer 0.2836, on
    every layer but those that feed attention (ATTENTION_INPUTS) 0.2845, on none 0.2923. Those
    are left out: 7 % of a step for nothing (attention reads their sums in bf16)."""
    return [
        module.base_layer.register_forward_hook(lambda layer, inputs, output: output.float())
        for name, module in model.named_modules()
        if hasattr(module, "base_layer")
        and hasattr(module, "lora_A")
        and name.rsplit(".", 1)[-1] not in ATTENTION_INPUTS
    ]


class FrozenWeightsInBf16:
    """A bf16 copy of the frozen base weights of the LoRA layers, put in place for the training
    steps of a bf16 run (``with frozen.in_bf16():``) and the fp32 originals back around them.
    Autocast casts a weight to bf16 at every matmul unless it is a leaf that requires grad; the
    base's are frozen, so every forward re-cast every weight (16 % of a step in a profile). The
    copy gives the same numbers (autocast would have rounded the same way) for the memory of
    the weights in bf16 (engine/plan.py counts it); the originals stay fp32 for the held-out
    loss, the evaluation and the warm base's next job. A 4-bit base's layers are left alone,
    and so are DoRA's, whose weight norm reads the base weight outside the matmul (in fp32)."""

    def __init__(self, model):
        self.layers = [
            module.base_layer
            for module in model.modules()
            if hasattr(module, "lora_A")
            and not any(getattr(module, "use_dora", {}).values())
            and type(getattr(module, "base_layer", None)) is torch.nn.Linear
            and module.base_layer.weight.dtype == torch.float32
            and not module.base_layer.weight.requires_grad
        ]
        self.originals = [self._tensors(layer) for layer in self.layers]
        self.copies = [
            {name: tensor.to(torch.bfloat16) for name, tensor in tensors.items()}
            for tensors in self.originals
        ]

    @staticmethod
    def _tensors(layer) -> dict:
        return {
            name: parameter.data
            for name, parameter in (("weight", layer.weight), ("bias", layer.bias))
            if parameter is not None
        }

    def _put(self, tensors_by_layer: list[dict]) -> None:
        for layer, tensors in zip(self.layers, tensors_by_layer, strict=True):
            for name, tensor in tensors.items():
                getattr(layer, name).data = tensor

    @contextlib.contextmanager
    def in_bf16(self):
        self._put(self.copies)
        try:
            yield
        finally:
            self._put(self.originals)


# --- loss ------------------------------------------------------------------------------------


def labelled_hidden(model, row: Row) -> tuple[torch.Tensor, torch.Tensor, torch.nn.Module]:
    """The decoder's last hidden states at the positions that carry a label, their targets,
    and the vocabulary projection (the head).

    The decoder runs on the row without a KV cache, each packed example attending only to
    itself (engine/attention.py; flash attention's own variable-length path on a GPU); the
    head (49k × 576 for SmolLM2, a fifth of the model's work) then runs only on the positions
    that have a label, not on every token as a plain forward pass would.
    """
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = causal_lm.get_decoder()
    per_document = row.position_ids is not None and attention.applies_to(causal_lm)
    hidden = decoder(
        input_ids=row.input_ids,
        position_ids=row.position_ids,
        attention_mask=row.attention_mask,
        use_cache=False,
        **(
            {"document_lengths": attention.document_lengths(row.position_ids)}
            if per_document
            else {}
        ),
    ).last_hidden_state
    targets = row.labels[:, 1:]
    keep = targets != IGNORE
    return hidden[:, :-1][keep], targets[keep], causal_lm.get_output_embeddings()


def labelled_logits(model, row: Row) -> tuple[torch.Tensor, torch.Tensor]:
    """Float logits and their targets at the positions that carry a label (all at once: for
    measures that need every logit, such as token accuracy)."""
    trained, targets, head = labelled_hidden(model, row)
    return float_logits(head, trained), targets


def float_logits(head: torch.nn.Module, trained: torch.Tensor) -> torch.Tensor:
    """The head's logits in fp32: computed in fp32 (under bf16 autocast too) where its weight
    is, else in its weight's dtype and then widened."""
    if head.weight.dtype == torch.float32:
        with torch.autocast(trained.device.type, enabled=False):
            return head(trained.float())
    return head(trained).float()


class LinearCrossEntropy(torch.autograd.Function):
    """The cross-entropy at each position of ``hidden @ weight.T`` against ``targets``, computed
    LOSS_CHUNK positions at a time, the gradient for the hidden states computed as it goes (as
    Liger's fused linear cross-entropy does): the logits of a forward, positions × vocabulary
    × 4 bytes and again for their softmax (a third of a GiB for 1024 positions of SmolLM2's
    49k, 1.5 GiB of Llama 3's 128k), never exist at once. Each position's loss depends on its
    own hidden state alone, so its gradient is kept per position and scaled by whatever weight
    the caller's loss gives it (1 in a sum; DPO's per-pair factor). The weight is frozen (a LoRA
    never trains the head here). Logits and softmax in fp32; the matmuls in the weight's dtype,
    so a bf16 base computes as it did in one piece."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor):
        losses = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        wanted = ctx.needs_input_grad[0]
        grad = torch.empty_like(hidden, dtype=torch.float32) if wanted else None
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, hidden.shape[0], LOSS_CHUNK):
                part = hidden[start : start + LOSS_CHUNK].to(weight.dtype)
                logits = (part @ weight.t()).float()
                chosen = targets[start : start + LOSS_CHUNK]
                picked = logits.gather(1, chosen[:, None]).squeeze(1)
                normalizer = torch.logsumexp(logits, dim=1)
                losses[start : start + LOSS_CHUNK] = normalizer - picked
                if wanted:  # d loss / d logits = softmax - one-hot, then back through the head
                    softmax = logits.sub_(normalizer[:, None]).exp_()
                    softmax[torch.arange(len(chosen), device=chosen.device), chosen] -= 1
                    grad[start : start + LOSS_CHUNK] = (softmax.to(weight.dtype) @ weight).float()
        ctx.save_for_backward(grad if wanted else None)
        ctx.hidden_dtype = hidden.dtype
        return losses

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return (grad * grad_output[:, None]).to(ctx.hidden_dtype), None, None


def token_losses(model, row: Row) -> torch.Tensor:
    """The cross-entropy of each trained token of the row, in order, in fp32 under bf16
    autocast too, like the loss it is. (The 30 % gap once seen between bf16 and fp32 held-out
    losses came from the adapter sums, not from here: keep_adapter_sums_in_fp32.)"""
    trained, targets, head = labelled_hidden(model, row)
    if isinstance(head, torch.nn.Linear) and not head.weight.requires_grad and head.bias is None:
        return LinearCrossEntropy.apply(trained, head.weight, targets)
    # A head with gradients (a model outside a LoRA run) or a bias: in one piece.
    return F.cross_entropy(float_logits(head, trained), targets, reduction="none")


def loss_sum(model, row: Row) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over trained tokens, and their count."""
    losses = token_losses(model, row)
    return losses.sum(), losses.numel()


@torch.no_grad()
def held_out_loss(model, examples: list[Tokenized], row_tokens: int, device: str) -> float | None:
    """Mean loss per trained token on held-out examples (packed, like training), in fp32
    whatever the run computed in: read through bf16, the same adapter's loss is ~3 % higher."""
    if not examples:
        return None
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for row in pack(examples, forward_tokens(row_tokens)):
        summed, n = loss_sum(model, row.to(device))
        total += float(summed)
        count += n
    model.train(was_training)
    return total / max(count, 1)


# --- DPO: the loss of preference pairs --------------------------------------------------------
#
# Direct Preference Optimization (Rafailov et al. 2023): for a pair of answers to one input, the
# implicit reward of an answer y is beta * (log pi(y) - log ref(y)), pi the adapter, ref the
# reference model, log p(y) the sum of the answer's token log-probabilities (the trained tokens:
# the reply only, never the input); the loss of a pair is -log sigmoid(reward(preferred) -
# reward(non-preferred)). The reference is the model before the first step, with the adapter
# as it then is: a fresh adapter is zero (its B matrices start at 0), so it is the base with the
# adapter switched off; a job that starts from a parent adapter is referred to the parent. So
# the reference costs one pass over the pairs before training (reference_logps), kept in every
# checkpoint, and no second model in memory.


def sequence_logps(model, row: Row) -> torch.Tensor:
    """Each sequence's summed log-probability of its trained tokens, by ``row.sequence_ids``
    (with gradients where the model has them)."""
    targets_kept = row.labels[:, 1:] != IGNORE
    sequences = row.sequence_ids[:, 1:][targets_kept]
    count = int(row.sequence_ids.max()) + 1
    logps = -token_losses(model, row)
    return torch.zeros(count, dtype=logps.dtype, device=logps.device).index_add(0, sequences, logps)


def preference_loss(model, row: Row, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The summed DPO loss of the row's pairs, and each pair's reward margin (detached)."""
    logps = sequence_logps(model, row).view(-1, 2)  # a pair's preferred, then non-preferred
    reference = torch.tensor([e.reference for e in row.examples], device=logps.device)
    rewards = beta * (logps - reference)
    margins = rewards[:, 0] - rewards[:, 1]
    return -F.logsigmoid(margins).sum(), margins.detach()


@torch.no_grad()
def pair_logps(
    model, pairs: list[Tokenized], row_tokens: int, device: str, precision: str = "fp32"
) -> list[tuple[float, float]]:
    """Each pair's (preferred, non-preferred) log-probabilities under the model as it is now
    (adapter on or off), in eval mode, in the pairs' order."""
    was_training = model.training
    model.eval()
    found: dict[int, tuple[float, float]] = {}
    for row in pack(pairs, forward_tokens(row_tokens)) if pairs else []:
        with autocast(precision, device):
            logps = sequence_logps(model, row.to(device)).view(-1, 2).tolist()
        for example, (preferred, rejected) in zip(row.examples, logps, strict=True):
            found[id(example)] = (preferred, rejected)
    model.train(was_training)
    return [found[id(pair)] for pair in pairs]


def reference_logps(model, pairs: list[Tokenized], row_tokens: int, device: str, precision: str):
    """Set each pair's ``reference``: its log-probabilities under the model before training."""
    for pair, logps in zip(
        pairs, pair_logps(model, pairs, row_tokens, device, precision), strict=True
    ):
        pair.reference = logps


@torch.no_grad()
def held_out_preference_loss(
    model, pairs: list[Tokenized], row_tokens: int, device: str, beta: float
) -> float | None:
    """Mean DPO loss per held-out pair (their references set)."""
    if not pairs:
        return None
    was_training = model.training
    model.eval()
    total = sum(
        float(preference_loss(model, row.to(device), beta)[0])
        for row in pack(pairs, forward_tokens(row_tokens))
    )
    model.train(was_training)
    return total / len(pairs)


REFERENCE_FILE = "reference_logps.safetensors"  # in a DPO run's checkpoints


def save_references(folder: Path, train_pairs: list[Tokenized], held_out: list[Tokenized]) -> None:
    def as_tensor(pairs: list[Tokenized]) -> torch.Tensor:  # NaN: a pair the run never trains
        return torch.tensor(
            [pair.reference or (math.nan, math.nan) for pair in pairs], dtype=torch.float64
        ).reshape(-1, 2)

    save_file(
        {"train": as_tensor(train_pairs), "held_out": as_tensor(held_out)}, folder / REFERENCE_FILE
    )


def load_references(folder: Path, train_pairs: list[Tokenized], held_out: list[Tokenized]) -> None:
    """The references a checkpoint kept, back on the run's pairs (in the same order: the same
    file, split by the same seed)."""
    kept = load_file(folder / REFERENCE_FILE)
    for pairs, name in ((train_pairs, "train"), (held_out, "held_out")):
        if len(kept[name]) != len(pairs):
            raise ValueError(
                f"The checkpoint's reference covers {len(kept[name])} pairs, not {len(pairs)}."
            )
        for pair, logps in zip(pairs, kept[name].tolist(), strict=True):
            pair.reference = None if math.isnan(logps[0]) else tuple(logps)


# --- the schedule of examples ------------------------------------------------------------


def steps_per_epoch(examples: int, batch_size: int) -> int:
    return math.ceil(examples / batch_size)


def total_steps(config: TrainConfig, examples: int) -> int:
    steps = steps_per_epoch(examples, config.batch_size) * config.n_epochs
    return min(steps, config.max_steps) if config.max_steps else steps


def scheduled_tokens(
    train_examples: list[Tokenized], config: TrainConfig, steps: int | None = None
) -> int:
    """Tokens of every example of the run's first ``steps`` steps (all by default): what the
    run trains on (OpenAI's trained_tokens), however many attempts it took."""
    if steps is None:
        steps = total_steps(config, len(train_examples))
    return sum(
        example.length
        for step in range(steps)
        for example in examples_for_step(train_examples, config, step)
    )


def scheduled_examples(train: list[Tokenized], config: TrainConfig, steps: int) -> list[Tokenized]:
    """The examples the run's ``steps`` steps train on, each once: all of them but where
    ``max_steps`` ends the run within its first epoch."""
    if steps * config.batch_size >= len(train):
        return train
    return [example for step in range(steps) for example in examples_for_step(train, config, step)]


def examples_for_step(train: list[Tokenized], config: TrainConfig, step: int) -> list[Tokenized]:
    """The examples of optimizer step ``step`` (0-based). A pure function of the seed and the
    step, so a resumed run takes up exactly where the checkpoint left off."""
    per_epoch = steps_per_epoch(len(train), config.batch_size)
    epoch, position = divmod(step, per_epoch)
    order = epoch_order(len(train), config.seed, epoch)
    chosen = order[position * config.batch_size : (position + 1) * config.batch_size]
    return [train[i] for i in chosen]


@functools.lru_cache(maxsize=2)
def epoch_order(examples: int, seed: int, epoch: int) -> tuple[int, ...]:
    """The order of an epoch's examples, shuffled once per epoch rather than at every step
    (92 ms a step at 100k examples)."""
    order = list(range(examples))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return tuple(order)


# --- checkpoints: safetensors and JSON, never pickles ---------------------------------------


@dataclass
class Validation:
    """Held-out loss during training (``eval_every``): the best measurement so far, the
    adapter's weights at it, and how many measurements since have not improved on it. Saved in
    every checkpoint, so a resumed run keeps the best adapter it had found."""

    best_step: int | None = None
    best_loss: float | None = None
    best_weights: dict[str, torch.Tensor] | None = None
    since_best: int = 0
    stopped_early: bool = False

    def record(self, step: int, loss: float, model) -> None:
        """A measurement; the adapter's weights are kept when it is the best so far."""
        if self.best_loss is not None and loss >= self.best_loss:
            self.since_best += 1
            return
        weights = {key: value.clone() for key, value in adapter_weights(model).items()}
        self.best_step, self.best_loss, self.best_weights, self.since_best = step, loss, weights, 0

    def state(self) -> dict:
        return {
            "best_step": self.best_step,
            "best_loss": self.best_loss,
            "since_best": self.since_best,
            "stopped_early": self.stopped_early,
        }


def save_checkpoint(
    folder: Path,
    model,
    optimizer,
    scheduler,
    step: int,
    config: TrainConfig,
    validation: Validation | None = None,
    pairs: tuple[list[Tokenized], list[Tokenized]] | None = None,
) -> None:
    """``pairs``: a DPO run's training and held-out pairs, whose references it keeps."""
    save_adapter(model, folder)
    if pairs is not None:
        save_references(folder, *pairs)
    validation = validation or Validation()
    if validation.best_weights is not None:
        save_file(validation.best_weights, folder / BEST_WEIGHTS)
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for name, value in values.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{name}"] = value.contiguous()
            else:
                scalars[f"{index}.{name}"] = value
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    save_file(tensors, folder / "optimizer.safetensors")
    python_rng = random.getstate()
    (folder / "trainer_state.json").write_text(
        json.dumps(
            {
                "step": step,
                "config": asdict(config),
                "param_groups": state["param_groups"],
                "optimizer_scalars": scalars,
                "scheduler": scheduler.state_dict(),
                "python_rng": [python_rng[0], list(python_rng[1]), python_rng[2]],
                "validation": validation.state(),
            }
        )
    )


def load_checkpoint(folder: Path, model, optimizer, scheduler) -> tuple[int, Validation]:
    """Restore a checkpoint into the run; returns the number of steps it had completed, and
    where its held-out measurements stood."""
    load_adapter_weights(model, load_file(folder / "adapter_model.safetensors"))
    meta = json.loads((folder / "trainer_state.json").read_text())
    tensors = load_file(folder / "optimizer.safetensors")
    per_param: dict[int, dict] = {}
    for key, value in list(tensors.items()) + list(meta["optimizer_scalars"].items()):
        if key.startswith("rng."):
            continue
        index, name = key.split(".", 1)
        per_param.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": per_param, "param_groups": meta["param_groups"]})
    scheduler.load_state_dict(meta["scheduler"])
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    version, internal, gauss = meta["python_rng"]
    random.setstate((version, tuple(internal), gauss))
    validation = Validation(**meta.get("validation", {}))  # none before eval_every existed
    if (folder / BEST_WEIGHTS).exists():
        validation.best_weights = load_file(folder / BEST_WEIGHTS)
    return int(meta["step"]), validation


# --- the run -------------------------------------------------------------------------------


@dataclass
class Progress:
    step: int
    total_steps: int
    epoch: float
    loss: float
    learning_rate: float
    tokens_per_second: float
    eta_seconds: float
    trained_tokens: int


@dataclass
class Callbacks:
    on_progress: Callable[[Progress], None] = lambda progress: None
    should_stop: Callable[[], bool] = lambda: False
    # Called with a finished checkpoint folder and its step; uploads it, records it.
    on_checkpoint: Callable[[Path, int], None] = lambda folder, step: None
    # True once the run must end for lack of time (the job's time limit).
    out_of_time: Callable[[], bool] = lambda: False
    # True once the job was asked to pause (a checkpoint, then the run ends).
    should_pause: Callable[[], bool] = lambda: False
    # Called as the first step is about to start: setup (LoRA attached, checkpoint loaded) is over.
    on_loop_start: Callable[[], None] = lambda: None
    # Called with each held-out measurement (eval_every): its step, its loss, the best step.
    on_validation: Callable[[int, float, int], None] = lambda step, loss, best: None


@dataclass
class TrainResult:
    steps: int
    resumed_from_step: int
    trained_tokens: int  # real (not padding) tokens processed, over all epochs
    processed_tokens: int  # with padding, when not packing
    train_loss: float | None
    validation_loss: float | None
    seconds: float
    seconds_to_first_step: float
    # time.monotonic() when the last step ended (before its checkpoint): the end of "training"
    # in a job's timings (worker/training.py); Callbacks.on_loop_start marks its start.
    last_step_ended: float
    precision: str  # what the forward passes computed in: "bf16" (autocast) or "fp32"
    best_step: int | None = None  # with eval_every: the step whose adapter is returned
    stopped_early_at: int | None = None  # with early_stopping_patience: the last step run

    @property
    def packing_efficiency(self) -> float:
        return self.trained_tokens / max(self.processed_tokens, 1)


# What rank 0 decided at a step boundary, by its index (broadcast to the other ranks).
STOPS = (None, TrainingCancelled, TimeLimitReached, TrainingPaused)


def stop_before_step(callbacks: Callbacks) -> type[Exception] | None:
    """Whether the run ends before its next step, and how: cancelled, out of time, paused."""
    if callbacks.should_stop():
        return TrainingCancelled
    if callbacks.out_of_time():
        return TimeLimitReached
    if callbacks.should_pause():
        return TrainingPaused
    return None


def attach_lora(base, config: TrainConfig, parent_adapter: Path | None):
    """The base with one trainable LoRA adapter: fresh, or starting from the parent adapter's
    weights and settings (continual fine-tuning). ``unload()`` gives the base back after."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if parent_adapter is not None:
        artifacts.refuse_unsafe_adapter(parent_adapter)
        lora = LoraConfig.from_pretrained(str(parent_adapter))
        lora.inference_mode = False
    else:
        lora = LoraConfig(
            r=config.lora_rank,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules=peft_target_modules(config.target_modules),
            use_dora=config.use_dora,
            use_rslora=config.use_rslora,
            task_type="CAUSAL_LM",
        )
    # Non-reentrant checkpointing: it needs no inputs that require grad, and it stops at the
    # blocks, so the LoRA layers inside are recomputed with their own weights.
    checkpointing = {"use_reentrant": False}
    if config.quantization == "nf4":
        # Norms in fp32 and gradients through the 4-bit layers to the adapters.
        base = prepare_model_for_kbit_training(
            base,
            use_gradient_checkpointing=config.gradient_checkpointing,
            gradient_checkpointing_kwargs=checkpointing,
        )
    elif config.gradient_checkpointing:
        checkpoint_activations(base, checkpointing)
    model = get_peft_model(base, lora)
    if parent_adapter is not None:
        load_adapter_weights(model, load_file(parent_adapter / "adapter_model.safetensors"))
    return model


def checkpoint_activations(model, kwargs: dict | None) -> None:
    """Gradient checkpointing on (with torch.utils.checkpoint's ``kwargs``) or off (None).
    transformers 5.2x calls it activation checkpointing and warns at the old names, which the
    5.x releases before it (bench/gpu.sh runs on whatever a GPU machine has) only know."""
    if hasattr(model, "activation_checkpointing_enable"):
        if kwargs is None:
            model.activation_checkpointing_disable()
        else:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    elif kwargs is None:
        model.gradient_checkpointing_disable()
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def peft_target_modules(target_modules: str) -> str | list[str]:
    """The hyperparameter as peft takes it: "all-linear" as is, "attention" as a pattern over
    the attention blocks' linear layers (self_attn in Llama, Qwen, Mistral and SmolLM;
    attention or attn elsewhere), module names as a list."""
    if target_modules == ALL_LINEAR:
        return ALL_LINEAR
    if target_modules == ATTENTION:
        return r".*\.(self_attn|attention|attn)\.[^.]+"
    return target_modules.split(",")


# peft's own state-dict helpers call model.state_dict(), which on a 4-bit model rewrites the
# quantization state in place (bitsandbytes 0.50 on the CPU; measured: base logits off by 0.7
# after one call). The adapter's weights are therefore read and written parameter by parameter.

_ADAPTER_KEY = re.compile(r"\.(lora_[A-Za-z_]+)\.([^.]+)\.")


def adapter_weights(model) -> dict[str, torch.Tensor]:
    """The active adapter's weights under peft's file keys (without the adapter's name)."""
    name = model.active_adapter
    weights = {}
    for key, parameter in model.named_parameters():
        match = _ADAPTER_KEY.search(key)
        if match and match.group(2) == name:
            weights[_ADAPTER_KEY.sub(r".\1.", key, count=1)] = parameter.detach().contiguous()
    return weights


@torch.no_grad()
def load_adapter_weights(model, weights: dict[str, torch.Tensor]) -> None:
    """Copy saved weights into the active adapter; every saved weight must find its place."""
    name = model.active_adapter
    parameters = dict(model.named_parameters())
    for key, value in weights.items():
        target = re.sub(r"\.(lora_[A-Za-z_]+)\.", rf".\1.{name}.", key, count=1)
        if target not in parameters:
            raise ValueError(f"The adapter does not fit this model: no parameter for {key}")
        parameters[target].copy_(value)


def save_adapter(model, folder: Path) -> None:
    """The active adapter as a PEFT folder: adapter_config.json + adapter_model.safetensors."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file(adapter_weights(model), folder / "adapter_model.safetensors")
    model.peft_config[model.active_adapter].save_pretrained(str(folder))


def learning_rate_schedule(optimizer, config: TrainConfig, steps: int):
    """Warmup over ``warmup_ratio`` of the steps, then ``lr_scheduler``'s fall to the end."""
    from transformers import get_scheduler

    return get_scheduler(
        # transformers' "constant" ignores warmup; its "constant_with_warmup" with none is the same
        "constant_with_warmup" if config.lr_scheduler == "constant" else config.lr_scheduler,
        optimizer,
        num_warmup_steps=math.ceil(steps * config.warmup_ratio),
        num_training_steps=steps,
    )


def train(
    config: TrainConfig,
    train_examples: list[Tokenized],
    validation_examples: list[Tokenized],
    base,
    *,
    device: str,
    work_dir: Path,
    callbacks: Callbacks | None = None,
    resume_from: Path | None = None,
    parent_adapter: Path | None = None,
    pad_id: int = 0,
    tokens_per_forward: int | None = None,
    parallel: DataParallel | None = None,
):
    """Train and return (the peft model, TrainResult). The caller saves the adapter, then
    ``unload()`` gives back the untouched base for the next run. ``tokens_per_forward``: the
    plan's size of a packed forward (engine/plan.py forward_tokens), FORWARD_TOKENS if not
    given; the loss is the same either way, only speed and memory differ. ``parallel``: this
    process's rank of a data-parallel run (engine/distributed.py), one device if not given;
    only rank 0 calls the callbacks and writes checkpoints, and only its model and result
    carry the held-out loss."""
    parallel = parallel or DataParallel()
    callbacks = (callbacks or Callbacks()) if parallel.is_main else Callbacks()
    started = time.monotonic()

    # --- setup
    precision = resolve_precision(config.mixed_precision, device)
    if device.startswith("cuda"):
        torch.set_float32_matmul_precision("high")  # TF32 for what stays in fp32
    row_tokens = forward_tokens(config.max_seq_length, tokens_per_forward or FORWARD_TOKENS)
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    model = attach_lora(base, config, parent_adapter)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        trainable, lr=config.learning_rate, weight_decay=config.weight_decay
    )
    steps = total_steps(config, len(train_examples))
    scheduler = learning_rate_schedule(optimizer, config, steps)
    first_step, validation = 0, Validation()
    if resume_from:
        first_step, validation = load_checkpoint(resume_from, model, optimizer, scheduler)
    measuring = bool(config.eval_every and validation_examples)
    preference = config.sides == 2
    pairs = (train_examples, validation_examples) if preference else None

    # --- train (on any failure or cancel, the base is handed back without this run's layers)
    hooks = keep_adapter_sums_in_fp32(model) if precision == "bf16" else []
    frozen = FrozenWeightsInBf16(model) if precision == "bf16" else None
    in_bf16 = frozen.in_bf16 if frozen else contextlib.nullcontext
    try:
        if preference and resume_from:
            load_references(resume_from, *pairs)
        elif preference:  # the model before its first step is the reference (see DPO above)
            with in_bf16():  # as the steps will compute, for the pairs they will train on
                scheduled = scheduled_examples(train_examples, config, steps)
                reference_logps(model, scheduled, row_tokens, device, precision)
            # as the held-out measurements will (in fp32, like held_out_loss)
            reference_logps(model, validation_examples, row_tokens, device, "fp32")

        def measured_loss() -> float | None:
            if preference:
                return held_out_preference_loss(
                    model, validation_examples, config.max_seq_length, device, config.beta
                )
            return held_out_loss(model, validation_examples, config.max_seq_length, device)

        trained_tokens = processed_tokens = 0
        recent_loss: float | None = None
        first_step_done_at: float | None = None
        callbacks.on_loop_start()
        loop_started = last_step_ended = time.monotonic()
        per_epoch = steps_per_epoch(len(train_examples), config.batch_size)
        last_checkpoint = first_step
        for step in range(first_step, first_step if validation.stopped_early else steps):
            # Rank 0 decides (the others' callbacks say nothing), every rank stops alike.
            stop = STOPS[parallel.from_main(STOPS.index(stop_before_step(callbacks)))]
            if stop is TrainingCancelled:
                raise TrainingCancelled(f"cancelled before step {step + 1}")
            if stop is not None:
                if step > last_checkpoint and parallel.is_main:
                    folder = work_dir / "checkpoints" / f"step-{step}"
                    save_checkpoint(
                        folder, model, optimizer, scheduler, step, config, validation, pairs
                    )
                    callbacks.on_checkpoint(folder, step)
                raise stop(step)
            batch = parallel.share(examples_for_step(train_examples, config, step))
            rows = (
                (pack(batch, row_tokens) if config.packing else pad(batch, pad_id)) if batch else []
            )
            # The loss is a mean over the step's trained tokens (a DPO run's: its pairs), on
            # every rank: each token (pair) weighs the same however the step was split into
            # rows and ranks.
            (step_count,) = parallel.summed(
                len(batch)
                if preference
                else sum(int((row.labels[:, 1:] != IGNORE).sum()) for row in rows)
            )
            step_loss = 0.0
            step_tokens = step_processed = 0
            with in_bf16():
                for row in rows:
                    with autocast(precision, device):
                        if preference:
                            summed, _ = preference_loss(model, row.to(device), config.beta)
                        else:
                            summed, _ = loss_sum(model, row.to(device))
                    (summed / step_count).backward()
                    step_loss += float(summed.detach())
                    step_tokens += row.real_tokens
                    step_processed += row.input_ids.numel()
            parallel.sum_gradients(trainable)
            step_loss, step_tokens, step_processed = parallel.summed(
                step_loss, step_tokens, step_processed
            )
            trained_tokens += int(step_tokens)
            processed_tokens += int(step_processed)
            torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            done = step + 1
            recent_loss = step_loss / step_count
            if first_step_done_at is None:
                first_step_done_at = time.monotonic()
            elapsed = time.monotonic() - loop_started
            callbacks.on_progress(
                Progress(
                    step=done,
                    total_steps=steps,
                    epoch=done / per_epoch,
                    loss=recent_loss,
                    learning_rate=scheduler.get_last_lr()[0],
                    tokens_per_second=trained_tokens / elapsed if elapsed > 0 else 0.0,
                    eta_seconds=elapsed / max(done - first_step, 1) * (steps - done),
                    trained_tokens=trained_tokens,
                )
            )
            last_step_ended = time.monotonic()
            if measuring and (done % config.eval_every == 0 or done == steps):
                if parallel.is_main:
                    loss = measured_loss()
                    validation.record(done, loss, model)
                    callbacks.on_validation(done, loss, validation.best_step)
                    patience = config.early_stopping_patience
                    validation.stopped_early = bool(patience and validation.since_best >= patience)
                validation.stopped_early = bool(parallel.from_main(validation.stopped_early))
            if done % config.checkpoint_every == 0 or done == steps or validation.stopped_early:
                if parallel.is_main:
                    folder = work_dir / "checkpoints" / f"step-{done}"
                    save_checkpoint(
                        folder, model, optimizer, scheduler, done, config, validation, pairs
                    )
                    callbacks.on_checkpoint(folder, done)
                last_checkpoint = done
            if validation.stopped_early:
                break

        # --- keep the best adapter, and evaluate on the held-out examples
        if validation.best_weights is not None:
            load_adapter_weights(model, validation.best_weights)
            validation_loss = validation.best_loss
        elif not parallel.is_main:  # the other ranks' adapters are the same; not measured twice
            validation_loss = None
        else:
            validation_loss = measured_loss()
    except BaseException:
        model.unload()
        raise
    finally:
        for hook in hooks:
            hook.remove()
        if config.gradient_checkpointing:  # the warm base serves the next job as it came
            checkpoint_activations(base, None)

    return model, TrainResult(
        steps=steps,
        resumed_from_step=first_step,
        trained_tokens=trained_tokens,
        processed_tokens=processed_tokens,
        train_loss=recent_loss,
        validation_loss=validation_loss,
        seconds=time.monotonic() - started,
        seconds_to_first_step=(first_step_done_at or time.monotonic()) - started,
        last_step_ended=last_step_ended,
        precision=precision,
        best_step=validation.best_step,
        stopped_early_at=last_checkpoint if validation.stopped_early else None,
    )
