"""Periodic upkeep that celery beat runs (schedule: CELERY_BEAT_SCHEDULE in loft/settings.py).

Each function is safe to run twice, late, or on two workers at once: it recomputes from the
database and the bucket, and deletes only what is old enough that nothing can still be
writing it.
"""

from __future__ import annotations

import logging
from datetime import timedelta

import redis
from django.conf import settings
from django.db.models.functions import Coalesce
from django.utils import timezone

from jobs import ops, tasks
from jobs.models import (
    Adapter,
    BaseScores,
    Checkpoint,
    Evaluation,
    File,
    FineTuneJob,
    MonthlyUsage,
    month_start,
)
from loft import storage

logger = logging.getLogger(__name__)

# What lives under orgs/<org id>/<kind>/<id>/ in the bucket, and the rows that own it.
OWNERS = {"files": File, "adapters": Adapter, "jobs": FineTuneJob}


def abort_abandoned_uploads(older_than: timedelta | None = None) -> int:
    """Abort multipart uploads begun long ago and never finished (their request died midway):
    S3 keeps their parts, and bills them, until someone does."""
    if older_than is None:
        older_than = timedelta(seconds=settings.LOFT_ABANDONED_UPLOAD_SECONDS)
    cutoff = timezone.now() - older_than
    aborted = 0
    for key, upload_id, initiated in list(storage.open_multipart_uploads()):
        if initiated <= cutoff:
            storage.abort_multipart_upload(key, upload_id)
            aborted += 1
    if aborted:
        logger.info("aborted %d abandoned multipart uploads", aborted)
    return aborted


def owner_of(key: str) -> tuple[str, type, str] | None:
    """(org id, model, object id) for a key Loft writes, or None for a key it does not know."""
    parts = key.split("/")
    if len(parts) < 5 or parts[0] != "orgs" or parts[2] not in OWNERS:
        return None
    return parts[1], OWNERS[parts[2]], parts[3]


def sweep_orphan_objects(older_than: timedelta | None = None, prefix: str = "orgs/") -> int:
    """Delete objects under ``orgs/`` that no row owns: left by a write whose transaction
    rolled back, or by a delete that removed the row and failed halfway through the objects.
    Under a job that still exists, its checkpoints no Checkpoint row names go too: an attempt
    that died, or was fenced off, between its upload and its row, or a pruned checkpoint whose
    deletion failed. Only objects older than the grace period: a younger one may be an upload
    whose row is about to commit. Keys of a shape Loft does not write are left alone."""
    if older_than is None:
        older_than = timedelta(seconds=settings.LOFT_ORPHAN_GRACE_SECONDS)
    cutoff = timezone.now() - older_than
    candidates: dict[tuple[type, str, str], list[str]] = {}
    for key, modified in storage.list_objects(prefix):
        owner = owner_of(key)
        if owner is not None and modified <= cutoff:
            org_id, model, object_id = owner
            candidates.setdefault((model, object_id, org_id), []).append(key)
    orphans = []
    for model in OWNERS.values():
        ids = [object_id for (m, object_id, _org) in candidates if m is model]
        owned = set(model.objects.filter(pk__in=ids).values_list("pk", "org_id"))
        for (m, object_id, org_id), keys in candidates.items():
            if m is not model:
                continue
            if (object_id, org_id) not in owned:
                orphans += keys
            elif model is FineTuneJob:
                orphans += unrecorded_checkpoint_keys(object_id, keys)
    for key in orphans:
        storage.delete_object(key)
    if orphans:
        logger.info("deleted %d objects that no row owns", len(orphans))
    return len(orphans)


def unrecorded_checkpoint_keys(job_id: str, keys: list[str]) -> list[str]:
    """Those of a job's ``keys`` that lie under its checkpoints but under no recorded one."""
    recorded = tuple(Checkpoint.objects.filter(job_id=job_id).values_list("s3_prefix", flat=True))
    return [
        key
        for key in keys
        if key.split("/")[4:5] == ["checkpoints"] and not key.startswith(recorded)
    ]


def forget_unused_base_scores(older_than: timedelta | None = None) -> int:
    """Delete the base's kept evaluation results that nobody read (or wrote) for ``older_than``:
    the scoring code, a library or a base's revision changed, and their keys will not come
    again (worker/base_scores.py)."""
    if older_than is None:
        older_than = timedelta(seconds=settings.LOFT_BASE_SCORES_UNUSED_SECONDS)
    last_used = Coalesce("last_used_at", "created_at")
    unused = BaseScores.objects.alias(last_used=last_used).filter(
        last_used__lt=timezone.now() - older_than
    )
    deleted, _ = unused.delete()
    return deleted


def roll_up_usage() -> int:
    """This month's usage lines, and last month's, so that the final hours of a month reach
    its line even though the next run comes after the month has ended."""
    this_month = month_start()
    last_month = month_start(this_month - timedelta(days=1))
    return MonthlyUsage.roll_up(last_month) + MonthlyUsage.roll_up(this_month)


# kombu's Redis transport keeps the messages a worker has taken and not yet acknowledged here.
UNACKED_KEY = "unacked"


def messages_in_broker() -> str:
    """Every message the broker holds, waiting or taken and unacknowledged, as one text to
    search for ids (a task's arguments are in its message headers as plain text)."""
    connection = redis.Redis.from_url(settings.CELERY_BROKER_URL, socket_timeout=5)
    try:
        held = [item for queue in ops.queues() for item in connection.lrange(queue, 0, -1)]
        held += connection.hvals(UNACKED_KEY)
    finally:
        connection.close()
    return "\n".join(item.decode(errors="replace") for item in held)


def resend_lost_hints(grace: timedelta | None = None) -> int:
    """PostgreSQL holds the truth, the broker only hints: re-send the hint of every job,
    upload, evaluation and merge that waits for a worker while the broker holds no message
    for it (the broker restarted empty, or was flushed). Only rows older than ``grace``: a
    younger one's message may still be on its way. A hint sent twice is harmless, since each
    is claimed by a conditional UPDATE."""
    if grace is None:
        grace = timedelta(seconds=settings.LOFT_RESEND_GRACE_SECONDS)
    cutoff = timezone.now() - grace
    held = messages_in_broker()
    resent = 0
    for job in FineTuneJob.objects.filter(status=FineTuneJob.Status.QUEUED, created_at__lt=cutoff):
        if job.id not in held:
            job.add_event("warning", "The broker had lost this job's hint; sent again.")
            job.enqueue()
            resent += 1
    others = [
        (File.objects.filter(status=File.Status.UPLOADED), tasks.validate_file),
        (Evaluation.objects.filter(status=Evaluation.Status.QUEUED), tasks.run_evaluation),
        (Adapter.objects.filter(merged_status=Adapter.MergedStatus.QUEUED), tasks.merge_adapter),
    ]
    for waiting, send in others:
        for object_id in waiting.filter(created_at__lt=cutoff).values_list("id", flat=True):
            if object_id not in held:
                send(object_id)
                resent += 1
    if resent:
        logger.warning("re-sent %d hints the broker had lost", resent)
    return resent
