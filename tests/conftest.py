"""The shared cast: tenant A's owner and one of its members, a member of tenant B, staff (an
operator, in no organization), and their clients; the worker, the base model and the browser.

Builders and helpers are in tests/helpers.py. Every test runs on the real services the stack
plugin started (loft/testing/stack_plugin.py).
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest
from django.conf import settings
from django.core.servers.basehttp import ThreadedWSGIServer
from django.test import Client
from rest_framework.test import APIClient

# Before tests.helpers is imported: its asserts then explain themselves, as the tests' do.
pytest.register_assert_rewrite("tests.helpers")

from engine.base_models import load_base_model, load_tokenizer  # noqa: E402
from jobs.tasks import training_queue  # noqa: E402
from loft import storage  # noqa: E402
from loft.models import Membership  # noqa: E402
from tests.helpers import (  # noqa: E402
    PASSWORD,
    SMOLLM2,
    Tenant,
    WorkerProcess,
    api_client_for,
    make_tenant,
    signed_in,
)

# The live server's listen backlog (Django's default is 10): tests that open 50 connections at
# once must reach the server, not have the kernel refuse them.
ThreadedWSGIServer.request_queue_size = 128


@pytest.fixture(scope="session", autouse=True)
def bucket(django_db_blocker):
    """The run's bucket on the real object store."""
    storage.ensure_bucket()
    return settings.S3_BUCKET


@pytest.fixture
def tenant_a(db) -> Tenant:
    """a-person, the owner of Org A, and the key "a key"."""
    return make_tenant("a", Membership.Role.OWNER)


@pytest.fixture
def member_a(tenant_a) -> Tenant:
    """a-member, a member (not an owner) of tenant A's organization, with a key of its own."""
    return make_tenant("a-member", Membership.Role.MEMBER, org=tenant_a.org, username="a-member")


@pytest.fixture
def tenant_b(db) -> Tenant:
    """b-person, a member of Org B, and the key "b key"."""
    return make_tenant("b", Membership.Role.MEMBER)


@pytest.fixture
def staff(db, django_user_model):
    """An operator: staff and superuser, as ``createsuperuser`` and ``bootstrap`` make them; a
    member of no organization."""
    return django_user_model.objects.create_superuser("staff-person", password=PASSWORD)


@pytest.fixture
def staff_client(staff) -> Client:
    """A browser signed in as ``staff``: the admin, /ops/ and /metrics."""
    return signed_in(staff)


@pytest.fixture
def api_a(tenant_a) -> APIClient:
    return api_client_for(tenant_a.secret)


@pytest.fixture
def api_b(tenant_b) -> APIClient:
    return api_client_for(tenant_b.secret)


@pytest.fixture
def private_queue(settings):
    """Jobs of this test go to a queue only this test's workers consume (or none): the
    training queue of the default worker class under a prefix of the test's own."""
    settings.LOFT_TRAINING_QUEUE = f"private-{time.monotonic_ns()}"
    return training_queue(settings.LOFT_WORKER_CLASS)


@pytest.fixture(scope="session")
def celery_worker(django_db_setup, django_db_blocker, tmp_path_factory):
    """One worker for the whole run (tests that kill workers start their own)."""
    queues = f"default,{training_queue(settings.LOFT_WORKER_CLASS)}"
    worker = WorkerProcess(tmp_path_factory.mktemp("worker"), queue=queues).start()
    try:
        yield worker
    finally:
        worker.stop()


# --- the bundled base model, for engine tests (engine/train.py, engine/evaluate.py) ----------


@pytest.fixture(scope="module")
def cache() -> Path:
    """Where the converted SmolLM2 lives for this run (converted once, on first use)."""
    return settings.LOFT_HOME / "models"


@pytest.fixture(scope="module")
def tokenizer(cache):
    return load_tokenizer(SMOLLM2, cache)


@pytest.fixture(scope="module")
def base(cache):
    """SmolLM2 in full precision on the CPU, one per test module."""
    return load_base_model(SMOLLM2, cache, "none", "cpu")


# --- a real browser: Debian's Chromium driven by Playwright (tests/test_browser.py) ----------

CHROMIUM = Path("/usr/bin/chromium")


def ensure_chromium() -> Path:
    """Debian's Chromium, installed with apt when missing (Playwright downloads no browser)."""
    if not CHROMIUM.exists():
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "install", "-y", "-q", "chromium"], env=env, check=True)
    return CHROMIUM


@pytest.fixture(scope="session")
def chromium():
    from playwright.sync_api import sync_playwright

    executable = ensure_chromium()
    # Playwright's sync API keeps an asyncio loop in this thread; Django then takes every ORM
    # call here for one made from async code. The calls are synchronous; say so.
    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(executable), headless=True, args=["--no-sandbox"]
        )
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def inference_worker(settings, tmp_path, transactional_db):
    """A real inference worker (Celery, the batched engine) on a queue of its own."""
    settings.LOFT_INFERENCE_QUEUE = f"inference-{time.monotonic_ns()}"
    settings.LOFT_INFERENCE_CONCURRENT_PER_ORG = 8
    worker = WorkerProcess(tmp_path, name="inference", queue=settings.LOFT_INFERENCE_QUEUE).start()
    yield worker
    worker.stop()
