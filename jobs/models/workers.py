"""Worker processes as the web sees them: their last heartbeat."""

from __future__ import annotations

from datetime import timedelta

from django.conf import settings
from django.db import models
from django.utils import timezone


class WorkerHeartbeat(models.Model):
    """A worker process's last report of itself (worker/presence.py), written every few seconds
    while it runs: what the ops dashboard and ``loft_workers_online`` count as online."""

    hostname = models.CharField(primary_key=True, max_length=200, help_text="Celery's node name.")
    pid = models.PositiveIntegerField()
    queues = models.JSONField(default=list)
    device = models.CharField(max_length=200, help_text="GPU name, or cpu.")
    memory_used_bytes = models.BigIntegerField(
        default=0, help_text="GPU memory in use, or the worker's resident memory on a CPU."
    )
    memory_total_bytes = models.BigIntegerField(default=0)
    current_job = models.CharField(max_length=40, blank=True)
    started_at = models.DateTimeField()
    last_seen = models.DateTimeField(db_index=True)
    stopped_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["hostname"]

    def __str__(self) -> str:
        return self.hostname

    @classmethod
    def online(cls):
        # Three missed beats and it is counted as gone.
        cutoff = timezone.now() - timedelta(seconds=3 * settings.LOFT_WORKER_HEARTBEAT_SECONDS)
        return cls.objects.filter(last_seen__gte=cutoff, stopped_at__isnull=True)
