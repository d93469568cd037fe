"""One base model in memory and many LoRA adapters beside it, switched without reloading the
base (``AdapterCache``: custom evaluations score one model after another with it, and the serving
engine, engine/batching.py, loads its adapters through it), and the incremental decoding both
use to send an answer in pieces of whole characters.

No Django, no Celery, no S3: the caller says how to load the base and where an adapter's folder
is (``folder`` may download it).

Why one base and many adapters: an adapter of SmolLM2 is a few MB, its base hundreds, and a
larger base takes longer still to load. ``AdapterCache`` loads the base once, wraps it in a peft
model at the first adapter, and keeps up to ``capacity`` adapters loaded beside it, so a switch
only changes which adapter the LoRA layers apply (bench/adapters.py, SmolLM2 on a CPU: 0.5 ms,
against 200 ms to reload base and adapter). The least recently used adapter is deleted when one
more would exceed the capacity. ``key=None`` answers as the plain base, with the LoRA layers
turned off (``disable_adapter()``), as evaluation compares base and adapter.

Quantization is the caller's choice (``load_base``): an adapter is served on the base precision
it was trained on, a QLoRA adapter on its 4-bit base (worker/serving.py). Loading adapters with
peft onto a 4-bit base leaves the base's answers as they were (measured on the CPU with
bitsandbytes 0.50: tests/test_generate_engine.py).
"""

from __future__ import annotations

import contextlib
import inspect
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from engine import artifacts

# A character split across tokens decodes to this until its last byte arrives.
INCOMPLETE = "\ufffd"


# --- adapters ---------------------------------------------------------------------------------


class AdapterCache:
    """One base model and up to ``capacity`` of its LoRA adapters, switched without reloading.

    Keys are the caller's (adapter ids); peft knows the adapters by names of its own, since a
    peft adapter name may not contain a dot. One lock serializes every use: a worker answers one
    request at a time, and an adapter switch must not happen under a running generation.
    """

    def __init__(self, load_base: Callable[[], torch.nn.Module], capacity: int = 8):
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, not {capacity}")
        self.capacity = capacity
        self._load_base = load_base
        self._lock = threading.Lock()
        self._holder: int | None = None  # the thread inside use(), to refuse nesting
        self._base = None
        self._peft = None  # the peft model, once the first adapter is loaded
        self._layers: list = []  # its LoRA layers
        self._names: OrderedDict[str, str] = OrderedDict()  # key → peft name, LRU first
        self._counter = 0
        self.base_loads = 0
        self._stats = {"hits": 0, "misses": 0, "evictions": 0}

    @property
    def loaded(self) -> list[str]:
        """The keys of the loaded adapters, the most recently used last."""
        return list(self._names)

    @property
    def stats(self) -> dict[str, int]:
        return dict(self._stats)

    @contextlib.contextmanager
    def use(self, key: str | None, folder: Callable[[], Path]) -> Iterator[torch.nn.Module]:
        """The model answering as adapter ``key``, or as the plain base when ``key`` is None.

        ``folder`` is called only when the adapter is not loaded yet. Not re-entrant: a nested
        ``use`` in the same thread would switch the adapter under the outer one, and raises.
        """
        if self._holder == threading.get_ident():
            raise RuntimeError("AdapterCache.use() is not re-entrant")
        with self._lock:
            self._holder = threading.get_ident()
            try:
                if key is None:
                    with self._as_base() as model:
                        yield model
                else:
                    yield self._activate(key, folder)
            finally:
                self._holder = None

    @contextlib.contextmanager
    def _as_base(self) -> Iterator[torch.nn.Module]:
        if self._peft is None:
            yield self._loaded_base()
        else:
            with self._peft.disable_adapter():
                yield self._peft

    def _loaded_base(self):
        if self._base is None:
            self.base_loads += 1
            self._base = self._load_base()
            self._base.eval()
        return self._base

    def _activate(self, key: str, folder: Callable[[], Path]):
        name = self._names.get(key)
        if name is not None:
            self._stats["hits"] += 1
            self._names.move_to_end(key)
        else:
            self._stats["misses"] += 1
            name = self._load(folder())
            self._names[key] = name
        self._switch_to(name)
        while len(self._names) > self.capacity:
            _, evicted = self._names.popitem(last=False)
            self._peft.delete_adapter(evicted)
            self._stats["evictions"] += 1
        return self._peft

    def _load(self, path: Path) -> str:
        """Load the adapter in ``path`` beside the others; its new peft name."""
        from peft import PeftModel
        from peft.tuners.tuners_utils import BaseTunerLayer

        artifacts.refuse_unsafe_adapter(path)  # before peft could unpickle anything in it
        base = self._loaded_base()
        self._counter += 1
        name = f"adapter{self._counter}"
        device = next(base.parameters()).device
        if self._peft is None:
            try:
                self._peft = PeftModel.from_pretrained(
                    base, str(path), adapter_name=name, torch_device=str(device)
                )
            except Exception:
                # peft wraps the base's layers before it reads the weights; a failed load
                # would leave them wrapped, and every later adapter stacked on debris.
                _remove_adapter_layers(base)
                raise
        else:
            try:
                self._peft.load_adapter(str(path), adapter_name=name, torch_device=str(device))
            except Exception:
                if name in self._peft.peft_config:
                    self._peft.delete_adapter(name)
                raise
        self._peft.eval()  # new LoRA dropout modules are created in training mode
        self._layers = [m for m in self._peft.modules() if isinstance(m, BaseTunerLayer)]
        return name

    def _switch_to(self, name: str) -> None:
        """Make the loaded adapter ``name`` the one that answers.

        peft's ``set_adapter`` does it by walking the whole model and setting ``requires_grad``
        on every parameter of every loaded adapter: 38 ms a switch with 20 adapters of SmolLM2
        on this CPU, more with each adapter loaded. These adapters are loaded frozen and never
        trained, so pointing each LoRA layer at the adapter is all a switch needs; should a peft
        release keep that pointer elsewhere, the layers do not report the new adapter as active
        and the switch falls back to ``set_adapter``.
        """
        for layer in self._layers:
            layer._active_adapter = [name]
        self._peft.base_model.active_adapter = name
        if any(layer.active_adapters != [name] for layer in self._layers):
            self._peft.set_adapter(name, inference_mode=True)


def _remove_adapter_layers(model) -> None:
    """Put every layer peft wrapped back in place, as ``unload()`` would without a peft model."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for path, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            parent, _, child = path.rpartition(".")
            setattr(model.get_submodule(parent), child, module.get_base_layer())
    if hasattr(model, "peft_config"):
        del model.peft_config


# --- generation -------------------------------------------------------------------------------


def _cache_argument(model) -> str:
    """The name of the KV-cache argument (and output): transformers 5.x renamed
    ``past_key_values`` to ``cache``, the old name deprecated."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(inner.forward).parameters else "past_key_values"


class _IncrementalDecoder:
    """Text of a growing token list, piece by piece.

    Each step decodes from a few tokens before the unread ones, so a tokenizer that decodes a
    token differently at the start of a text (a leading space dropped) still gives the right
    piece, and holds back a piece that ends inside a character.
    """

    def __init__(self, tokenizer, tokens: list[int]):
        self.tokenizer = tokenizer
        self.tokens = tokens
        self.prefix = 0  # decoding starts here, for context
        self.read = 0  # tokens before this are yielded

    def _decode(self, start: int, end: int | None = None) -> str:
        return self.tokenizer.decode(self.tokens[start:end], skip_special_tokens=True)

    def step(self) -> str:
        known = self._decode(self.prefix, self.read)
        text = self._decode(self.prefix)
        if len(text) <= len(known) or text.endswith(INCOMPLETE):
            return ""
        self.prefix, self.read = self.read, len(self.tokens)
        return text[len(known) :]

    def flush(self) -> str:
        """What is left when the answer ends, an incomplete character included."""
        if self.read == len(self.tokens):
            return ""
        known = self._decode(self.prefix, self.read)
        self.read = len(self.tokens)
        return self._decode(self.prefix)[len(known) :]
