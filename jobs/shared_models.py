"""Converted base models in object storage, for hosts that share nothing else.

The engine's cache (engine/model_cache.py) asks a ``SharedModels`` store before it converts or
downloads a part of a base model, and offers it what it built. This is that store on S3: a
part lives under ``models/<safe id>/<revision>/<part>/`` with a ``manifest.json`` (sha256 and
size of each file) written last, as every multi-file artifact in the bucket. Workers use it for
everything they load (worker/warm_start.py sets it as they start); the web for the tokenizer it
counts tokens with (jobs/datasets.py). It is here, not in worker/, because the web needs it
too; it imports neither torch nor transformers.

Two hosts that convert the same part at once upload the same bytes (the conversion is
deterministic) and each writes the manifest after its files, so the part ends whole either
way. A part whose files do not match its manifest is treated as missing: the host builds it
itself and shares it again, which repairs it for the others.
"""

from __future__ import annotations

import logging
from pathlib import Path

from engine import artifacts
from loft import storage

logger = logging.getLogger(__name__)

PREFIX = "models/"


def part_prefix(key: str) -> str:
    return f"{PREFIX}{key}/"


class S3SharedModels:
    """engine.model_cache.SharedModels on the bucket. Storage that fails to answer is not a
    reason to fail a job: the host builds the part itself, as it would alone."""

    def fetch(self, key: str, folder: Path) -> bool:
        prefix = part_prefix(key)
        try:
            manifest = storage.download_folder(prefix, folder)
            artifacts.verify(folder, manifest)
        except storage.StorageError as error:
            if storage.is_missing(error):
                logger.info("%s is not in object storage (or not whole): building it", prefix)
            else:
                logger.warning("could not read %s (%s): building it here", prefix, error)
            return False
        except (ValueError, KeyError, TypeError) as error:  # a file or the manifest is damaged
            logger.warning("%s does not match its manifest (%s): building it here", prefix, error)
            return False
        logger.info(
            "downloaded %s from object storage: %d files, %d bytes, verified",
            prefix,
            len(manifest["files"]),
            manifest["total_bytes"],
        )
        return True

    def share(self, key: str, folder: Path) -> None:
        prefix = part_prefix(key)
        manifest = artifacts.build_manifest(folder)
        try:
            storage.upload_folder(folder, prefix, manifest)
        except storage.StorageError as error:
            # This host has its copy; the next one converts for itself, and tries again.
            logger.warning("could not upload %s: %s", prefix, error)
            return
        logger.info(
            "uploaded %s to object storage: %d files, %d bytes",
            prefix,
            len(manifest["files"]),
            manifest["total_bytes"],
        )
