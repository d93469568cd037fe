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
    # A training worker's class (engine/plan.py WorkerClass, as a dict) and its name; empty for
    # the other workers (inference, webhooks).
    class_name = models.CharField(max_length=63, blank=True, db_index=True)
    class_spec = models.JSONField(null=True, blank=True)

    class Meta:
        ordering = ["hostname"]

    def __str__(self) -> str:
        return self.hostname

    @classmethod
    def online(cls):
        # Three missed beats and it is counted as gone.
        cutoff = timezone.now() - timedelta(seconds=3 * settings.LOFT_WORKER_HEARTBEAT_SECONDS)
        return cls.objects.filter(last_seen__gte=cutoff, stopped_at__isnull=True)

    @classmethod
    def classes_seen(cls) -> list[dict]:
        """The classes training workers published lately (LOFT_WORKER_CLASS_MEMORY_SECONDS),
        each as its most recent worker described it."""
        cutoff = timezone.now() - timedelta(seconds=settings.LOFT_WORKER_CLASS_MEMORY_SECONDS)
        latest: dict[str, dict] = {}
        recent = cls.objects.filter(last_seen__gte=cutoff).exclude(class_name="")
        for name, spec in recent.order_by("last_seen").values_list("class_name", "class_spec"):
            latest[name] = spec
        return list(latest.values())

    @classmethod
    def online_by_class(cls) -> dict[str, int]:
        """Training workers online, by class name."""
        counts = cls.online().exclude(class_name="").order_by().values("class_name")
        return {row["class_name"]: row["n"] for row in counts.annotate(n=models.Count("pk"))}
