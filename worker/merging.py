"""Making an adapter's merged weights on a worker (Adapter.request_merge queues it).

The worker fetches the adapter folder, folds it into its base (engine/merge.py) and uploads the
model folder under ``Adapter.merged_prefix``, manifest last; the row says ready only after
that. The row is the truth: a conditional UPDATE claims the work and another ends it.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from django.conf import settings

from engine import artifacts, merge
from engine.base_models import load_base_model, training_device
from jobs.models import Adapter
from loft import storage
from loft.observability import bind_log_fields
from loft.storage import StorageError
from worker import serving
from worker.tokenizer import tokenizer_for

logger = logging.getLogger(__name__)
Status = Adapter.MergedStatus


def run_merge(adapter_id: str) -> None:
    # A running one may be claimed again: its worker died and the message came back.
    claimed = Adapter.objects.filter(
        pk=adapter_id, merged_status__in=(Status.QUEUED, Status.RUNNING)
    ).update(merged_status=Status.RUNNING)
    if not claimed:
        return  # deleted, or already made
    adapter = Adapter.objects.select_related("base_model").get(pk=adapter_id)
    bind_log_fields(org_id=adapter.org_id)
    try:
        manifest = merged_weights(adapter)
    except StorageError as error:
        # The tenant reads a sentence; the endpoint, bucket and key are for the operators' log.
        logger.warning("merging adapter %s met a storage error: %s", adapter.id, error)
        _end(
            adapter,
            Status.FAILED,
            merged_error="Object storage was unavailable; ask for the merged weights again.",
        )
    except Exception as error:  # noqa: BLE001 - the page must say why, in a sentence
        logger.exception("merging adapter %s failed", adapter.id)
        _end(
            adapter,
            Status.FAILED,
            merged_error=f"Merging failed on the worker ({error.__class__.__name__}); the "
            "operators have the details in its log.",
        )
    else:
        _end(
            adapter,
            Status.READY,
            merged_manifest=manifest,
            merged_size_bytes=manifest["total_bytes"],
        )


def merged_weights(adapter: Adapter) -> dict:
    """Merge on this worker and upload the folder; returns its manifest."""
    spec, device = adapter.base_model.spec, training_device()
    cache = settings.LOFT_HOME / "models"
    work = settings.LOFT_HOME / "merging"
    work.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        folder = Path(tmp)
        merge.merge_adapter(
            lambda: load_base_model(spec, cache, "none", device),
            serving.adapter_folder(adapter),
            folder,
            tokenizer_for(adapter.base_model),
        )
        manifest = artifacts.build_manifest(folder)
        storage.delete_prefix(adapter.merged_prefix)  # what an earlier, failed try left there
        storage.upload_folder(folder, adapter.merged_prefix, manifest)
    return manifest


def _end(adapter: Adapter, status: str, **fields) -> None:
    Adapter.objects.filter(pk=adapter.pk, merged_status=Status.RUNNING).update(
        merged_status=status, **fields
    )
