"""The worker side: everything that runs inside a Celery worker process (a job, an evaluation,
a merge, serving, upkeep). The web never imports it; it sends tasks by name (jobs/tasks.py)."""
