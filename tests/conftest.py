"""The shared cast: two tenants (A and B), an owner of A, a member of B, and their API keys.

Every test runs on the real services the stack plugin started (loft/testing/stack_plugin.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from django.conf import settings
from rest_framework.test import APIClient

from loft import storage
from loft.celery import app as celery_app
from loft.models import ApiKey, Membership, Organization

PROJECT_DIR = Path(__file__).resolve().parent.parent


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


def wait_for_workers(count: int = 1, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(celery_app.control.ping(timeout=0.5) or []) >= count:
            return
    raise AssertionError(f"no Celery worker answered within {timeout}s")


@pytest.fixture(scope="session")
def celery_worker(django_db_setup, django_db_blocker, tmp_path_factory):
    """A real Celery worker process on the real broker, using the test database."""
    log = tmp_path_factory.mktemp("worker") / "worker.log"
    env = {**os.environ, "DATABASE_URL": database_url_for_tests()}
    with open(log, "wb") as out:
        process = subprocess.Popen(
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
                "test-worker@%h",
                "--queues",
                "default",
            ],
            cwd=PROJECT_DIR,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for_workers()
        yield process
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
