"""Generated requests must never get a 5xx: schemathesis against the served OpenAPI schema for
every /v1 operation (valid and invalid values, and every query parameter any operation takes
sent to every other one), and hypothesis against every browser page (ids, queries and form
fields of its own choosing, signed in).

``make test`` runs a short form (``LOFT_FUZZ_EXAMPLES``, 10 examples per operation);
``make fuzz`` the long form (200 unless LOFT_FUZZ_EXAMPLES says otherwise)."""

import json
import os
import subprocess
import sys

import pytest
import requests
from django.urls import NoReverseMatch, reverse
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.hyperparameters import API_NAMES
from jobs.models import BaseModel
from tests.helpers import api_client_for, chat_rows, jsonl, routes, signed_in, upload

EXAMPLES = int(os.environ.get("LOFT_FUZZ_EXAMPLES", "10"))
HTTP_METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}


def with_every_query_parameter(schema: dict) -> dict:
    """The schema with each operation also taking every query parameter any other operation
    declares: parameters a route does not expect, sent in the types another route does."""
    query = {
        parameter["name"]: parameter
        for operations in schema["paths"].values()
        for method, operation in operations.items()
        if method in HTTP_METHODS
        for parameter in operation.get("parameters", [])
        if parameter["in"] == "query"
    }
    for operations in schema["paths"].values():
        for method, operation in operations.items():
            if method not in HTTP_METHODS:
                continue
            parameters = operation.setdefault("parameters", [])
            own = {p["name"] for p in parameters if p["in"] == "query"}
            parameters += [{**p, "required": False} for name, p in query.items() if name not in own]
    return schema


@pytest.mark.slow
@pytest.mark.usefixtures("private_queue")
def test_schemathesis_finds_no_server_error(live_server, transactional_db, tenant_a, tmp_path):
    BaseModel.seed_bundled()
    # Something to find, so that generated ids sometimes meet real objects' routes.
    upload(api_client_for(tenant_a.secret), jsonl(chat_rows(5)))
    schema = requests.get(f"{live_server.url}/v1/openapi.json", timeout=30)
    assert schema.status_code == 200
    path = tmp_path / "openapi.json"
    path.write_text(json.dumps(with_every_query_parameter(schema.json())))

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
            "--mode",
            "all",  # values inside the schema and outside it
            "--max-examples",
            str(EXAMPLES),
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
        timeout=900 + 20 * EXAMPLES,
        cwd=tmp_path,  # schemathesis keeps a cache folder where it runs
    )
    print(run.stdout[-3000:])
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert "No issues found" in run.stdout or "passed" in run.stdout


# --- the browser pages ----------------------------------------------------------------------

# Pages not fuzzed: signing out would end the session the other pages are fuzzed with; /v1 is
# schemathesis's above.
NOT_FUZZED = {"logout"}
PAGES = [(name, params) for name, params in routes() if not name.startswith("api:")]
PAGES = [(name, params) for name, params in PAGES if name not in NOT_FUZZED]
# Every form field and query parameter a page reads, and a few it does not.
FIELDS = [
    *API_NAMES,
    *("file", "model", "parent", "preset", "action", "suffix", "name", "username", "role"),
    *("email", "prompt", "system", "max_tokens", "temperature", "after", "limit", "purpose"),
    *("next", "org", "token", "scope", "anything"),
]
text = st.text(max_size=40)
values = st.one_of(text, st.integers(-(2**40), 2**40).map(str), st.sampled_from(["", "auto"]))


@pytest.mark.django_db
@settings(
    max_examples=4 * EXAMPLES,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    page=st.sampled_from(PAGES),
    ids=st.lists(text, min_size=4, max_size=4),
    method=st.sampled_from(["get", "post"]),
    form=st.dictionaries(st.sampled_from(FIELDS), values, max_size=6),
)
def test_pages_never_answer_a_server_error(tenant_a, page, ids, method, form):
    name, params = page
    try:
        url = reverse(name, kwargs={param: ids[i] or "x" for i, param in enumerate(params)})
    except NoReverseMatch:  # an id the route's converter refuses is no request at all
        return
    # The test client raises what the view raised, so a 500 fails here with its traceback.
    response = getattr(signed_in(tenant_a), method)(url, form)
    assert response.status_code < 500, (method, url, form, response.status_code)
