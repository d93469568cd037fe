"""Loft's platform package: settings, URLs, Celery app, tenancy, auth, storage, health.

It is ``loft`` and not ``platform`` because a top-level ``platform`` package would hide the
standard library module that uuid, Django and PyTorch import.
"""

from loft.celery import app as celery_app

__all__ = ["celery_app"]
