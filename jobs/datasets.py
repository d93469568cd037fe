"""Dataset validation on the Django side: which tokenizer, where the bytes are, what to record.

The checking itself is ``engine/data.py``; this module feeds it the object from S3 and writes
the outcome on the File row. It runs in the web (small uploads, inside the request, for at most
``LOFT_INLINE_VALIDATION_SECONDS``) and in a worker (the others), so it counts tokens with
engine/chat_tokenizer.py, which needs neither torch nor transformers.
"""

from __future__ import annotations

import functools
import json
import logging
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

from django.conf import settings

from engine import data
from engine.chat_tokenizer import ChatTokenizer
from engine.model_cache import BaseModelSpec, prepare
from jobs import traffic
from jobs.models import BaseModel, File
from jobs.shared_models import S3SharedModels
from loft import storage

logger = logging.getLogger(__name__)

# Converting the bundled model's tokenizer takes ~8 s here; fetching a hub model's, longer.
PREPARE_TOKENIZER_TIMEOUT_SECONDS = 600


@functools.lru_cache(maxsize=4)
def _chat_tokenizer(spec: BaseModelSpec) -> ChatTokenizer:
    """Read from this host's cache; on a cache miss, fetched from object storage where another
    host shared it, else saved here and shared."""
    folder = prepare(
        spec,
        settings.LOFT_HOME / "models",
        "tokenizer",
        functools.partial(_save_tokenizer_in_child, spec),
        S3SharedModels(),
    )
    return ChatTokenizer.from_folder(folder)


def _save_tokenizer_in_child(spec: BaseModelSpec, folder: Path) -> None:
    # Saved by transformers, in a child process: this one stays torch-free.
    logger.info("preparing the tokenizer of %s", spec.name)
    subprocess.run(
        [sys.executable, "-m", "engine.base_models", "tokenizer", json.dumps(asdict(spec))]
        + [str(folder)],
        check=True,
        capture_output=True,
        timeout=PREPARE_TOKENIZER_TIMEOUT_SECONDS,
    )


def chat_tokenizer_for(model: BaseModel) -> ChatTokenizer:
    return _chat_tokenizer(model.spec)


def validate_object(
    key: str,
    filename: str,
    requested_format: str,
    base_model: BaseModel,
    *,
    deadline: float | None = None,
) -> dict:
    """The validation report of a stored upload; raises data.DatasetError when it is unusable,
    and data.OutOfTime when ``time.monotonic()`` passes ``deadline`` first."""
    report = data.validate(
        storage.iter_object(key),
        chat_tokenizer_for(base_model),
        filename=filename,
        forced_format=requested_format or None,
        context_length=base_model.context_length,
        deadline=deadline,
    )
    return report.as_dict()


def check_object_head(key: str, filename: str, requested_format: str) -> None:
    """Parse the first bytes of a large upload; raises data.DatasetError when they show the file
    is unusable, so the uploader hears it now instead of from a background job."""
    data.check_head(
        storage.iter_object(key, first_bytes=settings.LOFT_HEAD_CHECK_BYTES),
        filename=filename,
        forced_format=requested_format or None,
    )


def rejection_details(error: data.DatasetError) -> dict:
    return {"errors": [str(e) for e in error.errors], "error_count": error.error_count}


def validate_stored_file(file: File) -> None:
    """Validate a file that was stored before validation (large uploads, in a worker).

    An unusable file keeps its row, with status ``error`` and the reason, so the person who
    uploaded it can read why; its bytes are deleted, as nothing can use them. A file made of
    traffic (jobs/traffic.py) has its bytes built first, and keeps its selection's summary.
    """
    try:
        if traffic.is_pending(file):
            traffic.build(file)
        report = validate_object(
            file.s3_key,
            file.filename,
            file.requested_format,
            file.base_model or BaseModel.default(),
        )
    except data.DatasetError as error:
        storage.delete_object(file.s3_key)
        file.mark_error(error.message, rejection_details(error))
        return
    if "traffic" in file.report:
        report["traffic"] = file.report["traffic"]
    file.mark_processed(report)
