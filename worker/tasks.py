"""Celery tasks: thin wrappers that take ids, re-read rows and call the engine."""
