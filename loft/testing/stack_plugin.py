"""pytest plugin: start the embedded stack once per test run, before Django reads settings.

Loaded with ``-p loft.testing.stack_plugin`` (pyproject.toml). When ``DATABASE_URL``,
``CELERY_BROKER_URL``/``REDIS_URL`` and ``S3_ENDPOINT_URL`` are all set, the suite uses those
services and starts nothing; otherwise it starts what is missing in a temporary ``LOFT_HOME``
that is removed at the end.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from loft.embedded import EmbeddedStack

STACK_KEY = pytest.StashKey[EmbeddedStack]()


@pytest.hookimpl(tryfirst=True)
def pytest_load_initial_conftests(early_config, parser, args):
    # tryfirst: pytest-django's hook of the same name reads the settings right after this.
    home = Path(tempfile.mkdtemp(prefix="loft-test-"))
    os.environ["LOFT_HOME"] = str(home)
    # Every training job in the suite runs the forgetting check; a few probes keep them short.
    os.environ.setdefault("LOFT_EVAL_FORGETTING_PROBES", "8")
    # A worker loads no base model as it starts (tests/test_training_jobs.py turns it on).
    os.environ.setdefault("LOFT_WORKER_PRELOAD", "0")
    stack = EmbeddedStack(home, persistent=False)
    os.environ.update(stack.start())
    early_config.stash[STACK_KEY] = stack


def pytest_unconfigure(config):
    stack = config.stash.get(STACK_KEY, None)
    if stack is not None:
        stack.stop()
        shutil.rmtree(stack.home, ignore_errors=True)


@pytest.fixture(scope="session")
def embedded_stack(pytestconfig) -> EmbeddedStack:
    """The running embedded stack, for tests that stop and restart one of its services."""
    return pytestconfig.stash[STACK_KEY]
