"""The serving engine: continuous batching of many requests, each answered by its own LoRA
adapter of one base model, in one running batch (as S-LoRA, Punica and LoRAX do).

No Django, no Celery, no S3: requests come in as prompt token ids (rendered by the caller, as
``engine.evaluate._prompt_ids`` renders them) with the caller's key of an adapter and its local
folder; answers go out through a ``Listener`` in pieces of text, and a ``finished`` call.

Why batch: on a CPU or a GPU alike, one decoding step reads every weight of the model whatever
the number of rows it computes, so a step for 16 rows costs little more than a step for one
(SmolLM2 on this 2-core CPU, measured: 46 ms for one row with its adapter, 73 ms for 16 rows
of the base, 105 ms for 16 rows of 8 adapters of Loft's default shape). Serving requests one
at a time leaves that on the table; serving them together multiplies the tokens per second.

How, step by step (``step``):

- **Admission.** Waiting requests join, first come first served, while fewer than ``max_rows``
  rows run. A request's adapter is loaded first, on this thread, between two steps: the running
  rows wait for that load and no longer. ``max_rows=1`` serves exactly one request at a time,
  in the order they came: the baseline batching is measured against.
- **Prefill.** The joiners' prompts run through the model together, left-padded to the longest,
  with each row's true positions (``position_ids``) and an attention mask that hides the
  padding, so padding changes no row's result. Each joiner's first token comes from it.
- **Decode.** One forward per step computes the next token of every running row, each row with
  its own adapter (or none): ``_MixedLoRA`` adds each row's own LoRA delta in every LoRA layer,
  two products per layer for the whole batch, on full-precision and on 4-bit (bitsandbytes
  ``Linear4bit``) bases alike. A batch of one adapter's rows runs with that adapter active
  instead, peft's own arithmetic.
- **Leaving.** A row that ends (end-of-turn token, stop string, ``max_new_tokens``, cancelled)
  is dropped from the batch and from the KV cache at once, and leading columns that only
  padding is left in are cut off.

The KV cache is one transformers ``DynamicCache`` per group of rows, every layer's keys and
values ``[rows, heads, columns, head_dim]``, each row's tokens right-aligned (left padding) and
an attention mask ``[rows, columns]`` marking the real ones: a decoding step appends one column
for all rows, joiners are padded to a common width and concatenated to it, leavers are removed
by row index.

Groups: a DoRA adapter rescales each layer's whole weight by its own norms, which no stacked
product expresses (peft 0.21 refuses mixed batches holding one too), so all plain LoRA adapters
and the base share one group, and each adapter that cannot mix (DoRA, or layers other than
linear ones) has a group of its own, run with that adapter active. Each group costs one
forward per step.

Adapters: up to ``adapter_capacity`` are loaded beside the base (``AdapterCache``'s loading: the
folder is checked for pickles first, a failed load leaves nothing behind). The least recently
used one is deleted when one more is needed, but never one that a running row uses: a request
whose adapter finds no free slot waits, and so do the requests behind it.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F

from engine.evaluate import _left_padded, end_of_turn_ids
from engine.generate import AdapterCache, _cache_argument, _IncrementalDecoder

logger = logging.getLogger(__name__)

# peft's name for "no adapter" in a mixed batch.
BASE = "__base__"
# The key of the group every mixable adapter and the plain base share (DoRA groups are keyed by
# their adapter's peft name).
MIXED = "__mixed__"


# --- the interface ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Sampling:
    """How a request's answer is produced."""

    max_new_tokens: int
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0  # nucleus sampling when < 1
    seed: int | None = None  # a generator of the row's own: the same seed, the same answer
    stop: tuple[str, ...] = ()  # the answer ends before the first of these texts

    def __post_init__(self):
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, not {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, not {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], not {self.top_p}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must not be empty")


@dataclass
class Request:
    id: str
    prompt: list[int]  # token ids, already rendered
    adapter: str | None  # the caller's key of the adapter; None for the plain base
    sampling: Sampling
    folder: Path | None = None  # the adapter's PEFT folder; needed only if it is not loaded


class Listener(Protocol):
    """Where answers go. Called on the engine's thread."""

    def piece(self, request_id: str, text: str) -> None:
        """A piece of the answer: whole characters, never text a stop string may start with."""

    def finished(
        self,
        request_id: str,
        finish_reason: str,
        prompt_tokens: int,
        completion_tokens: int,
        error: str | None = None,
    ) -> None:
        """The answer is over: "stop" (end-of-turn token or stop string), "length"
        (``max_new_tokens``), "cancelled", or "error" with a sentence in ``error``."""

    def after_step(self, running: list[str]) -> Iterable[str]:
        """Called after every step, and after new rows' prompts are run (their first tokens),
        with the ids still running; returns ids to cancel. A listener sends what it holds here."""


class InferenceEngine(Protocol):
    """What a worker serves requests through."""

    def submit(self, request: Request) -> None:
        """Queue a request; thread-safe, returns at once."""

    def cancel(self, request_id: str) -> None:
        """End a request at the next step with "cancelled"; thread-safe."""

    def close(self) -> None:
        """Stop serving; what is not finished ends with "error"."""


# --- the rows and their groups --------------------------------------------------------------


@dataclass(eq=False)
class _Row:
    """A request being answered."""

    request: Request
    adapter_name: str  # peft's name of its adapter, BASE for the plain base
    group: str  # MIXED, or the peft name of its unmixable adapter
    generator: torch.Generator | None
    tokens: list[int]  # the answer's tokens so far
    decoder: _IncrementalDecoder  # their text, in whole characters
    length: int = 0  # its tokens in the KV cache
    held: str = ""  # text that may begin a stop string: sent once decided
    stopped: bool = False  # a stop string was found

    @property
    def id(self) -> str:
        return self.request.id


@dataclass(eq=False)
class _Group:
    """Rows computed by one forward per step: their KV cache and attention mask."""

    key: str
    rows: list[_Row] = field(default_factory=list)
    cache: object = None  # a DynamicCache, once the first rows are prefilled
    mask: torch.Tensor | None = None  # [rows, columns]: 1 where the cache holds a real token


class _AdapterSlots(AdapterCache):
    """``AdapterCache``'s loading (base loaded once, adapters checked for pickles, a failed load
    undone), with an eviction that spares the adapters running rows use."""

    _mixed: _MixedLoRA | None = None
    # The keys loaded, for other threads: replaced (never changed) after each load or eviction.
    keys: frozenset[str] = frozenset()

    def name_for(self, key: str, folder: Path | None, in_use: set[str]) -> str | None:
        """peft's name of adapter ``key``, loaded from ``folder`` if it is not yet; None when
        every slot holds an adapter in use. Raises when the adapter cannot be loaded."""
        name = self._names.get(key)
        if name is not None:
            self._stats["hits"] += 1
            self._names.move_to_end(key)
            return name
        if len(self._names) >= self.capacity and not self._evictable(in_use):
            return None
        if folder is None:
            raise ValueError(f"The adapter {key} is not loaded and no folder was given for it.")
        self._stats["misses"] += 1
        name = self._load(folder)
        self._names[key] = name
        self._mixed = None  # its layers and weights are the adapters loaded before
        # Loaded before the eviction, as AdapterCache does: the last adapter is never deleted
        # from peft, and a failed load evicts nothing.
        while len(self._names) > self.capacity:
            evicted = self._evictable(in_use | {key})[0]
            self._peft.delete_adapter(self._names.pop(evicted))
            self._stats["evictions"] += 1
        self.keys = frozenset(self._names)
        return name

    def _evictable(self, in_use: set[str]) -> list[str]:
        return [key for key in self._names if key not in in_use]  # least recently used first

    @property
    def model(self) -> torch.nn.Module:
        return self._peft if self._peft is not None else self._loaded_base()

    @property
    def has_adapters(self) -> bool:
        return self._peft is not None

    def routed(self, adapter_names: list[str]):
        """A context in which forwards apply adapter ``adapter_names[i]`` to row ``i`` (``BASE``:
        none); see ``_MixedLoRA``."""
        if self._mixed is None:
            self._mixed = _MixedLoRA(self._peft)
        return self._mixed.routed(adapter_names)

    def mixable(self, name: str) -> bool:
        """Whether adapter ``name`` can share a batch with others: plain LoRA on linear layers
        only (not DoRA, no embedding or other layer kinds, no whole modules trained beside)."""
        config = self._peft.peft_config[name]
        if getattr(config, "use_dora", False) or getattr(config, "modules_to_save", None):
            return False
        if getattr(config, "trainable_token_indices", None):
            return False
        for layer in self._layers:
            if name in getattr(layer, "lora_embedding_A", ()):
                return False
            if name in getattr(layer, "lora_A", ()) and not isinstance(
                layer.lora_A[name], torch.nn.Linear
            ):
                return False
        return True

    def activate(self, name: str) -> None:
        """Make ``name`` the adapter that answers a forward without ``adapter_names``."""
        # The LoRA model's record, which _switch_to keeps (the peft model's own it does not).
        if self._peft.base_model.active_adapter != name:
            self._switch_to(name)


class _MixedLoRA:
    """Forwards in which each row of the batch has its own LoRA adapter, in two matrix products
    per layer for the whole batch (the gathered LoRA of Punica and S-LoRA, as dense products).

    peft's mixed batches (``adapter_names``) loop, in every LoRA layer, over the batch's
    adapters: select the adapter's rows, two small products, add them back; 6 operations per
    adapter per layer, 10,000 a step for 8 adapters of Loft's default shape on SmolLM2 (210
    layers), and the step is spent dispatching them: 192 ms for 16 rows on this CPU, against
    104 ms this way and 73 ms for the base alone. Here each layer instead multiplies every row
    by the batch's adapters' A matrices stacked, ``[rank 1 + ... + rank k, in]``, zeroes the
    columns that are not the row's own adapter's, multiplies by their B matrices side by side,
    ``[out, rank 1 + ... + rank k]``, and scales each row by its adapter's scaling:
    ``delta = ((x A^T) * mask) B^T * scaling``. A row's sum has only its own
    adapter's terms (the others are exact zeros), so it equals that adapter alone up to the
    order of the additions; a ``BASE`` row's delta is exactly zero.

    The base runs with peft's adapters switched off, and a forward hook on each LoRA layer adds
    the delta to the base's output (full precision or 4-bit alike). The stacked weights are
    built when the batch's set of adapters changes, not every step.
    """

    def __init__(self, model: torch.nn.Module):
        from peft.tuners.lora import LoraLayer

        self._layers = [module for module in model.modules() if isinstance(module, LoraLayer)]
        self._adapters: tuple[str, ...] | None = None
        # Per LoRA layer: (layer, stacked A, stacked B, the adapters' column spans, scalings).
        self._stacked: list[tuple] = []

    @contextlib.contextmanager
    def routed(self, adapter_names: list[str]):
        adapters = tuple(sorted(set(adapter_names) - {BASE}))
        if adapters != self._adapters:
            self._stack(adapters)
        rows = len(adapter_names)
        # Built once per forward for the layers that share them.
        masks: dict[tuple, torch.Tensor] = {}  # by spans: [rows, 1, columns]
        scales: dict[tuple, torch.Tensor] = {}  # by scalings: [rows, 1, 1]
        handles = []
        for layer, a, b, spans, scalings in self._stacked:
            key = tuple(spans.items())
            if key not in masks:
                mask = torch.zeros(rows, 1, a.shape[0], dtype=a.dtype, device=a.device)
                for row, name in enumerate(adapter_names):
                    if name in spans:
                        mask[row, 0, spans[name][0] : spans[name][1]] = 1
                masks[key] = mask
            scaling_key = tuple(scalings.items())
            if scaling_key not in scales:
                scales[scaling_key] = torch.tensor(
                    [scalings.get(name, 0.0) for name in adapter_names],
                    dtype=a.dtype,
                    device=a.device,
                ).view(rows, 1, 1)
            hook = functools.partial(
                _add_lora, a=a, b=b, mask=masks[key], scaling=scales[scaling_key]
            )
            handles.append(layer.register_forward_hook(hook))
        # Switched off as peft's disable_adapter() does, by each layer's flag, without its walk
        # over every parameter of every adapter (83 ms a forward with 8 adapters loaded).
        switched = [layer for layer in self._layers if not layer._disable_adapters]
        try:
            for layer in switched:
                layer._disable_adapters = True
            yield
        finally:
            for layer in switched:
                layer._disable_adapters = False
            for handle in handles:
                handle.remove()

    def _stack(self, adapters: tuple[str, ...]) -> None:
        self._stacked, self._adapters = [], adapters
        for layer in self._layers:
            names = [name for name in adapters if name in layer.lora_A]
            if not names:
                continue
            spans, start = {}, 0
            for name in names:
                rank = layer.lora_A[name].weight.shape[0]
                spans[name] = (start, start + rank)
                start += rank
            a = torch.cat([layer.lora_A[name].weight for name in names])
            b = torch.cat([layer.lora_B[name].weight for name in names], dim=1)
            scalings = {name: float(layer.scaling[name]) for name in names}
            self._stacked.append((layer, a, b, spans, scalings))


def _add_lora(layer, args, output, *, a, b, mask, scaling):
    """Forward hook of a LoRA layer in a mixed batch: each row's own adapter's delta added to
    the base's output."""
    x = args[0].to(a.dtype)
    delta = F.linear(F.linear(x, a) * mask, b) * scaling
    return output + delta.to(output.dtype)


# --- the engine -------------------------------------------------------------------------------


class BatchedEngine(InferenceEngine):
    """Requests answered together, each by its own adapter of one base; see the module's
    docstring. Use ``step()`` directly, or ``start()`` a thread that steps while there is
    work."""

    def __init__(
        self,
        load_base: Callable[[], torch.nn.Module],
        tokenizer,
        listener: Listener,
        *,
        device: str = "cpu",
        max_rows: int = 32,
        adapter_capacity: int = 8,
    ):
        if max_rows < 1:
            raise ValueError(f"max_rows must be at least 1, not {max_rows}")
        self.tokenizer = tokenizer
        self.listener = listener
        self.device = device
        self.max_rows = max_rows
        self._adapters = _AdapterSlots(load_base, adapter_capacity)
        self._end_ids = set(end_of_turn_ids(tokenizer))
        pad = tokenizer.pad_token_id
        self._pad_id = pad if pad is not None else min(self._end_ids)
        self._cache_argument: str | None = None
        # Shared with other threads, under the condition's lock.
        self._wake = threading.Condition()
        self._waiting: deque[Request] = deque()
        self._to_cancel: set[str] = set()
        self._closed = False
        self._thread: threading.Thread | None = None
        # The engine thread's own.
        self._groups: dict[str, _Group] = {}
        self._ids: set[str] = set()  # of every request waiting or running
        self._stats = {
            "steps": 0,
            "forwards": 0,
            "prefills": 0,
            "rows_in_last_step": 0,
            "largest_batch": 0,
            "tokens": 0,
            "adapter_load_failures": 0,
            "adapter_load_seconds": 0.0,
        }

    # --- other threads' side ----------------------------------------------------------------

    def submit(self, request: Request) -> None:
        with self._wake:
            if self._closed:
                raise RuntimeError("The engine is closed.")
            if request.id in self._ids:
                raise ValueError(f"A request {request.id} is already being answered.")
            self._ids.add(request.id)
            self._waiting.append(request)
            self._wake.notify()

    def cancel(self, request_id: str) -> None:
        with self._wake:
            self._to_cancel.add(request_id)
            self._wake.notify()

    def start(self) -> None:
        """Step in a daemon thread while there is work; sleep while there is none."""
        if self._thread is not None:
            raise RuntimeError("The engine is already started.")
        self._thread = threading.Thread(target=self._serve, name="batched-engine", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop the thread after its current step; what was not finished ends with "error"."""
        with self._wake:
            self._closed = True
            self._wake.notify()
        if self._thread is not None:
            if self._thread is not threading.current_thread():
                self._thread.join()
        else:
            self._abandon("The engine closed before the answer was finished.")

    @property
    def stats(self) -> dict:
        adapters = self._adapters.stats
        return {
            **self._stats,
            "running": sum(len(g.rows) for g in self._groups.values()),
            "waiting": len(self._waiting),
            "groups": len(self._groups),
            "adapter_loads": adapters["misses"],
            "adapter_hits": adapters["hits"],
            "adapter_evictions": adapters["evictions"],
            "adapters_loaded": self._adapters.loaded,
        }

    @property
    def loaded(self) -> list[str]:
        """The keys of the loaded adapters, the least recently used first (engine thread)."""
        return self._adapters.loaded

    def has_loaded(self, key: str) -> bool:
        """Whether adapter ``key`` is loaded now (any thread; it may be evicted right after)."""
        return key in self._adapters.keys

    # --- the engine thread ------------------------------------------------------------------

    def _serve(self) -> None:
        while True:
            with self._wake:
                while not (self._closed or self._waiting or self._to_cancel or self._groups):
                    self._wake.wait()
                if self._closed:
                    break
            try:
                self.step()
            except Exception:
                # A bug here must not leave clients waiting forever, nor stop the serving.
                logger.exception("batched engine step failed")
                self._abandon("The engine failed while answering.")
        self._abandon("The engine closed before the answer was finished.")

    def step(self) -> bool:
        """Admit waiting requests, prefill them, compute one more token of every running row and
        drop the rows that ended. False when nothing is running or waiting."""
        with self._wake:
            cancelled, self._to_cancel = self._to_cancel, set()
        self._cancel(cancelled)
        joiners = self._admit()
        if not joiners and not self._groups:
            return bool(self._waiting)
        self._stats["steps"] += 1
        for key, rows in joiners.items():
            group = self._groups.setdefault(key, _Group(key))
            self._prefill(group, rows)
            if not group.rows:  # every joiner of a new group ended at its first token
                del self._groups[key]
        if joiners:
            # The joiners' first tokens go out now, not after this step's decode: a decode of a
            # full batch takes 150 ms here, which their time to first token need not wait for.
            self._cancel(set(self.listener.after_step(self._running()) or ()))
        rows_this_step = 0
        for group in list(self._groups.values()):
            rows_this_step += len(group.rows)
            if group.rows:
                self._decode(group)
        self._stats["rows_in_last_step"] = rows_this_step
        self._stats["largest_batch"] = max(self._stats["largest_batch"], rows_this_step)
        self._cancel(set(self.listener.after_step(self._running()) or ()))
        return bool(self._groups or self._waiting)

    def _running(self) -> list[str]:
        return [row.id for group in self._groups.values() for row in group.rows]

    # --- admission ----------------------------------------------------------------------------

    def _admit(self) -> dict[str, list[_Row]]:
        """Waiting requests that join now, by group, their adapters loaded: first come first
        served, while there is room; the first that cannot join holds back those behind it."""
        joiners: dict[str, list[_Row]] = {}
        room = self.max_rows - sum(len(g.rows) for g in self._groups.values())
        while room > 0:
            with self._wake:
                if not self._waiting:
                    break
                request = self._waiting.popleft()
            if request.sampling.max_new_tokens == 0 or not request.prompt:
                error = None if request.prompt else "The prompt is empty."
                self._finished(request, "length" if error is None else "error", 0, error)
                continue
            try:
                row = self._row_for(request, joiners)
            except Exception as exc:
                self._stats["adapter_load_failures"] += 1
                error = f"The adapter {request.adapter} could not be loaded: {exc}"
                self._finished(request, "error", 0, error)
                continue
            if row is None:  # no free adapter slot: it waits, at the head of the queue
                with self._wake:
                    self._waiting.appendleft(request)
                break
            joiners.setdefault(row.group, []).append(row)
            room -= 1
        return joiners

    def _row_for(self, request: Request, joiners: dict[str, list[_Row]]) -> _Row | None:
        """The request's row, its adapter loaded; None when its adapter has no slot yet."""
        adapter_name, group = BASE, MIXED
        if request.adapter is not None:
            in_use = {
                row.request.adapter
                for rows in [*(g.rows for g in self._groups.values()), *joiners.values()]
                for row in rows
                if row.request.adapter is not None
            }
            started = time.monotonic()
            name = self._adapters.name_for(request.adapter, request.folder, in_use)
            if name is None:
                return None
            self._stats["adapter_load_seconds"] += time.monotonic() - started
            adapter_name = name
            group = MIXED if self._adapters.mixable(name) else name
        sampling = request.sampling
        generator = None
        if sampling.temperature > 0 and sampling.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(sampling.seed)
        tokens: list[int] = []
        decoder = _IncrementalDecoder(self.tokenizer, tokens)
        return _Row(request, adapter_name, group, generator, tokens, decoder)

    # --- the forwards -------------------------------------------------------------------------

    def _prefill(self, group: _Group, joiners: list[_Row]) -> None:
        """Run the joiners' prompts together, take their first tokens, and add those that go on
        to the group's batch."""
        ids, mask = _left_padded([row.request.prompt for row in joiners], self._pad_id)
        # Each row's true positions: its first real token is position 0 whatever its padding.
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        from transformers import DynamicCache

        cache = DynamicCache()
        self._stats["prefills"] += 1
        try:
            logits = self._forward(group, joiners, ids, mask, positions, cache)
        except Exception as exc:
            # The running rows' cache is untouched: only the joiners fail.
            self._fail(joiners, exc)
            return
        for row in joiners:
            row.length = len(row.request.prompt)
        going_on = self._take_tokens(joiners, logits)
        if not going_on:
            return
        kept = [joiners.index(row) for row in going_on]
        _select_rows(cache, kept)
        mask = mask[kept]
        if group.cache is None:
            group.cache, group.mask = cache, mask
        else:
            group.mask = _concatenate_rows(group.cache, group.mask, cache, mask)
        group.rows.extend(going_on)
        _trim_padding(group)

    def _decode(self, group: _Group) -> None:
        """One more token for every row of the group, in one forward."""
        rows = group.rows
        ids = torch.tensor([[row.tokens[-1]] for row in rows])
        mask = F.pad(group.mask, (0, 1), value=1)
        positions = torch.tensor([[row.length] for row in rows])
        try:
            logits = self._forward(group, rows, ids, mask, positions, group.cache)
        except Exception as exc:
            # Some layers' caches may have grown by this step's column, others not.
            self._fail(rows, exc)
            del self._groups[group.key]
            return
        group.mask = mask
        for row in rows:
            row.length += 1
        going_on = self._take_tokens(rows, logits)
        if len(going_on) < len(rows):
            kept = [i for i, row in enumerate(rows) if row in going_on]
            self._keep_rows(group, kept)

    def _forward(self, group, rows, ids, mask, positions, cache) -> torch.Tensor:
        """The next-token logits ``[rows, vocabulary]`` of the group's ``rows``."""
        model = self._adapters.model
        if self._cache_argument is None:
            self._cache_argument = _cache_argument(model)
        routing = contextlib.nullcontext()
        if self._adapters.has_adapters:
            names = {row.adapter_name for row in rows}
            if group.key != MIXED:
                self._adapters.activate(group.key)
            elif len(names) == 1 and BASE not in names:
                # One adapter: the same computation without peft's per-layer sub-batches
                # (15 ms of a 65 ms step for one row of SmolLM2 on this CPU).
                self._adapters.activate(names.pop())
            else:
                routing = self._adapters.routed([row.adapter_name for row in rows])
        self._stats["forwards"] += 1
        with torch.no_grad(), routing:
            output = model(
                input_ids=ids.to(self.device),
                attention_mask=mask.to(self.device),
                position_ids=positions.to(self.device),
                # use_cache explicitly: the base's config turns it off for packed training.
                use_cache=True,
                logits_to_keep=1,
                **{self._cache_argument: cache},
            )
        return output.logits[:, -1].float()

    def _fail(self, rows: list[_Row], exc: Exception) -> None:
        logger.exception("a forward of the batched engine failed", exc_info=exc)
        error = f"The model failed while answering: {type(exc).__name__}: {exc}"
        for row in rows:
            self._finish(row, "error", error)

    # --- tokens and text ----------------------------------------------------------------------

    def _take_tokens(self, rows: list[_Row], logits: torch.Tensor) -> list[_Row]:
        """Add each row's next token; finish the rows that end with it. The rows going on."""
        greedy = logits.argmax(-1).tolist()
        going_on = []
        for index, row in enumerate(rows):
            sampling = row.request.sampling
            token = greedy[index]
            if sampling.temperature > 0:
                token = _sample(logits[index], sampling, row.generator)
            self._stats["tokens"] += 1
            reason = self._add_token(row, token)
            if reason is None:
                going_on.append(row)
            else:
                self._finish(row, reason)
        return going_on

    def _add_token(self, row: _Row, token: int) -> str | None:
        """The finish reason the token ends the answer with, or None."""
        if token in self._end_ids:
            return "stop"
        row.tokens.append(token)
        if self._send(row, row.decoder.step()):
            return "stop"
        if len(row.tokens) >= row.request.sampling.max_new_tokens:
            return "length"
        return None

    def _send(self, row: _Row, text: str) -> bool:
        """Send the row's new text, holding back a tail a stop string may begin with; True when
        a stop string is found (the text before it sent, the rest dropped)."""
        if not text:
            return False
        stops = row.request.sampling.stop
        pending = row.held + text
        found = [i for i in (pending.find(s) for s in stops) if i >= 0]
        if found:
            row.held, row.stopped = "", True
            self._piece(row, pending[: min(found)])
            return True
        keep = max((_overlap(pending, s) for s in stops), default=0)
        row.held = pending[len(pending) - keep :] if keep else ""
        self._piece(row, pending[: len(pending) - keep])
        return False

    def _piece(self, row: _Row, text: str) -> None:
        if text:
            self.listener.piece(row.id, text)

    # --- leaving ------------------------------------------------------------------------------

    def _finish(self, row: _Row, reason: str, error: str | None = None) -> None:
        """Tell the listener the row's answer is over (its held-back text sent, unless the row
        ends unanswered). The caller drops the row from its batch."""
        if reason in ("stop", "length") and not row.stopped:
            if self._send(row, row.decoder.flush()):
                reason = "stop"
            elif row.held:
                self._piece(row, row.held)
        self._finished(row.request, reason, len(row.tokens), error)

    def _finished(self, request: Request, reason: str, tokens: int, error: str | None = None):
        self._ids.discard(request.id)
        self.listener.finished(request.id, reason, len(request.prompt), tokens, error)

    def _cancel(self, ids: set[str]) -> None:
        """Finish the requests ``ids`` (running or waiting) with "cancelled"."""
        if not ids:
            return
        with self._wake:
            waiting = [r for r in self._waiting if r.id in ids]
            for request in waiting:
                self._waiting.remove(request)
        for request in waiting:
            self._finished(request, "cancelled", 0)
        for group in list(self._groups.values()):
            kept = [i for i, row in enumerate(group.rows) if row.id not in ids]
            if len(kept) < len(group.rows):
                for row in group.rows:
                    if row.id in ids:
                        self._finished(row.request, "cancelled", len(row.tokens))
                self._keep_rows(group, kept)

    def _keep_rows(self, group: _Group, kept: list[int]) -> None:
        """Keep only the rows at ``kept`` of the group's batch and KV cache."""
        if not kept:
            del self._groups[group.key]
            return
        group.rows = [group.rows[i] for i in kept]
        _select_rows(group.cache, kept)
        group.mask = group.mask[kept]
        _trim_padding(group)

    def _abandon(self, error: str) -> None:
        """Finish every request waiting or running with "error"."""
        with self._wake:
            waiting, self._waiting = list(self._waiting), deque()
        for request in waiting:
            self._finished(request, "error", 0, error)
        for group in self._groups.values():
            for row in group.rows:
                self._finished(row.request, "error", len(row.tokens), error)
        self._groups.clear()


# --- helpers ----------------------------------------------------------------------------------


def _sample(logits: torch.Tensor, sampling: Sampling, generator) -> int:
    """A token drawn from the softmax at the temperature, within the top_p nucleus."""
    probabilities = torch.softmax(logits / sampling.temperature, dim=-1)
    if sampling.top_p >= 1:
        return int(torch.multinomial(probabilities, 1, generator=generator))
    ordered, order = probabilities.sort(descending=True)
    # The smallest set of most likely tokens whose mass reaches top_p (the first always kept).
    ordered = ordered * ((ordered.cumsum(-1) - ordered) < sampling.top_p)
    return int(order[torch.multinomial(ordered, 1, generator=generator)])


def _overlap(text: str, stop: str) -> int:
    """The length of the longest end of ``text`` that ``stop`` begins with (shorter than it)."""
    for length in range(min(len(stop) - 1, len(text)), 0, -1):
        if text.endswith(stop[:length]):
            return length
    return 0


def _layers(cache) -> list:
    return [layer for layer in cache.layers if layer.is_initialized]


def _select_rows(cache, rows: list[int]) -> None:
    if len(rows) == len(_layers(cache)[0].keys):
        return
    index = torch.tensor(rows, device=_layers(cache)[0].keys.device)
    for layer in _layers(cache):
        layer.keys = layer.keys[index]
        layer.values = layer.values[index]


def _concatenate_rows(cache, mask: torch.Tensor, joining, joining_mask: torch.Tensor):
    """Append the ``joining`` cache's rows to ``cache``, both left-padded to the wider; the
    mask of the rows together."""
    width = max(mask.shape[1], joining_mask.shape[1])
    for layer, new in zip(_layers(cache), _layers(joining), strict=True):
        layer.keys = torch.cat([_pad_columns(layer.keys, width), _pad_columns(new.keys, width)])
        layer.values = torch.cat(
            [_pad_columns(layer.values, width), _pad_columns(new.values, width)]
        )
    return torch.cat([_pad_mask(mask, width), _pad_mask(joining_mask, width)])


def _pad_columns(states: torch.Tensor, width: int) -> torch.Tensor:
    """Keys or values ``[rows, heads, columns, head_dim]`` padded on the left to ``width``."""
    return F.pad(states, (0, 0, width - states.shape[2], 0))


def _pad_mask(mask: torch.Tensor, width: int) -> torch.Tensor:
    return F.pad(mask, (width - mask.shape[1], 0))


def _trim_padding(group: _Group) -> None:
    """Cut the leading columns that hold padding in every row (left when the longest row did)."""
    unused = int(group.mask.any(0).long().argmax())
    if unused:
        group.mask = group.mask[:, unused:]
        for layer in _layers(group.cache):
            layer.keys = layer.keys[:, :, unused:]
            layer.values = layer.values[:, :, unused:]
