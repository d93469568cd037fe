"""The Celery app. Configuration comes from Django settings (``CELERY_*``)."""

import os

from celery import Celery, signals

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "loft.settings")

app = Celery("loft")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks(["worker"])


@signals.setup_logging.connect
def use_django_logging(**kwargs):
    """Celery keeps its hands off logging: Django's LOGGING (JSON lines) applies to workers
    and beat as it does to the web, since django.setup() has configured it already."""


@signals.worker_ready.connect
def start_reporting_presence(sender, **kwargs):
    from worker import presence

    queues = sorted(sender.app.amqp.queues.consume_from or [])
    presence.start_presence(sender.hostname, queues)


@signals.worker_shutdown.connect
def stop_reporting_presence(**kwargs):
    from worker import presence

    presence.stop_presence()
