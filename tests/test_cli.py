"""The ``loft`` command-line client, run in-process against a real server on the test database.

The CLI is a client: these tests prove it sends what the API expects, renders what the server
answers and exits with the right status. Jobs are driven by writing their rows, not by training.
"""

import argparse
import http.server
import io
import json
import shutil
import subprocess
import sys
import threading
import time
import zipfile

import pytest
from django.db import connection
from loft_cli import main as cli

from engine.artifacts import build_manifest
from jobs.models import Adapter, BaseModel, FineTuneJob, JobEvent
from loft import storage
from tests.helpers import PROJECT_DIR

# private_queue: no worker of the run trains the jobs these tests create and drive by hand.
pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("private_queue")]

MODEL = ["--model", "HuggingFaceTB/SmolLM2-135M-Instruct"]
CHAT_LINE = json.dumps(
    {
        "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
        ]
    }
)


@pytest.fixture
def as_tenant_a(monkeypatch, live_server, tenant_a):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    monkeypatch.setenv("LOFT_API_KEY", tenant_a.secret)
    monkeypatch.setenv("LOFT_BASE_URL", f"{live_server.url}/v1")
    BaseModel.seed_bundled()
    return tenant_a


@pytest.fixture
def dataset(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join([CHAT_LINE] * 4) + "\n")
    return path


@pytest.fixture
def preference_dataset(tmp_path):
    """OpenAI's preference rows: a prompt, the answer to prefer and one not to."""
    path = tmp_path / "pairs.jsonl"
    pairs = [
        {
            "input": {"messages": [{"role": "user", "content": f"What is {i} + {i}?"}]},
            "preferred_output": [{"role": "assistant", "content": str(2 * i)}],
            "non_preferred_output": [{"role": "assistant", "content": f"Maybe {2 * i + 1}."}],
        }
        for i in range(8)
    ]
    path.write_text("".join(json.dumps(pair) + "\n" for pair in pairs))
    return path


def run(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys, *argv):
    code, out, err = run(capsys, "--json", *argv)
    assert code == 0, err
    return json.loads(out)


def uploaded_file_id(capsys, path) -> str:
    return run_json(capsys, "files", "upload", str(path))["id"]


# --- configuration and failures --------------------------------------------------------


def test_it_says_in_one_sentence_that_the_key_is_missing(monkeypatch, capsys):
    monkeypatch.delenv("LOFT_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)

    code, out, err = run(capsys, "files", "list")

    assert code == 2 and out == ""
    assert (
        err.strip() == "loft: no API key: set LOFT_API_KEY (or OPENAI_API_KEY), or pass --api-key."
    )


def test_it_names_the_url_it_cannot_reach(monkeypatch, capsys):
    monkeypatch.setenv("LOFT_API_KEY", "sk-loft-anything")
    monkeypatch.setenv("LOFT_BASE_URL", "http://127.0.0.1:9/v1")  # the discard port: closed

    code, _, err = run(capsys, "jobs", "list")

    assert code == 1
    assert err.startswith("loft: cannot reach Loft at http://127.0.0.1:9/v1: ")
    assert "Traceback" not in err


def test_it_refuses_a_base_url_that_is_not_http(monkeypatch, capsys):
    monkeypatch.setenv("LOFT_API_KEY", "sk-loft-anything")

    code, _, err = run(capsys, "--base-url", "file:///etc/passwd", "files", "list")

    assert code == 2 and "must start with http:// or https://" in err


def test_a_wrong_key_gets_the_servers_message(as_tenant_a, capsys):
    code, _, err = run(capsys, "files", "list", "--api-key", "sk-loft-wrong")

    assert code == 1
    assert err.startswith("loft: ") and "API key" in err


# --- files -------------------------------------------------------------------------------


def test_it_uploads_a_dataset_and_lists_it(as_tenant_a, capsys, dataset):
    code, out, err = run(capsys, "files", "upload", str(dataset))

    assert code == 0, err
    assert "Uploaded train.jsonl as file-" in out and "(processed)" in out
    assert "4 rows" in out and "format chat" in out
    file_id = out.split(" as ")[1].split()[0]

    code, out, _ = run(capsys, "files", "list")
    assert code == 0
    header, row = out.splitlines()
    assert header.split()[:4] == ["ID", "FILENAME", "PURPOSE", "STATUS"]
    assert row.split()[:4] == [file_id, "train.jsonl", "fine-tune", "processed"]

    listing = run_json(capsys, "files", "list")
    assert listing["object"] == "list" and [f["id"] for f in listing["data"]] == [file_id]
    assert run_json(capsys, "files", "get", file_id)["rows"] == 4


def test_a_malformed_file_is_refused_with_its_line_numbers(as_tenant_a, capsys, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [\nnot json\n{"messages": []}\n')

    code, out, err = run(capsys, "files", "upload", str(bad))

    assert code == 1 and out == ""
    assert err.startswith("loft: ") and "(param: file, code: no_valid_rows)" in err
    assert "line 1: not valid JSON" in err and 'line 3: "messages" is empty' in err
    assert "Traceback" not in err


def test_the_multipart_body_is_read_from_disk_in_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(cli, "CHUNK_BYTES", 1000)
    path = tmp_path / 'we"ird.jsonl'
    path.write_bytes(b"x" * 4500)

    body = cli.MultipartBody({"purpose": "fine-tune"}, "file", path)
    chunks = list(body)

    assert sum(len(chunk) for chunk in chunks) == body.length
    assert [len(chunk) for chunk in chunks[1:-1]] == [1000, 1000, 1000, 1000, 500]
    assert b'filename="we%22ird.jsonl"' in chunks[0]
    assert chunks[-1] == f"\r\n--{body.boundary}--\r\n".encode()


# --- jobs --------------------------------------------------------------------------------


def test_a_dry_run_prints_the_plan_and_creates_no_job(as_tenant_a, capsys, dataset):
    file_id = uploaded_file_id(capsys, dataset)

    code, out, err = run(
        capsys,
        "jobs",
        "create",
        *MODEL,
        "--training-file",
        file_id,
        "--hyperparameter",
        "max_steps=3",
        "--dry-run",
    )

    assert code == 0, err
    assert out.startswith("The job fits.")
    assert not FineTuneJob.objects.exists()
    plan = run_json(capsys, "jobs", "create", *MODEL, "--training-file", file_id, "--dry-run")
    assert plan["object"] == "fine_tuning.job.plan" and plan["fits"] is True


def test_it_creates_gets_lists_and_cancels_a_job(as_tenant_a, capsys, dataset):
    code, out, err = run(
        capsys,
        "jobs",
        "create",
        *MODEL,
        "--training-file",
        str(dataset),  # a local path: uploaded first
        "--suffix",
        "cli",
        "--n-epochs",
        "2",
        "--hyperparameter",
        "lora_rank=4",
        "--idempotency-key",
        "cli-test-1",
    )
    assert code == 0, err
    assert "Uploaded " in err and " as file-" in err
    assert out.startswith("Created ftjob-") and "(queued)" in out
    job_id = out.split()[1]
    job = FineTuneJob.objects.get(pk=job_id)
    assert job.org == as_tenant_a.org and job.suffix == "cli"
    assert job.hyperparameters["n_epochs"] == 2 and job.hyperparameters["lora_rank"] == 4

    flags = ["--suffix", "cli", "--n-epochs", "2", "-H", "lora_rank=4"]
    again = run_json(
        capsys,
        "jobs",
        "create",
        *MODEL,
        "--training-file",
        job.training_file_id,
        *flags,
        "--idempotency-key",
        "cli-test-1",
    )
    assert again["id"] == job_id and FineTuneJob.objects.count() == 1

    code, out, _ = run(capsys, "jobs", "get", job_id)
    assert code == 0
    assert f"id                {job_id}" in out and "status            queued" in out

    code, out, _ = run(capsys, "jobs", "list")
    assert code == 0 and out.splitlines()[1].split()[:2] == [job_id, "queued"]

    code, out, _ = run(capsys, "jobs", "cancel", job_id)
    assert code == 0 and out.strip() == f"Cancelled {job_id}."
    assert run_json(capsys, "jobs", "get", job_id)["status"] == "cancelled"


def test_hyperparameters_are_name_value_pairs_read_as_json_when_they_parse():
    args = cli.build_parser().parse_args(
        [
            "jobs",
            "create",
            *MODEL,
            "--training-file",
            "file-x",
            "--n-epochs",
            "auto",
            "--learning-rate-multiplier",
            "0.5",
            "--hyperparameter",
            "lora_rank=8",
            "-H",
            "packing=false",
            "-H",
            "max_seq_length=auto",
            "-H",
            'quantization="nf4"',
            "-H",
            "max_steps=null",
            "-H",
            "parent_adapter=ft:model=with-equals",
            "-H",
            "warmup_ratio=NaN",
        ]
    )

    assert cli._hyperparameters(args) == {
        "n_epochs": "auto",
        "learning_rate_multiplier": 0.5,
        "lora_rank": 8,
        "packing": False,
        "max_seq_length": "auto",
        "quantization": "nf4",
        "max_steps": None,
        "parent_adapter": "ft:model=with-equals",
        "warmup_ratio": "NaN",  # not JSON: the server refuses it by name
    }


@pytest.mark.parametrize("pair", ["lora_rank", "=8", "lora rank=8"])
def test_a_hyperparameter_without_a_name_is_a_usage_error(capsys, pair):
    code, out, err = run(capsys, "jobs", "create", *MODEL, "--training-file", "file-x", "-H", pair)

    assert code == 2 and out == ""
    assert "NAME=VALUE" in err and "Traceback" not in err


def test_a_hyperparameter_given_twice_differently_is_a_usage_error(monkeypatch, capsys):
    monkeypatch.setenv("LOFT_API_KEY", "sk-loft-anything")
    monkeypatch.setenv("LOFT_BASE_URL", "http://127.0.0.1:9/v1")  # never reached

    code, _, err = run(
        capsys,
        "jobs",
        "create",
        *MODEL,
        "--training-file",
        "file-x",
        "--n-epochs",
        "2",
        "-H",
        "n_epochs=3",
    )

    assert code == 2
    assert err.strip() == "loft: hyperparameter n_epochs is given twice: 2 and 3"


def test_hyperparameters_reach_the_server_with_their_json_types(as_tenant_a, capsys, dataset):
    job = run_json(
        capsys,
        "jobs",
        "create",
        *MODEL,
        "--training-file",
        str(dataset),
        "--batch-size",
        "2",
        "-H",
        "lora_rank=8",
        "-H",
        "packing=false",
        "-H",
        "max_seq_length=auto",
        "-H",
        "quantization=none",
    )

    requested = FineTuneJob.objects.get(pk=job["id"]).requested_hyperparameters
    assert requested == {
        "batch_size": 2,
        "lora_rank": 8,
        "packing": False,
        "max_seq_length": "auto",
        "quantization": "none",
    }


@pytest.mark.parametrize("pair", ["lora_rank=many", "lora_rnak=8"])
def test_the_server_names_the_hyperparameter_it_refuses(as_tenant_a, capsys, dataset, pair):
    file_id = uploaded_file_id(capsys, dataset)

    code, out, err = run(
        capsys, "jobs", "create", *MODEL, "--training-file", file_id, "-H", pair, "--dry-run"
    )

    name = pair.split("=")[0]
    assert code == 1 and out == ""
    assert err.startswith("loft: ") and name in err and "Traceback" not in err
    assert not FineTuneJob.objects.exists()


def test_method_dpo_sends_openais_method_object_with_beta(as_tenant_a, capsys, preference_dataset):
    job = run_json(
        capsys,
        "jobs",
        "create",
        *MODEL,
        "--training-file",
        str(preference_dataset),
        "--method",
        "dpo",
        "--beta",
        "0.2",
        "-H",
        "lora_rank=4",
    )

    assert job["method"]["type"] == "dpo"
    assert job["method"]["dpo"]["hyperparameters"]["beta"] == 0.2
    stored = FineTuneJob.objects.get(pk=job["id"])
    assert stored.hyperparameters["objective"] == "dpo"
    assert stored.requested_hyperparameters == {"beta": 0.2, "lora_rank": 4}
    code, out, _ = run(capsys, "jobs", "get", job["id"])
    assert code == 0 and "method            dpo" in out


def test_beta_without_method_dpo_is_refused_by_the_server_in_a_sentence(
    as_tenant_a, capsys, preference_dataset
):
    file_id = uploaded_file_id(capsys, preference_dataset)

    code, out, err = run(
        capsys, "jobs", "create", *MODEL, "--training-file", file_id, "--beta", "0.2", "--dry-run"
    )

    assert code == 1 and out == ""
    assert err.startswith("loft: ") and "beta applies to dpo jobs only" in err
    assert "Traceback" not in err and not FineTuneJob.objects.exists()


def test_another_tenants_job_is_not_found(as_tenant_a, tenant_b, capsys, dataset):
    job_id = run_json(capsys, "jobs", "create", *MODEL, "--training-file", str(dataset))["id"]

    code, out, err = run(capsys, "--api-key", tenant_b.secret, "jobs", "get", job_id)

    assert code == 1 and out == ""
    assert err.startswith("loft: ") and job_id in err and "Traceback" not in err


def _drive(job_id: str, steps: list[dict], end: dict, pause: float) -> None:
    """What a worker would write, step by step, from another thread (and connection)."""
    try:
        job = FineTuneJob.objects.get(pk=job_id)
        FineTuneJob.objects.filter(pk=job_id).update(status="running")
        job.add_event("info", "Attempt 1 started on test-worker.")
        for progress in steps:
            time.sleep(pause)
            FineTuneJob.objects.filter(pk=job_id).update(progress=progress)
            job.add_event("info", f"Step {progress['step']}/{progress['total_steps']}")
        time.sleep(pause)
        if end["status"] == "succeeded":
            job.add_event("info", "Job succeeded.")
            Adapter.objects.create(
                org=job.org, job=job, name="ft:smol:a:cli", base_model=job.base_model
            )
        else:
            job.add_event("error", end["error"]["message"])
        FineTuneJob.objects.filter(pk=job_id).update(**end)
    finally:
        connection.close()


def _progress(step: int) -> dict:
    return {
        "step": step,
        "total_steps": 4,
        "epoch": step / 4,
        "loss": 2.0 / step,
        "learning_rate": 1e-4,
        "tokens_per_second": 123.4,
        "eta_seconds": 4 - step,
        "trained_tokens": 100 * step,
    }


def _follow_while_driving(capsys, job_id: str, end: dict) -> tuple[int, str, str]:
    driver = threading.Thread(target=_drive, args=(job_id, [_progress(1), _progress(2)], end, 0.5))
    driver.start()
    try:
        return run(capsys, "jobs", "follow", job_id, "--interval", "0.2")
    finally:
        driver.join()


def test_follow_shows_events_and_progress_until_the_job_succeeds(as_tenant_a, capsys, dataset):
    job_id = run_json(capsys, "jobs", "create", *MODEL, "--training-file", str(dataset))["id"]

    code, out, err = _follow_while_driving(capsys, job_id, {"status": "succeeded"})

    assert code == 0, err
    lines = out.splitlines()
    messages = [line.split("  ", 1)[1] for line in lines if line[:2].isdigit()]
    assert messages == [
        "Job created and queued.",
        "Attempt 1 started on test-worker.",
        "Step 1/4",
        "Step 2/4",
        "Job succeeded.",
    ]
    assert "[#####...............] step 1/4  loss 2.000  123.4 tok/s  ETA 0:00:03" in lines
    assert "[##########..........] step 2/4  loss 1.000  123.4 tok/s  ETA 0:00:02" in lines
    assert lines[-1] == f"{job_id} succeeded: ft:smol:a:cli"


def test_follow_exits_1_with_the_error_when_the_job_fails(as_tenant_a, capsys, dataset):
    job_id = run_json(capsys, "jobs", "create", *MODEL, "--training-file", str(dataset))["id"]
    error = {"code": "out_of_memory", "message": "The GPU ran out of memory.", "param": None}

    code, out, err = _follow_while_driving(capsys, job_id, {"status": "failed", "error": error})

    assert code == 1
    assert "error: The GPU ran out of memory." in out
    assert err.strip() == f"loft: {job_id} failed: The GPU ran out of memory."
    assert JobEvent.objects.filter(job_id=job_id).count() == 5


def test_ctrl_c_stops_following_but_not_the_job(as_tenant_a, capsys, dataset, monkeypatch):
    job_id = run_json(capsys, "jobs", "create", *MODEL, "--training-file", str(dataset))["id"]

    def interrupt(seconds):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "pause", interrupt)
    code, out, err = run(capsys, "jobs", "follow", job_id)

    assert code == 130
    assert "Job created and queued." in out
    assert f"the job goes on. To stop it: loft jobs cancel {job_id}" in err
    assert FineTuneJob.objects.get(pk=job_id).status == "queued"


def test_the_status_line_is_redrawn_in_place_on_a_terminal():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    screen = Terminal()
    line = cli.StatusLine(screen)
    line.update("[#.] step 1/2")
    line.line("an event")
    line.update("[##] step 2/2")
    line.close()

    assert screen.getvalue() == (
        "\r[#.] step 1/2\r             \ran event\n[#.] step 1/2\r[##] step 2/2\n"
    )


# --- adapters ----------------------------------------------------------------------------


def _stored_adapter(org, tmp_path) -> Adapter:
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text('{"r": 4}')
    (folder / "adapter_model.safetensors").write_bytes(b"\0" * 2048)
    manifest = build_manifest(folder)
    adapter = Adapter(
        org=org,
        name="ft:smol:a:cli",
        base_model=BaseModel.seed_bundled(),
        manifest=manifest,
        size_bytes=manifest["total_bytes"],
    )
    adapter.s3_prefix = f"orgs/{org.id}/adapters/{adapter.id}/"
    storage.upload_folder(folder, adapter.s3_prefix, manifest)
    adapter.save()
    return adapter


def test_an_adapter_is_listed_and_downloaded_with_its_manifest(as_tenant_a, capsys, tmp_path):
    adapter = _stored_adapter(as_tenant_a.org, tmp_path)

    code, out, _ = run(capsys, "adapters", "list")
    assert code == 0
    assert out.splitlines()[1].split()[:2] == [adapter.id, "ft:smol:a:cli"]

    target, unpacked = tmp_path / "out.zip", tmp_path / "unpacked"
    code, out, err = run(
        capsys, "adapters", "download", adapter.id, "-o", str(target), "--extract", str(unpacked)
    )

    assert code == 0, err
    assert f"Saved {target}" in out and "All 2 files match manifest.json." in out
    with zipfile.ZipFile(target) as archive:
        names = {name.rsplit("/", 1)[-1] for name in archive.namelist()}
    assert {"adapter_config.json", "adapter_model.safetensors", "manifest.json"} <= names
    assert any(path.name == "adapter_model.safetensors" for path in unpacked.rglob("*"))


class _Redirecting(http.server.BaseHTTPRequestHandler):
    """Loft answering a download with a redirect to storage, and the storage, in one server."""

    seen: dict = {}  # noqa: RUF012 -- per-test, reset below

    def do_GET(self):
        self.seen[self.path] = self.headers.get("Authorization")
        if self.path.startswith("/v1/"):
            self.send_response(302)
            port = self.server.server_address[1]
            self.send_header("Location", f"http://localhost:{port}/bucket/a.zip?X-Amz-Signature=s")
            self.end_headers()
            return
        archive = io.BytesIO()
        with zipfile.ZipFile(archive, "w") as zipped:
            zipped.writestr("adapter_config.json", "{}")
        self.send_response(200)
        self.send_header("Content-Type", "application/zip")
        self.send_header("Content-Length", str(len(archive.getvalue())))
        self.end_headers()
        self.wfile.write(archive.getvalue())

    def log_message(self, *args):
        pass


def test_a_redirected_download_leaves_the_key_behind(monkeypatch, capsys, tmp_path):
    _Redirecting.seen = {}
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Redirecting)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("LOFT_API_KEY", "sk-loft-secret")
    monkeypatch.setenv("LOFT_BASE_URL", f"http://127.0.0.1:{server.server_address[1]}/v1")
    try:
        code, _, err = run(
            capsys, "adapters", "download", "adapter-x", "-o", str(tmp_path / "a.zip")
        )
    finally:
        server.shutdown()
        server.server_close()

    assert code == 0, err
    assert _Redirecting.seen == {
        "/v1/adapters/adapter-x/download": "Bearer sk-loft-secret",
        "/bucket/a.zip?X-Amz-Signature=s": None,
    }


# --- chat --------------------------------------------------------------------------------


class _Scripted(http.server.BaseHTTPRequestHandler):
    """A stand-in for Loft's chat and alias endpoints: each POST gets the next scripted answer
    (status, content type, body) and is recorded (path, JSON body)."""

    answers: list = []  # noqa: RUF012 -- per-test, set by scripted()
    seen: list = []  # noqa: RUF012

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        self.seen.append((self.path, json.loads(self.rfile.read(length) or b"null")))
        status, content_type, body = self.answers.pop(0)
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def scripted(monkeypatch):
    """Set the answers, get the requests: ``scripted(answer, …)`` returns the list of them."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Scripted)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("LOFT_API_KEY", "sk-loft-anything")
    monkeypatch.setenv("LOFT_BASE_URL", f"http://127.0.0.1:{server.server_address[1]}/v1")

    def script(*answers):
        _Scripted.answers, _Scripted.seen = list(answers), []
        return _Scripted.seen

    yield script
    server.shutdown()
    server.server_close()


def sse(*events) -> tuple[int, str, bytes]:
    lines = [f"data: {json.dumps(event)}\n\n" for event in events]
    return 200, "text/event-stream", ("".join(lines) + "data: [DONE]\n\n").encode()


def chunk(content=None, finish_reason=None, usage=None) -> dict:
    delta = {} if content is None else {"content": content}
    return {
        "object": "chat.completion.chunk",
        "choices": [] if usage else [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
        "usage": usage,
    }


def test_chat_streams_the_answer_and_prints_the_usage_to_stderr(scripted, capsys):
    seen = scripted(
        sse(
            chunk(""),
            chunk("Hello"),
            chunk(", world"),
            chunk(finish_reason="length"),
            chunk(usage={"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}),
        )
    )

    code, out, err = run(
        capsys,
        "chat",
        "support-bot",
        "Say hello",
        "--system",
        "Be brief.",
        "--max-tokens",
        "3",
        "--temperature",
        "0",
        "--seed",
        "7",
    )

    assert code == 0, err
    assert out == "Hello, world\n"
    assert err.startswith("usage: 12 prompt + 3 completion tokens, finish_reason length, ")
    assert seen == [
        (
            "/v1/chat/completions",
            {
                "model": "support-bot",
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Say hello"},
                ],
                "stream": True,
                "stream_options": {"include_usage": True},
                "max_tokens": 3,
                "temperature": 0.0,
                "seed": 7,
            },
        )
    ]


def test_chat_reads_the_message_from_stdin(scripted, capsys, monkeypatch):
    seen = scripted(sse(chunk("Fine."), chunk(finish_reason="stop")))
    monkeypatch.setattr(sys, "stdin", io.StringIO("How are you?\n"))

    code, out, _ = run(capsys, "chat", "ft:smol:a:cli")

    assert code == 0 and out == "Fine.\n"
    assert seen[0][1]["messages"] == [{"role": "user", "content": "How are you?\n"}]
    assert "max_tokens" not in seen[0][1] and "temperature" not in seen[0][1]


def test_chat_without_a_message_is_a_usage_error(scripted, capsys, monkeypatch):
    seen = scripted()
    monkeypatch.setattr(sys, "stdin", io.StringIO("  \n"))

    code, out, err = run(capsys, "chat", "support-bot")

    assert code == 2 and out == "" and seen == []
    assert err.strip() == "loft: no message: give it as an argument or on standard input."


def test_an_error_in_the_stream_ends_the_answer_with_a_sentence(scripted, capsys):
    error = {"message": "The worker ran out of memory.", "type": "server_error", "code": "oom"}
    scripted(sse(chunk("Once upon"), {"error": error}))

    code, out, err = run(capsys, "chat", "support-bot", "A story")

    assert code == 1
    assert out == "Once upon\n"
    assert err.strip() == "loft: The worker ran out of memory. (code: oom)"


def test_chat_names_a_model_loft_does_not_know(as_tenant_a, capsys):
    code, out, err = run(capsys, "chat", "no-such-model", "Hi")

    assert code == 1 and out == ""
    assert err.startswith("loft: ") and "no-such-model" in err and "Traceback" not in err


def test_chat_without_an_inference_worker_says_so_in_a_sentence(as_tenant_a, capsys, settings):
    settings.LOFT_INFERENCE_QUEUE = "nobody-listens"
    settings.LOFT_INFERENCE_TIMEOUT_SECONDS = 2

    code, _, err = run(
        capsys, "chat", "HuggingFaceTB/SmolLM2-135M-Instruct", "Hi", "--max-tokens", "4"
    )

    assert code == 1
    assert err.startswith("loft: ") and "inference" in err.lower() and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


# --- aliases -----------------------------------------------------------------------------


def test_an_alias_is_created_listed_and_deleted(as_tenant_a, capsys, tmp_path):
    adapter = _stored_adapter(as_tenant_a.org, tmp_path)
    rows = tmp_path / "eval.jsonl"
    rows.write_text("\n".join([CHAT_LINE] * 4) + "\n")

    code, out, err = run(
        capsys, "aliases", "create", "support-bot", adapter.id, "--eval-file", str(rows)
    )

    assert code == 0, err
    assert "Uploaded " in err and " as file-" in err
    assert out.strip() == f"Created alias support-bot → {adapter.id}."

    code, out, _ = run(capsys, "aliases", "list")
    assert code == 0
    header, row = out.splitlines()
    assert header.split()[:2] == ["NAME", "ADAPTER"]
    assert row.split()[:3] == ["support-bot", adapter.id, "file-" + row.split()[2][5:]]

    code, out, _ = run(capsys, "aliases", "delete", "support-bot")
    assert code == 0 and out.strip() == "Deleted alias support-bot."
    code, out, _ = run(capsys, "aliases", "list")
    assert code == 0 and out.strip() == "No aliases."

    code, _, err = run(capsys, "aliases", "delete", "support-bot")
    assert code == 1 and err.startswith("loft: ") and "Traceback" not in err


def test_promote_asks_again_while_the_candidate_is_evaluated(scripted, capsys, monkeypatch):
    monkeypatch.setattr(cli, "pause", lambda seconds: None)
    evaluating = {
        "object": "alias.promotion",
        "status": "evaluating",
        "evaluations": ["eval-1"],
        "message": "Evaluating adapter-new against adapter-old on 1 eval file.",
    }
    moved = {"object": "alias", "name": "support-bot", "adapter": "adapter-new"}
    answer = (202, "application/json", json.dumps(evaluating).encode())
    seen = scripted(answer, answer, (200, "application/json", json.dumps(moved).encode()))

    code, out, err = run(capsys, "aliases", "promote", "support-bot", "adapter-new")

    assert code == 0, err
    assert out.strip() == "Moved support-bot to adapter-new."
    assert "Evaluating adapter-new against adapter-old" in err
    assert (
        seen
        == [("/v1/aliases/support-bot/promote", {"adapter": "adapter-new", "force": False})] * 3
    )


def test_promote_without_waiting_says_to_ask_again(scripted, capsys):
    evaluating = {"object": "alias.promotion", "status": "evaluating", "message": "Evaluating."}
    scripted((202, "application/json", json.dumps(evaluating).encode()))

    code, out, _ = run(capsys, "aliases", "promote", "support-bot", "adapter-new", "--no-wait")

    assert code == 0
    assert out.splitlines() == [
        "Evaluating.",
        "Ask again later: loft aliases promote support-bot adapter-new",
    ]


def test_a_refused_promotion_shows_the_evidence_in_a_few_lines(scripted, capsys):
    refused = {
        "error": {
            "message": "The candidate is refused: its ROUGE-L drops on eval.jsonl.",
            "type": "invalid_request_error",
            "param": "adapter",
            "code": "promotion_refused",
        },
        "evidence": {
            "passed": False,
            "reasons": [
                "The candidate is refused: its ROUGE-L drops on eval.jsonl.",
                "The candidate fails 3 of the 100 general probes that the current adapter answers.",
            ],
            "files": [
                {
                    "file": "eval.jsonl",
                    "rows": 50,
                    "metric": "rouge_l",
                    "current": 0.4213,
                    "candidate": 0.3601,
                    "gain": -0.0612,
                    "interval": [-0.1234567, -0.02],
                    "significant": False,
                    "dropped": True,
                }
            ],
            "probes": {
                "count": 100,
                "current_answered": 0.84,
                "candidate_answered": 0.81,
                "lost": 3,
            },
            "limits": {"max_drop": 0.02},
        },
    }
    seen = scripted((409, "application/json", json.dumps(refused).encode()))

    code, out, err = run(capsys, "aliases", "promote", "support-bot", "adapter-new", "--force")

    assert code == 1 and out == ""
    assert err.splitlines() == [
        "loft: The candidate is refused: its ROUGE-L drops on eval.jsonl."
        " (param: adapter, code: promotion_refused)",
        "  The candidate fails 3 of the 100 general probes that the current adapter answers.",
        "  eval.jsonl: rouge_l 0.4213 → 0.3601, gain -0.0612, 95% interval [-0.1235, -0.02],"
        " 50 rows (drops more than allowed)",
        "  probes: the current adapter answers 84%, the candidate 81%; 3 of 100 lost",
    ]
    assert seen[0][1] == {"adapter": "adapter-new", "force": True}


# --- the distribution --------------------------------------------------------------------

# Options of `loft jobs create` that are not hyperparameters.
NOT_HYPERPARAMETERS = {
    "--help",
    "--api-key",
    "--base-url",
    "--json",
    "--model",
    "--training-file",
    "--validation-file",
    "--suffix",
    "--seed",
    "--hyperparameter",
    "--method",
    "--dry-run",
    "--idempotency-key",
    "--follow",
    "--interval",
}


def _parsers(parser: argparse.ArgumentParser):
    """The parser and every subcommand's parser below it."""
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _parsers(sub)


def test_the_cli_names_only_hyperparameters_of_the_schema():
    from engine.hyperparameters import API_NAMES

    creating = [p for p in _parsers(cli.build_parser()) if p.prog.endswith(" jobs create")]
    assert len(creating) == 1
    options = {
        option
        for action in creating[0]._actions
        for option in action.option_strings
        if option.startswith("--")
    }
    named = {option[2:].replace("-", "_") for option in options - NOT_HYPERPARAMETERS}

    assert named, "the common flags (--n-epochs & co.) are gone"
    assert named <= set(API_NAMES), f"not hyperparameters of the schema: {named - set(API_NAMES)}"


@pytest.mark.slow
def test_the_cli_installs_into_a_fresh_venv_without_torch_or_django(tmp_path):
    # A copy: building in place would leave build/ and *.egg-info in the checkout.
    source = tmp_path / "cli"
    shutil.copytree(
        PROJECT_DIR / "cli",
        source,
        ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"),
    )
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=60)
    env = {
        "PATH": f"{venv / 'bin'}:/usr/bin:/bin",
        "HOME": str(tmp_path),
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        "PIP_NO_INPUT": "1",
    }
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet"]
    installed = subprocess.run(
        [*pip, str(source)], env=env, capture_output=True, text=True, timeout=120
    )
    if installed.returncode != 0:  # offline: build with the venv's own setuptools
        installed = subprocess.run(
            [*pip, "--no-build-isolation", str(source)],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert installed.returncode == 0, installed.stderr

    shown = subprocess.run(
        [str(venv / "bin" / "loft"), "--help"], env=env, capture_output=True, text=True, timeout=30
    )
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith("usage: loft") and "jobs" in shown.stdout

    found = subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-c",
            "import importlib.util as u;"
            " print([m for m in ('torch','django','transformers') if u.find_spec(m)])",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        cwd=tmp_path,
    )
    assert found.returncode == 0, found.stderr
    assert found.stdout.strip() == "[]"
