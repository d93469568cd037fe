"""Celery tasks (tasks.py, thin) and the engine modules, which import no Django."""
