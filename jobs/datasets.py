"""Dataset validation on the Django side: which tokenizer, where the bytes are, what to record.

The checking itself is ``worker/data.py``; this module feeds it the object from S3 and writes
the outcome on the File row.
"""

from __future__ import annotations

import functools
import logging

from django.conf import settings

from jobs.models import BaseModel, File
from loft import storage
from worker import data
from worker.base_models import BaseModelSpec, load_tokenizer

logger = logging.getLogger(__name__)


def spec_of(model: BaseModel) -> BaseModelSpec:
    return BaseModelSpec(model.name, model.source, model.revision, model.context_length)


@functools.lru_cache(maxsize=4)
def _tokenizer(spec: BaseModelSpec):
    return load_tokenizer(spec, settings.LOFT_HOME / "models")


def tokenizer_for(model: BaseModel):
    return _tokenizer(spec_of(model))


def validate_object(key: str, filename: str, requested_format: str, base_model: BaseModel) -> dict:
    """The validation report of a stored upload; raises data.DatasetError when it is unusable."""
    report = data.validate(
        storage.iter_object(key),
        tokenizer_for(base_model),
        filename=filename,
        forced_format=requested_format or None,
        context_length=base_model.context_length,
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
    uploaded it can read why; its bytes are deleted, as nothing can use them.
    """
    try:
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
    file.mark_processed(report)
