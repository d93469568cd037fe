"""The Celery app. Configuration comes from Django settings (``CELERY_*``)."""

import os

from celery import Celery, signals

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "loft.settings")

app = Celery("loft")
app.config_from_object("django.conf:settings", namespace="CELERY")
# worker/tasks.py, imported by name: the worker side connects its own signals there
# (worker/presence.py), so this module imports nothing of it.
app.autodiscover_tasks(["worker"])


@signals.setup_logging.connect
def use_django_logging(**kwargs):
    """Celery keeps its hands off logging: Django's LOGGING (JSON lines) applies to workers
    and beat as it does to the web, since django.setup() has configured it already."""
