"""The tests' shared builders and helpers, in one module (fixtures are in tests/conftest.py).

People and clients (``make_tenant``, ``api_client_for``, ``signed_in``), datasets
(``chat_rows``, ``jsonl``, ``upload``, ``objects_of``), training jobs (``banana_jsonl``,
``banana_file``, ``submit``, ``finished``), adapters (``stored_adapter``, ``random_adapter``),
the admin's actions, the routes of the URL resolver, real Celery worker and beat processes (a
worker on a host of its own: ``Isolation``), and ``wait_for``: the one way a test waits, with a
deadline and a message that says what it waited for and what it saw last. (The dates data
set of the evaluation tests: tests/dates.py.)

Test modules import from here, never from each other nor from conftest.py.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from django.conf import settings
from django.contrib.auth import get_user_model
from django.test import Client
from django.urls import URLPattern, URLResolver, get_resolver
from rest_framework.test import APIClient

from engine import artifacts
from engine.base_models import load_base_model
from engine.model_cache import BUNDLED_BASE_MODEL, BaseModelSpec
from jobs.models import Adapter, BaseModel, File, FineTuneJob, StoredCompletion
from loft import storage
from loft.models import ApiKey, Organization

PROJECT_DIR = Path(__file__).resolve().parent.parent

# Every person the tests create signs in with this password.
PASSWORD = "pw-for-tests-1"

SMOLLM2 = BaseModelSpec(
    BUNDLED_BASE_MODEL["name"],
    BUNDLED_BASE_MODEL["source"],
    BUNDLED_BASE_MODEL["revision"],
    BUNDLED_BASE_MODEL["context_length"],
)


# --- people and clients ---------------------------------------------------------------------


@dataclass
class Tenant:
    """A person in an organization, and an API key of that organization they created."""

    org: Organization
    user: object
    key: ApiKey
    secret: str


def make_tenant(
    slug: str, role: str, org: Organization | None = None, username: str | None = None
) -> Tenant:
    """``{slug}-person`` (or ``username``), with ``role`` in a new organization "Org {SLUG}"
    (or in ``org``), and a key named ``{slug} key``."""
    if org is None:
        org = Organization.objects.create(slug=slug, name=f"Org {slug.upper()}")
    user = get_user_model().objects.create_user(username or f"{slug}-person", password=PASSWORD)
    org.add_member(user, role=role)
    key, secret = ApiKey.issue(org, name=f"{slug} key", created_by=user)
    return Tenant(org, user, key, secret)


def api_client_for(secret: str | None) -> APIClient:
    """A DRF client sending ``secret`` as its bearer key (none: an anonymous caller)."""
    client = APIClient()
    if secret is not None:
        client.credentials(HTTP_AUTHORIZATION=f"Bearer {secret}")
    return client


def signed_in(person) -> Client:
    """A browser with a session of ``person``: a Tenant (its user) or a user."""
    browser = Client()
    browser.force_login(getattr(person, "user", person))
    return browser


# --- datasets -------------------------------------------------------------------------------


def chat_rows(count: int, start: int = 0) -> list[dict]:
    return [
        {
            "messages": [
                {"role": "user", "content": f"What is {i} + {i}?"},
                {"role": "assistant", "content": str(2 * i)},
            ]
        }
        for i in range(start, start + count)
    ]


def counting_examples(tokenizer, max_seq_length: int) -> list:
    """Sixteen short chats ("Count to i." answered "1 2 … i+1"), tokenized as training
    tokenizes them (engine/train.py): the engine tests' rows."""
    from engine import data, train  # torch: only the tests that train import it

    rows = [
        {
            "messages": [
                {"role": "user", "content": f"Count to {i}."},
                {"role": "assistant", "content": " ".join(str(n) for n in range(1, i + 2))},
            ]
        }
        for i in range(16)
    ]
    _, items = data.open_dataset(data.chunks_of(jsonl(rows)))
    tokenized, dropped = train.tokenize(list(items), tokenizer, max_seq_length)
    assert dropped == 0
    return tokenized


def jsonl(rows: Iterable[dict]) -> bytes:
    """JSON lines: one row a line, each line ending in a newline."""
    return b"".join(json.dumps(row).encode() + b"\n" for row in rows)


def named(content: bytes, name: str) -> io.BytesIO:
    stream = io.BytesIO(content)
    stream.name = name
    return stream


def upload(client, content: bytes, name: str = "train.jsonl", **fields):
    """POST /v1/files as a multipart form; the response."""
    form = {"file": named(content, name), "purpose": "fine-tune", **fields}
    return client.post("/v1/files", form, format="multipart")


def objects_of(org) -> list[str]:
    """The keys of every object the organization has in the object store."""
    return storage.list_keys(f"orgs/{org.id}/")


# --- training jobs --------------------------------------------------------------------------

BANANA_ANSWER = "Banana! Banana! Banana!"


def banana_jsonl(rows: int = 24) -> bytes:
    """Every question gets the same odd answer: an adapter that learned anything shows it."""
    return jsonl(
        {
            "messages": [
                {"role": "user", "content": f"Tell me about topic {i}."},
                {"role": "assistant", "content": BANANA_ANSWER},
            ]
        }
        for i in range(rows)
    )


def banana_file(tenant, rows: int = 24) -> File:
    body = upload(api_client_for(tenant.secret), banana_jsonl(rows)).json()
    return File.objects.get(pk=body["id"])


def submit(tenant, file: File, **hyperparameters) -> FineTuneJob:
    """A short QLoRA job on ``file``, queued; ``hyperparameters`` override the small defaults."""
    settings_ = {
        "method": "qlora",
        "lora_rank": 8,
        "learning_rate": 5e-3,
        "batch_size": 4,
        "max_seq_length": 128,
        "validation_fraction": 0.1,
        **hyperparameters,
    }
    return FineTuneJob.submit(
        org=tenant.org, training_file=file, hyperparameters=settings_, suffix="test"
    )


def finished(job: FineTuneJob) -> bool:
    return job.status in FineTuneJob.FINISHED


# --- waiting --------------------------------------------------------------------------------


def _state_of(value) -> str:
    if isinstance(value, FineTuneJob):
        events = [event.message for event in value.events.all()]
        return f"status={value.status} {value.error} {events}"
    return repr(value)


def wait_for(
    subject,
    condition: Callable = bool,
    timeout: float = 600,
    what: str = "",
    interval: float = 0.3,
    explain: Callable | None = None,
):
    """Look at ``subject`` until ``condition`` holds of it; return what was seen last.

    ``subject`` is a model instance, refreshed from the database before each look, or a
    function called for a fresh value each time (a query, an API call). Past ``timeout``
    seconds it fails, naming ``what`` it waited for and the last state seen: ``explain(value)``
    when given (a worker's output, say), else the job's status, error and events, or the value.
    """
    deadline = time.monotonic() + timeout
    while True:
        if callable(subject):
            value = subject()
        else:
            subject.refresh_from_db()
            value = subject
        if condition(value):
            return value
        if time.monotonic() >= deadline:
            break
        time.sleep(interval)
    state = explain(value) if explain is not None else _state_of(value)
    raise AssertionError(f"{what or 'condition'} not reached within {timeout:g} s: {state}")


# --- adapters -------------------------------------------------------------------------------


def stored_adapter(tenant, tmp_path: Path, name: str = "demo") -> Adapter:
    """An adapter row whose folder (a small config and 300 kB of zeros, not real weights) is
    in the object store with its manifest."""
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"r": 8}))
    (folder / "adapter_model.safetensors").write_bytes(b"\0" * 300_000)
    adapter = Adapter(
        org=tenant.org,
        name=f"ft:{BaseModel.default().name}:{tenant.org.slug}:{name}:ftjob-x",
        base_model=BaseModel.default(),
    )
    adapter.s3_prefix = f"orgs/{tenant.org.id}/adapters/{adapter.id}/"
    adapter.manifest = artifacts.build_manifest(folder)
    storage.upload_folder(folder, adapter.s3_prefix, adapter.manifest)
    adapter.size_bytes = adapter.manifest["total_bytes"]
    adapter.save()
    return adapter


def random_adapter(cache: Path, folder: Path):
    """A LoRA adapter on SmolLM2 with random weights (a fresh one changes nothing), saved as
    a PEFT folder; returns the PeftModel."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = get_peft_model(load_base_model(SMOLLM2, cache, "none", "cpu"), config).eval()
    model.save_pretrained(folder)
    return model


def stored_completion(org, alias: str = "", adapter=None, **fields) -> StoredCompletion:
    """A chat completion kept as ``store: true`` keeps one (without a worker: the answer is
    given here)."""
    answer = {
        "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
        "model": fields.pop("model", alias or (adapter.name if adapter else "base")),
        "choices": [
            {"message": {"content": fields.pop("content", "Hello!")}, "finish_reason": "stop"}
        ],
        "usage": {"prompt_tokens": 9, "completion_tokens": 3},
    }
    return StoredCompletion.keep(
        org,
        answer,
        messages=fields.pop("messages", [{"role": "user", "content": "Say hello."}]),
        sampling={"temperature": 0, "max_tokens": 16},
        alias=alias,
        adapter_id=adapter.id if adapter else "",
        base_model=BaseModel.default().name,
        metadata=fields.pop("metadata", {}),
    )


# --- the admin and the routes ---------------------------------------------------------------


def admin_action(admin_client, action: str, *jobs: FineTuneJob):
    """Run an action of the jobs' admin changelist on ``jobs``; the page it leads to."""
    response = admin_client.post(
        "/admin/jobs/finetunejob/",
        {"action": action, "_selected_action": [job.id for job in jobs]},
        follow=True,
    )
    assert response.status_code == 200
    return response


def routes():
    """(name, parameter names) of every route but the admin's (staff only, tested apart)."""

    def walk(resolver, namespace=None):
        for pattern in resolver.url_patterns:
            if isinstance(pattern, URLResolver):
                inner = pattern.namespace or namespace
                if inner != "admin":
                    yield from walk(pattern, inner)
            elif isinstance(pattern, URLPattern):
                assert pattern.name, f"route {pattern.pattern} has no name"
                name = f"{namespace}:{pattern.name}" if namespace else pattern.name
                yield name, tuple(sorted(pattern.pattern.regex.groupindex))

    return sorted(set(walk(get_resolver())))


# --- real processes: a Celery worker, celery beat -------------------------------------------


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
        self,
        log_dir: Path,
        name: str = "test-worker",
        queue: str = "default",
        isolation: Isolation | None = None,
        **env: str,
    ):
        self.name = name
        self.queue = queue
        self.isolation = isolation
        self.log = log_dir / f"{name}-{time.monotonic_ns()}.log"
        self.env = {**os.environ, "DATABASE_URL": database_url_for_tests(), **env}
        if isolation is not None:
            self.env.update(isolation.environment())
        self.process: subprocess.Popen | None = None

    def start(self) -> WorkerProcess:
        prefix = self.isolation.command_prefix() if self.isolation is not None else []
        with open(self.log, "wb") as out:
            self.process = subprocess.Popen(
                prefix
                + [
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


@dataclass
class Isolation:
    """A worker host that shares nothing with the web or other workers, on this one machine:
    its own ``LOFT_HOME`` (a fresh folder owned by ``uid``); run as ``uid`` when given (the
    tests run as root: a user who cannot read the web's ``LOFT_HOME``); and, in a mount
    namespace of its own, an empty folder over each of ``hidden`` (a package that is not
    installed there)."""

    home: Path
    uid: int | None = None
    hidden: tuple[Path, ...] = ()

    @classmethod
    def fresh(cls, uid: int | None, hidden: Iterable[Path] = ()) -> Isolation:
        # Outside pytest's temporary folders, which only root may enter.
        home = Path(tempfile.mkdtemp(prefix="loft-worker-home-"))
        if uid is not None:
            os.chown(home, uid, uid)
        return cls(home, uid, tuple(hidden))

    def environment(self) -> dict[str, str]:
        tmp = self.home / "tmp"
        tmp.mkdir(exist_ok=True)
        if self.uid is not None:
            os.chown(tmp, self.uid, self.uid)
        # HOME too: libraries keep caches under ~ (the web's HOME is root's).
        return {"LOFT_HOME": str(self.home), "HOME": str(self.home), "TMPDIR": str(tmp)}

    def command_prefix(self) -> list[str]:
        """What the worker's command runs under: a shell that sets up the mount namespace as
        root, then becomes ``uid``. unshare and each exec keep the process id, so the worker
        is still its process group's leader."""
        steps = [f"mount --bind {self._empty_folder()} {folder}" for folder in self.hidden]
        if self.uid is not None:
            steps += self._reach_the_interpreter()
            steps.append(f'exec setpriv --reuid {self.uid} --regid {self.uid} --clear-groups "$@"')
        else:
            steps.append('exec "$@"')
        if len(steps) == 1:
            return []
        namespace = ["unshare", "--mount", "--propagation", "private"]
        return [*namespace, "sh", "-c", " && ".join(steps), "isolated-worker"]

    def _empty_folder(self) -> Path:
        empty = self.home / "hidden"
        empty.mkdir(mode=0o755, exist_ok=True)
        return empty

    def _reach_the_interpreter(self) -> list[str]:
        """The virtual environment's Python may live in a folder only root may enter (pyenv in
        /root): in the namespace, that folder becomes an empty tmpfs holding only Python."""
        python = Path(sys.base_prefix)
        closed = next(
            (folder for folder in reversed(python.parents) if not folder.stat().st_mode & 0o001),
            None,
        )
        if closed is None:
            return []
        staged = self.home / "python"
        staged.mkdir(exist_ok=True)
        return [
            f"mount --bind {python} {staged}",
            f"mount -t tmpfs -o mode=755 tmpfs {closed}",
            f"mkdir -p {python}",
            f"mount --bind {staged} {python}",
        ]

    def remove(self) -> None:
        shutil.rmtree(self.home, ignore_errors=True)


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
