"""The structure holds: layers by process (import-linter contracts in pyproject.toml), a web
process that never loads a model library, and every hyperparameter declared once."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
from django.conf import settings

from engine.hyperparameters import API_NAMES, TrainConfig
from tests.helpers import PROJECT_DIR

MODEL_LIBRARIES = ("torch", "transformers", "peft", "bitsandbytes")


def test_the_import_contracts_hold():
    result = subprocess.run(
        [str(Path(sys.executable).parent / "lint-imports"), "--no-cache"],
        cwd=PROJECT_DIR,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


# What the fresh interpreter runs: the WSGI application, then an upload validated inside its
# request and a few pages, all in this one process.
WEB_PROCESS = """
import json, sys
from loft.wsgi import application
from django.contrib.auth import get_user_model
from django.test import Client

secret, username = sys.argv[1], sys.argv[2]
api = Client(HTTP_HOST="localhost", HTTP_AUTHORIZATION=f"Bearer {secret}")
rows = b"".join(
    json.dumps({"messages": [{"role": "user", "content": f"Q{i}"},
                             {"role": "assistant", "content": "A"}]}).encode() + b"\\n"
    for i in range(20)
)
from django.core.files.uploadedfile import SimpleUploadedFile
upload = api.post("/v1/files", {"purpose": "fine-tune",
                                "file": SimpleUploadedFile("rows.jsonl", rows)})
browser = Client(HTTP_HOST="localhost")
browser.force_login(get_user_model().objects.get(username=username))
pages = {path: browser.get(path).status_code
         for path in ("/", "/datasets", "/jobs", "/adapters", "/train/new", "/account/usage")}
print(json.dumps({
    "upload": upload.status_code,
    "file": upload.json(),
    "pages": pages,
    "loaded": [m for m in MODEL_LIBRARIES if m in sys.modules],
    "worker_side": sorted(m for m in sys.modules if m == "worker" or m.startswith("worker.")),
}))
""".replace("MODEL_LIBRARIES", repr(MODEL_LIBRARIES))


@pytest.mark.django_db(transaction=True)
def test_a_fresh_web_process_serves_an_upload_and_pages_without_any_model_library(tenant_a):
    database = settings.DATABASES["default"]
    env = {
        **os.environ,
        # The test database, which this test's rows are committed to.
        "DATABASE_URL": f"postgresql://{database['USER']}@{database['HOST']}:{database['PORT']}/"
        f"{database['NAME']}",
    }
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", WEB_PROCESS, tenant_a.secret,
         tenant_a.user.username],
        cwd=PROJECT_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    served = json.loads(result.stdout.strip().splitlines()[-1])
    assert served["upload"] == 200, served["file"]
    assert served["file"]["status"] == "processed" and served["file"]["rows"] == 20
    assert served["file"]["tokens"] > 20 * 10
    assert set(served["pages"].values()) == {200}, served["pages"]
    assert served["loaded"] == []
    assert served["worker_side"] == []
    imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines() if "|" in line}
    assert not {m for m in imported if m.split(".")[0] in MODEL_LIBRARIES}


# --- every hyperparameter declared once --------------------------------------------------------

SERVER_PACKAGES = ("loft", "jobs", "worker", "engine")
SCHEMA = "engine/hyperparameters.py"
# Where a hyperparameter may be named besides its schema: the training loop (engine/train.py, and
# worker/training.py, which runs it for a job) and the planner.
USES = {"engine/train.py", "engine/plan.py", "worker/training.py"}
# The two settings the wizard gives controls of their own (a checkbox, the method's buttons).
WIZARD = {"jobs/views/wizard.py", "templates/jobs/wizard_model.html"}
OWN_CONTROLS = {
    "packing": WIZARD,
    "quantization": WIZARD | {"templates/jobs/wizard_review.html"},
}
# Names that are also peft's own (LoraConfig's fields), read from a saved adapter's config where
# the batching engine decides whether adapters can share a batch.
PEFTS_OWN = {"use_dora": {"engine/batching.py"}}
# Names that are also ordinary words elsewhere (an evaluation's batches of generations, the
# plan's epochs, a run's steps, the 4-bit loading of a base, a host's count of GPUs, the plan's
# record of the class a job was routed to): for these the check is that no surface that reads or
# shows hyperparameters (the API, the pages, pre-flight) spells them out.
COMMON_WORDS = {
    "batch_size",
    "max_steps",
    "n_epochs",
    "max_seq_length",
    "quantization",
    "gpus",
    "worker_class",
}
SURFACES = ("jobs/api/", "jobs/views/", "jobs/preflight.py")
# Not hyperparameters of the object but words of OpenAI's API: the job's top-level ``seed`` and
# its ``method`` object.
API_WORDS = {"seed", "method"}


def server_modules() -> dict[str, str]:
    found = {}
    for package in SERVER_PACKAGES:
        for path in (PROJECT_DIR / package).rglob("*.py"):
            if "migrations" not in path.parts:
                found[str(path.relative_to(PROJECT_DIR))] = path.read_text()
    for path in (PROJECT_DIR / "templates").rglob("*.html"):
        found[str(path.relative_to(PROJECT_DIR))] = path.read_text()
    return found


def test_each_hyperparameter_is_declared_once_and_named_only_where_it_is_used():
    modules = server_modules()
    names = set(API_NAMES) | {f.name for f in fields(TrainConfig)}
    for name in sorted(names - API_WORDS):
        pattern = re.compile(rf"\b{name}\b")
        naming = {path for path, text in modules.items() if pattern.search(text)}
        assert SCHEMA in naming, name
        naming -= OWN_CONTROLS.get(name, set()) | PEFTS_OWN.get(name, set())
        if name in COMMON_WORDS:
            assert not {p for p in naming if p.startswith(SURFACES)}, name
            continue
        assert naming - {SCHEMA} <= USES, (name, naming)
        assert len(naming) <= 3, (name, naming)


def test_the_schema_describes_every_api_hyperparameter_for_every_surface():
    from jobs.api.serializers import HyperparametersSerializer
    from jobs.views.wizard import FIELDS, PRESETS

    assert set(HyperparametersSerializer().fields) == {*API_NAMES, "parent_adapter"}
    assert all(field.label and field.help for field in FIELDS)
    for preset in PRESETS.values():
        assert set(preset["values"]) == set(API_NAMES)
