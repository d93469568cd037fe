"""The shared cast: two tenants (A and B), an owner of A, a member of B, and their API keys.

Every test runs on the real services the stack plugin started (loft/testing/stack_plugin.py).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from django.conf import settings
from django.core.servers.basehttp import ThreadedWSGIServer
from rest_framework.test import APIClient

from engine.base_models import (
    BUNDLED_BASE_MODEL,
    BaseModelSpec,
    load_base_model,
    load_tokenizer,
)
from loft import storage
from loft.models import ApiKey, Membership, Organization

PROJECT_DIR = Path(__file__).resolve().parent.parent

# The live server's listen backlog (Django's default is 10): tests that open 50 connections at
# once must reach the server, not have the kernel refuse them.
ThreadedWSGIServer.request_queue_size = 128


@pytest.fixture(scope="session", autouse=True)
def bucket(django_db_blocker):
    """The run's bucket on the real object store."""
    storage.ensure_bucket()
    return settings.S3_BUCKET


@dataclass
class Tenant:
    org: Organization
    user: object
    key: ApiKey
    secret: str


def _tenant(django_user_model, slug: str, role: str) -> Tenant:
    org = Organization.objects.create(slug=slug, name=f"Org {slug.upper()}")
    user = django_user_model.objects.create_user(f"{slug}-person", password="pw-for-tests-1")
    org.add_member(user, role=role)
    key, secret = ApiKey.issue(org, name=f"{slug} key", created_by=user)
    return Tenant(org, user, key, secret)


@pytest.fixture
def tenant_a(db, django_user_model) -> Tenant:
    return _tenant(django_user_model, "a", Membership.Role.OWNER)


@pytest.fixture
def tenant_b(db, django_user_model) -> Tenant:
    return _tenant(django_user_model, "b", Membership.Role.MEMBER)


def api_client_for(secret: str | None) -> APIClient:
    client = APIClient()
    if secret is not None:
        client.credentials(HTTP_AUTHORIZATION=f"Bearer {secret}")
    return client


@pytest.fixture
def api_a(tenant_a) -> APIClient:
    return api_client_for(tenant_a.secret)


@pytest.fixture
def api_b(tenant_b) -> APIClient:
    return api_client_for(tenant_b.secret)


def database_url_for_tests() -> str:
    """The URL of the test database pytest-django created, for processes we start."""
    db = settings.DATABASES["default"]
    return f"postgresql://{db['USER']}@{db['HOST']}:{db['PORT']}/{db['NAME']}"


class WorkerProcess:
    """A real Celery worker process on the real broker and the test database.

    It runs in its own process group, so ``kill()`` takes down the whole worker at once, as a
    machine failure would.
    """

    def __init__(
        self, log_dir: Path, name: str = "test-worker", queue: str = "default", **env: str
    ):
        self.name = name
        self.queue = queue
        self.log = log_dir / f"{name}-{time.monotonic_ns()}.log"
        self.env = {**os.environ, "DATABASE_URL": database_url_for_tests(), **env}
        self.process: subprocess.Popen | None = None

    def start(self) -> WorkerProcess:
        with open(self.log, "wb") as out:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "celery",
                    "-A",
                    "loft",
                    "worker",
                    "--pool",
                    "solo",
                    "--loglevel",
                    "INFO",
                    "--hostname",
                    f"{self.name}@%h",
                    "--queues",
                    self.queue,
                    "--without-mingle",
                    "--without-gossip",
                ],
                cwd=PROJECT_DIR,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        # Not a ping: a solo worker that takes a job at once cannot answer pings.
        deadline = time.monotonic() + 120
        while " ready." not in self.log.read_text(errors="replace"):
            if time.monotonic() > deadline or self.process.poll() is not None:
                self.stop()
                raise AssertionError(f"worker {self.name} did not start:\n{self.output()}")
            time.sleep(0.2)
        return self

    def kill(self) -> None:
        """SIGKILL, no goodbye: the way a worker dies when its machine does."""
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


class BeatProcess:
    """A real ``celery beat``: sends the periodic tasks of CELERY_BEAT_SCHEDULE to the broker."""

    def __init__(self, log_dir: Path, **env: str):
        self.log = log_dir / f"beat-{time.monotonic_ns()}.log"
        self.schedule = log_dir / f"beat-schedule-{time.monotonic_ns()}"
        self.env = {**os.environ, "DATABASE_URL": database_url_for_tests(), **env}
        self.process: subprocess.Popen | None = None

    def start(self) -> BeatProcess:
        with open(self.log, "wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "loft", "beat", "--schedule"]
                + [str(self.schedule)],
                cwd=PROJECT_DIR,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


@pytest.fixture
def private_queue(settings):
    """Jobs of this test go to a queue only this test's workers consume (or none)."""
    settings.LOFT_TRAINING_QUEUE = f"private-{time.monotonic_ns()}"
    return settings.LOFT_TRAINING_QUEUE


@pytest.fixture(scope="session")
def celery_worker(django_db_setup, django_db_blocker, tmp_path_factory):
    """One worker for the whole run (tests that kill workers start their own)."""
    worker = WorkerProcess(tmp_path_factory.mktemp("worker")).start()
    try:
        yield worker
    finally:
        worker.stop()


# --- the bundled base model, for engine tests (engine/train.py, engine/evaluate.py) ----------

SMOLLM2 = BaseModelSpec(
    BUNDLED_BASE_MODEL["name"],
    BUNDLED_BASE_MODEL["source"],
    BUNDLED_BASE_MODEL["revision"],
    BUNDLED_BASE_MODEL["context_length"],
)


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
