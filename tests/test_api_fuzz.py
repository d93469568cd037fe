"""schemathesis against the served OpenAPI schema: generated requests to every /v1 operation,
valid and not, must never get a 5xx. The same run is `make fuzz` against a running stack."""

import json
import subprocess
import sys

import pytest
import requests

from jobs.models import BaseModel
from tests.helpers import api_client_for, chat_rows, jsonl, upload

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("private_queue")]


def test_schemathesis_finds_no_server_error(live_server, transactional_db, tenant_a, tmp_path):
    BaseModel.seed_bundled()
    # Something to find, so that generated ids sometimes meet real objects' routes.
    upload(api_client_for(tenant_a.secret), jsonl(chat_rows(5)))
    schema = requests.get(f"{live_server.url}/v1/openapi.json", timeout=30)
    assert schema.status_code == 200
    path = tmp_path / "openapi.json"
    path.write_text(json.dumps(schema.json()))

    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "schemathesis.cli",
            "run",
            str(path),
            "--url",
            live_server.url,
            "--header",
            f"Authorization: Bearer {tenant_a.secret}",
            "--checks",
            "not_a_server_error",
            "--phases",
            "examples,coverage,fuzzing",
            "--max-examples",
            "15",
            "--workers",
            "1",
            "--request-timeout",
            "60",
            "--seed",
            "1",
            "--suppress-health-check",
            "all",
        ],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=tmp_path,  # schemathesis keeps a cache folder where it runs
    )
    print(run.stdout[-3000:])
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert "No issues found" in run.stdout or "passed" in run.stdout
