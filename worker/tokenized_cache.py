"""A file's examples as tokens, kept in S3 beside the file, so that a retry, a resume or the next
job on the same file does not render and tokenize it again.

What is kept is the slow part (engine/train.py ``rendered_tokens``: the chat template, the
trained spans, the tokenizer), before any truncation, so jobs with another ``max_seq_length``
share it. It lives under the file's own prefix (``orgs/<org>/files/<id>/tokenized/``): it is the
tenant's, goes when the file is deleted, and the orphan sweep sees the file own it. Its name is a
digest of the file's sha256, the tokenizer (base model and revision, transformers' version) and
the rendering code, so a change to any of them reads nothing stale. The format is safetensors:
nothing a worker loads from storage can run code. It is a cache: a read or a write that fails
only means rendering again. (It is not counted in the tenant's storage quota: about five bytes
a token, against the file's own bytes.)
"""

from __future__ import annotations

import importlib.metadata
import logging
from pathlib import Path

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from engine import data, evaluate, train
from jobs.models import BaseModel, File
from loft import storage

logger = logging.getLogger(__name__)

ENGINE = Path(data.__file__).parent
RENDERING_CODE = evaluate.digest([(ENGINE / name).read_text() for name in ("data.py", "train.py")])


def rendered_rows(
    file: File, examples: list[data.Example], tokenizer, base_model: BaseModel
) -> list[train.Rendered]:
    """The file's examples rendered (one per example, in order; a preference pair with both
    its sides): read from storage when kept, else rendered now and kept."""
    key = cache_key(file, base_model)
    try:
        kept = decode(storage.get_bytes(key))
    except storage.StorageError as error:
        if not storage.is_missing(error):  # not fatal: it is only a cache
            logger.warning("could not read the tokenized rows of %s: %s", file.id, error)
    except Exception:  # noqa: BLE001 - a damaged object is rendered again, and replaced
        logger.warning("the tokenized rows of %s are damaged; redone", file.id, exc_info=True)
    else:
        if len(kept) == len(examples):
            return kept
        logger.warning("the tokenized rows of %s do not match its examples; redone", file.id)
    rows = [train.rendered_tokens(example, tokenizer) for example in examples]
    try:
        storage.put_bytes(key, encode(rows))
    except storage.StorageError as error:
        logger.warning("could not keep the tokenized rows of %s: %s", file.id, error)
    return rows


def cache_key(file: File, base_model: BaseModel) -> str:
    name = evaluate.digest(
        {
            "file": file.sha256,
            "tokenizer": [base_model.name, base_model.revision, base_model.source],
            "libraries": [importlib.metadata.version(n) for n in ("transformers", "tokenizers")],
            "code": RENDERING_CODE,
        }
    )
    return f"{file.s3_prefix}tokenized/{name}.safetensors"


def encode(rows: list[train.Rendered]) -> bytes:
    """Every sequence's tokens end to end (a pair's preferred, then non-preferred), its
    trained flags the same way, the lengths, and each example's count of sequences."""
    sequences = [side for row in rows for side in (row, row.rejected) if side is not None]
    return save_tensors(
        {
            "input_ids": torch.tensor(
                [t for side in sequences for t in side.input_ids], dtype=torch.int32
            ),
            "trained": torch.tensor(
                [flag for side in sequences for flag in side.trained], dtype=torch.bool
            ),
            "lengths": torch.tensor([len(side.input_ids) for side in sequences], dtype=torch.int64),
            "sides": torch.tensor(
                [1 + (row.rejected is not None) for row in rows], dtype=torch.int8
            ),
        }
    )


def decode(payload: bytes) -> list[train.Rendered]:
    tensors = load_tensors(payload)
    ids, trained = tensors["input_ids"].tolist(), tensors["trained"].tolist()
    sequences, start = [], 0
    for length in tensors["lengths"].tolist():
        sequences.append(
            train.Rendered(ids[start : start + length], trained[start : start + length])
        )
        start += length
    rows, at = [], 0
    for sides in tensors["sides"].tolist():
        rows.append(sequences[at]._replace(rejected=sequences[at + 1] if sides == 2 else None))
        at += sides
    return rows
