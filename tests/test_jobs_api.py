"""/v1/fine_tuning/jobs, /v1/adapters, /v1/usage: OpenAI's shapes, pre-flight, quotas under
concurrency, idempotent creates, mass assignment, tenant walls. No worker consumes these jobs
(``private_queue``); the training itself is tested in test_training_jobs.py and the openai
client flow in test_openai_flow.py."""

import io
import json
import threading
import zipfile
from datetime import timedelta

import pytest
import requests
from django.utils import timezone

from jobs.api.serializers import JobSerializer
from jobs.models import Adapter, BaseModel, Evaluation, File, FineTuneJob, Quota, UsageRecord
from loft import storage
from tests.helpers import api_client_for, chat_rows, jsonl, stored_adapter, upload

pytestmark = pytest.mark.usefixtures("private_queue")


def training_file(tenant, rows: int = 30) -> str:
    response = upload(api_client_for(tenant.secret), jsonl(chat_rows(rows)))
    assert response.status_code == 200, response.json()
    return response.json()["id"]


def create(client, file_id: str, **body):
    payload = {"model": BaseModel.default().name, "training_file": file_id, **body}
    return client.post("/v1/fine_tuning/jobs", payload, format="json")


@pytest.mark.django_db
def test_a_job_is_created_with_auto_resolved_settings_and_read_back_in_openais_shape(
    api_a, tenant_a
):
    file_id = training_file(tenant_a)
    response = create(
        api_a,
        file_id,
        hyperparameters={"n_epochs": "auto", "lora_rank": 8, "quantization": "nf4"},
        suffix="demo",
        seed=7,
        metadata={"team": "search"},
    )
    assert response.status_code == 200, response.json()
    job = response.json()
    assert job["id"].startswith("ftjob-") and job["object"] == "fine_tuning.job"
    assert job["status"] == "queued" and job["fine_tuned_model"] is None
    assert job["training_file"] == file_id and job["seed"] == 7
    assert job["metadata"] == {"team": "search"} and job["error"] is None
    # 27 training rows (3 held out): OpenAI's rule gives 100 // 27 = 3 epochs; batch 1.
    hyper = job["hyperparameters"]
    assert hyper["n_epochs"] == 3 and hyper["batch_size"] == 1
    assert hyper["lora_rank"] == 8 and hyper["learning_rate_multiplier"] == 1.0
    assert hyper["max_seq_length"] == 128 and hyper["quantization"] == "nf4"
    assert job["method"]["supervised"]["hyperparameters"] == hyper
    assert job["plan"]["steps"] == 81 and job["plan"]["fits"] is True
    assert job["estimated_finish"] > job["created_at"]

    assert api_a.get(f"/v1/fine_tuning/jobs/{job['id']}").json()["id"] == job["id"]
    listed = api_a.get("/v1/fine_tuning/jobs").json()
    assert [j["id"] for j in listed["data"]] == [job["id"]] and listed["has_more"] is False
    events = api_a.get(f"/v1/fine_tuning/jobs/{job['id']}/events").json()["data"]
    assert events[0]["object"] == "fine_tuning.job.event"
    assert events[0]["message"] == "Job created and queued."


@pytest.mark.django_db
def test_openais_method_form_and_the_hyperparameters_form_mean_the_same(api_a, tenant_a):
    file_id = training_file(tenant_a)
    settings_ = {"n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 0.5, "lora_rank": 4}
    plain = create(api_a, file_id, hyperparameters=settings_).json()
    method = create(
        api_a,
        file_id,
        method={"type": "supervised", "supervised": {"hyperparameters": settings_}},
    ).json()
    assert plain["hyperparameters"] == method["hyperparameters"]
    assert plain["hyperparameters"]["learning_rate_multiplier"] == 0.5
    assert FineTuneJob.objects.get(pk=plain["id"]).hyperparameters["learning_rate"] == 1e-4

    both = create(api_a, file_id, hyperparameters=settings_, method={"type": "supervised"})
    assert both.status_code == 400 and both.json()["error"]["param"] == "hyperparameters"
    # DPO reads pairs of answers: a chat file has none (tests/test_dpo_jobs.py has the rest).
    dpo = create(api_a, file_id, method={"type": "dpo"})
    assert dpo.status_code == 400 and dpo.json()["error"]["param"] == "training_file"
    assert "needs a preference file" in dpo.json()["error"]["message"]
    other = create(api_a, file_id, method={"type": "reinforcement"})
    assert other.status_code == 400 and "'supervised' or 'dpo'" in other.json()["error"]["message"]


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("hyperparameters", "words"),
    [
        ({"lora_rank": 0}, "lora_rank must be between 1 and 256"),
        ({"n_epochs": "three"}, "n_epochs must be an integer"),
        ({"quantization": "int3"}, "quantization must be auto, nf4 or none"),
        ({"learning_rate": 1.0}, "Unknown hyperparameter 'learning_rate'"),
        ({"packing": "yes"}, "packing must be true or false"),
    ],
)
def test_bad_hyperparameters_are_refused_by_name_and_nothing_is_created(
    api_a, tenant_a, hyperparameters, words
):
    response = create(api_a, training_file(tenant_a), hyperparameters=hyperparameters)
    assert response.status_code == 400
    error = response.json()["error"]
    assert words in error["message"] and error["param"] == "hyperparameters"
    assert not FineTuneJob.objects.exists()


@pytest.mark.django_db
def test_the_plan_chooses_lora_when_the_base_fits_the_worker_and_qlora_when_it_does_not(
    api_a, tenant_a, settings
):
    file_id = training_file(tenant_a)
    job = create(api_a, file_id).json()  # quantization left to the plan
    assert job["hyperparameters"]["quantization"] == "none"
    assert job["plan"]["quantization"] == "none"
    assert job["plan"]["method_reason"].startswith("LoRA on the full-precision base")
    assert "room to spare" in job["plan"]["method_reason"]
    assert FineTuneJob.objects.get(pk=job["id"]).method == "lora"

    # A worker class with less memory: the full-precision base would fit, but crowd it
    # (2.2 GiB of 2.5; the 4-bit base needs 1.8).
    settings.LOFT_WORKER_MEMORY_BYTES = int(2.5 * 2**30)
    small = create(api_a, file_id, hyperparameters={"quantization": "auto"}).json()
    assert small["hyperparameters"]["quantization"] == "nf4"
    assert small["plan"]["method_reason"].startswith("QLoRA on a 4-bit base")
    assert FineTuneJob.objects.get(pk=small["id"]).method == "qlora"

    # Either can still be forced; the plan says it was asked for.
    forced = create(api_a, file_id, dry_run=True, hyperparameters={"quantization": "none"})
    assert forced.json()["quantization"] == "none"
    assert "not the plan's choice" in forced.json()["method_reason"]
    settings.LOFT_WORKER_MEMORY_BYTES = 12 * 2**30
    forced = create(api_a, file_id, dry_run=True, hyperparameters={"quantization": "nf4"})
    assert "not the plan's choice" in forced.json()["method_reason"]


@pytest.mark.django_db
def test_a_job_continuing_an_adapter_keeps_its_base_precision_unless_told(
    api_a, tenant_a, tmp_path
):
    file_id = training_file(tenant_a)
    parent = stored_adapter(tenant_a, tmp_path)
    parent.manifest["base"] = {"quantization": "nf4"}  # a QLoRA adapter
    parent.save()
    child = create(api_a, file_id, model=parent.name).json()
    assert child["hyperparameters"]["quantization"] == "nf4"
    assert "kept from the parent adapter" in child["plan"]["method_reason"]
    told = create(api_a, file_id, model=parent.name, hyperparameters={"quantization": "none"})
    assert told.json()["hyperparameters"]["quantization"] == "none"


@pytest.mark.django_db
def test_dry_run_returns_the_plan_and_refuses_a_job_that_would_not_fit(api_a, tenant_a):
    file_id = training_file(tenant_a)
    plan = create(api_a, file_id, dry_run=True, hyperparameters={"batch_size": 4}).json()
    assert plan["object"] == "fine_tuning.job.plan" and plan["fits"] is True
    assert plan["steps"] == 7 * 3 and plan["n_epochs"] == 3  # 27 rows, batch 4, auto epochs
    assert plan["trained_tokens"] > 0 and plan["estimated_seconds"] > 0
    assert 0 < plan["estimated_peak_memory_bytes"] < plan["worker_memory_bytes"]
    assert set(plan["memory_breakdown"]) >= {"weights", "activations", "logits", "total"}

    # No packing: a batch of 1,024 padded rows goes through the model at once, every layer's
    # activations kept. (With gradient checkpointing it fits: the chunked loss never holds
    # every position's logits.)
    too_big = {
        "batch_size": 1024,
        "packing": False,
        "quantization": "none",
        "gradient_checkpointing": False,
    }
    for dry_run in (True, False):
        refused = create(api_a, file_id, dry_run=dry_run, hyperparameters=too_big)
        assert refused.status_code == 400
        error = refused.json()["error"]
        assert error["code"] == "job_too_large"
        assert "GiB at its peak" in error["message"] and "packing to true" in error["message"]
        details = refused.json()["details"]["plan"]
        assert details["estimated_peak_memory_bytes"] > details["worker_memory_bytes"]
    assert not FineTuneJob.objects.exists()


@pytest.mark.django_db
def test_clients_cannot_set_server_owned_fields(api_a, tenant_a, tenant_b):
    file_id = training_file(tenant_a)
    for field, value in [
        ("status", "succeeded"),
        ("organization_id", tenant_b.org.id),
        ("org", tenant_b.org.id),
        ("trained_tokens", 10**9),
        ("fine_tuned_model", "ft:x"),
        ("id", "ftjob-mine"),
        ("s3_prefix", "orgs/other/"),
        ("attempt", 99),
    ]:
        response = create(api_a, file_id, **{field: value})
        assert response.status_code == 400, field
        assert response.json()["error"]["param"] == field
        assert "Unknown parameter" in response.json()["error"]["message"]
    assert not FineTuneJob.objects.exists()

    job = create(api_a, file_id).json()
    for method in ("put", "patch"):
        response = getattr(api_a, method)(
            f"/v1/fine_tuning/jobs/{job['id']}", {"status": "succeeded"}, format="json"
        )
        assert response.status_code == 405
    assert FineTuneJob.objects.get(pk=job["id"]).status == "queued"

    # Upload form fields that name server-owned values change nothing.
    stored = upload(
        api_a, jsonl(chat_rows(2)), status="error", bytes="1", org=tenant_b.org.id, sha256="0"
    ).json()
    file = File.objects.get(pk=stored["id"])
    assert (file.status, file.org_id, file.bytes) == ("processed", tenant_a.org.id, stored["bytes"])
    assert file.bytes > 1 and len(file.sha256) == 64


@pytest.mark.django_db
def test_another_tenants_jobs_files_and_adapters_are_not_found(api_a, api_b, tenant_a):
    file_id = training_file(tenant_a)
    job = create(api_a, file_id).json()
    for path in (
        f"/v1/fine_tuning/jobs/{job['id']}",
        f"/v1/fine_tuning/jobs/{job['id']}/events",
        f"/v1/fine_tuning/jobs/{job['id']}/checkpoints",
    ):
        assert api_b.get(path).status_code == 404, path
    assert api_b.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel").status_code == 404
    assert api_b.get("/v1/fine_tuning/jobs").json()["data"] == []
    # B naming A's file as training data reads like a file that does not exist.
    refused = create(api_b, file_id)
    assert refused.status_code == 400
    assert refused.json()["error"]["message"] == f"No such File object: {file_id}"
    assert FineTuneJob.objects.get(pk=job["id"]).status == "queued"


def post_in_parallel(url: str, secret: str, bodies: list[dict], headers=None) -> list:
    """All requests released at once from their own threads, as many clients would."""
    results: list = [None] * len(bodies)
    start = threading.Barrier(len(bodies))

    def send(index: int):
        with requests.Session() as client:
            start.wait()
            results[index] = client.post(
                url,
                json=bodies[index],
                headers={"Authorization": f"Bearer {secret}", **(headers or {})},
                timeout=60,
            )

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(bodies))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def test_fifty_parallel_creates_against_a_quota_of_five_accept_exactly_five(
    live_server, transactional_db, tenant_a
):
    Quota.objects.create(org=tenant_a.org, max_concurrent_jobs=5)
    file_id = training_file(tenant_a)
    body = {"model": BaseModel.default().name, "training_file": file_id}
    url = f"{live_server.url}/v1/fine_tuning/jobs"
    responses = post_in_parallel(url, tenant_a.secret, [body] * 50)

    codes = sorted(r.status_code for r in responses)
    assert codes == [200] * 5 + [429] * 45
    refusal = next(r for r in responses if r.status_code == 429).json()["error"]
    assert refusal["code"] == "quota_exceeded" and refusal["param"] == "concurrent_jobs"
    assert "concurrent_jobs" in refusal["message"] and "5 of 5" in refusal["message"]
    assert FineTuneJob.objects.for_org(tenant_a.org).count() == 5

    # A finished job frees its place.
    FineTuneJob.objects.for_org(tenant_a.org).first().request_cancel()
    assert requests.post(url, json=body, headers={"Authorization": f"Bearer {tenant_a.secret}"}).ok


def test_a_retried_create_with_the_same_idempotency_key_returns_the_same_job(
    live_server, transactional_db, tenant_a
):
    file_id = training_file(tenant_a)
    body = {"model": BaseModel.default().name, "training_file": file_id, "suffix": "once"}
    url = f"{live_server.url}/v1/fine_tuning/jobs"
    responses = post_in_parallel(
        url, tenant_a.secret, [body] * 8, headers={"Idempotency-Key": "retry-1"}
    )
    assert {r.status_code for r in responses} == {200}
    assert len({r.json()["id"] for r in responses}) == 1
    assert sum(r.headers.get("Idempotent-Replayed") == "true" for r in responses) == 7
    assert FineTuneJob.objects.count() == 1

    changed = requests.post(
        url,
        json={**body, "suffix": "other"},
        headers={"Authorization": f"Bearer {tenant_a.secret}", "Idempotency-Key": "retry-1"},
    )
    assert changed.status_code == 409
    assert changed.json()["error"]["code"] == "idempotency_key_reused"
    fresh = requests.post(
        url,
        json=body,
        headers={"Authorization": f"Bearer {tenant_a.secret}", "Idempotency-Key": "retry-2"},
    )
    assert fresh.status_code == 200 and FineTuneJob.objects.count() == 2


@pytest.mark.django_db
def test_cancel_ends_a_queued_job_at_once_and_refuses_a_finished_one(api_a, tenant_a):
    job = create(api_a, training_file(tenant_a)).json()
    cancelled = api_a.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel").json()
    assert cancelled["status"] == "cancelled" and cancelled["finished_at"] is not None
    again = api_a.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel")
    assert again.status_code == 400 and again.json()["error"]["code"] == "job_finished"


@pytest.mark.django_db
def test_a_file_in_use_by_an_unfinished_job_cannot_be_deleted(api_a, tenant_a):
    file_id = training_file(tenant_a)
    job = create(api_a, file_id).json()
    refused = api_a.delete(f"/v1/files/{file_id}")
    assert refused.status_code == 409 and job["id"] in refused.json()["error"]["message"]
    api_a.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel")
    assert api_a.delete(f"/v1/files/{file_id}").json()["deleted"] is True
    # The finished job still names its file, as OpenAI's jobs do.
    assert api_a.get(f"/v1/fine_tuning/jobs/{job['id']}").json()["training_file"] == file_id
    assert create(api_a, file_id).status_code == 400


@pytest.mark.django_db
def test_a_job_on_a_file_still_validating_waits_then_queues_with_auto_settings(
    api_a, tenant_a, settings
):
    from worker.tasks import validate_file

    settings.LOFT_INLINE_VALIDATION_MAX_BYTES = 100  # every upload validates in the background
    file_id = upload(api_a, jsonl(chat_rows(30))).json()["id"]
    assert File.objects.get(pk=file_id).status == "uploaded"
    job = create(api_a, file_id, hyperparameters={"n_epochs": "auto", "batch_size": 2}).json()
    assert job["status"] == "validating_files" and job["plan"] == {}
    assert job["hyperparameters"]["n_epochs"] == "auto"
    assert job["hyperparameters"]["batch_size"] == 2
    refused = create(api_a, file_id, dry_run=True)
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "file_not_ready"

    validate_file(file_id)  # the task's body, as the worker runs it

    job = api_a.get(f"/v1/fine_tuning/jobs/{job['id']}").json()
    assert job["status"] == "queued" and job["hyperparameters"]["n_epochs"] == 3
    assert job["plan"]["fits"] is True


@pytest.mark.django_db
def test_storage_and_monthly_token_quotas_refuse_with_429_and_keep_nothing(api_a, tenant_a):
    file_id = training_file(tenant_a)
    used = File.objects.get(pk=file_id).bytes
    quota = Quota.objects.create(org=tenant_a.org, max_storage_bytes=used + 100)
    before = storage.list_keys(f"orgs/{tenant_a.org.id}/")
    refused = upload(api_a, jsonl(chat_rows(30)))
    assert refused.status_code == 429
    assert refused.json()["error"]["param"] == "storage_bytes"
    assert File.objects.count() == 1 and storage.list_keys(f"orgs/{tenant_a.org.id}/") == before

    # Unfinished jobs reserve the tokens of their plan: a second job would pass the limit.
    quota.max_storage_bytes = None
    first = create(api_a, file_id, hyperparameters={"n_epochs": 1}).json()
    quota.max_monthly_trained_tokens = first["plan"]["trained_tokens"] * 3 // 2
    quota.save()
    refused = create(api_a, file_id, hyperparameters={"n_epochs": 1})
    assert refused.status_code == 429
    assert refused.json()["error"]["param"] == "monthly_trained_tokens"
    UsageRecord.objects.create(org=tenant_a.org, trained_tokens=10**9)
    api_a.post(f"/v1/fine_tuning/jobs/{first['id']}/cancel")
    assert create(api_a, file_id).status_code == 429  # the month's ledger counts too

    # 0 allows nothing: an operator can freeze a tenant.
    quota.max_monthly_trained_tokens, quota.max_concurrent_jobs = None, 0
    quota.save()
    assert create(api_a, file_id).json()["error"]["param"] == "concurrent_jobs"


@pytest.mark.django_db
def test_usage_reports_what_finished_jobs_used_per_month_and_per_job(api_a, tenant_a):
    job = FineTuneJob.objects.get(pk=create(api_a, training_file(tenant_a)).json()["id"])
    attempt = job.claim("test-worker")
    assert job.finish(attempt, "succeeded", "Done.", trained_tokens=1234, compute_seconds=56.7)
    usage = api_a.get("/v1/usage").json()
    assert usage["object"] == "usage"
    assert usage["totals"]["trained_tokens"] == 1234
    assert usage["totals"]["compute_seconds"] == 56.7
    assert usage["totals"]["storage_bytes"] == File.objects.get().bytes
    assert usage["months"][0]["trained_tokens"] == 1234 and usage["months"][0]["jobs"] == 1
    assert usage["jobs"] == [
        {
            "job": job.id,
            "trained_tokens": 1234,
            "compute_seconds": 56.7,
            "recorded_at": usage["jobs"][0]["recorded_at"],
        }
    ]
    assert usage["limits"]["concurrent_jobs"] == 4
    assert api_a.get("/v1/usage?month=2020-01").json()["jobs"] == []
    assert api_a.get("/v1/usage?month=soon").status_code == 400


@pytest.mark.django_db
def test_adapters_are_listed_as_models_and_download_as_a_zip_with_the_manifest(
    api_a, api_b, tenant_a, tmp_path
):
    adapter = stored_adapter(tenant_a, tmp_path)
    listed = api_a.get("/v1/adapters").json()["data"]
    assert [a["id"] for a in listed] == [adapter.id]
    assert listed[0]["name"] == adapter.name and listed[0]["object"] == "adapter"
    models = [m["id"] for m in api_a.get("/v1/models").json()["data"]]
    assert models == [BaseModel.default().name, adapter.name]
    assert api_a.get(f"/v1/models/{adapter.name}").json()["root"] == BaseModel.default().name

    response = api_a.get(f"/v1/adapters/{adapter.id}/download")
    assert response.status_code == 200 and response["Content-Type"] == "application/zip"
    archive = zipfile.ZipFile(io.BytesIO(b"".join(response.streaming_content)))
    assert sorted(archive.namelist()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "manifest.json",
    ]
    assert archive.read("adapter_model.safetensors") == b"\0" * 300_000
    assert json.loads(archive.read("manifest.json")) == adapter.manifest

    assert api_b.get(f"/v1/adapters/{adapter.id}").status_code == 404
    assert api_b.get(f"/v1/adapters/{adapter.id}/download").status_code == 404
    assert api_b.get("/v1/adapters").json()["data"] == []
    assert [m["id"] for m in api_b.get("/v1/models").json()["data"]] == [BaseModel.default().name]
    assert api_b.get(f"/v1/models/{adapter.name}").status_code == 404


@pytest.mark.django_db
def test_a_job_can_continue_from_one_of_the_tenants_adapters(api_a, api_b, tenant_a, tmp_path):
    adapter = stored_adapter(tenant_a, tmp_path)
    file_id = training_file(tenant_a)
    by_name = create(api_a, file_id, model=adapter.name).json()
    assert by_name["parent_adapter"] == adapter.id and by_name["model"] == adapter.base_model.name
    by_id = create(api_a, file_id, hyperparameters={"parent_adapter": adapter.id}).json()
    assert by_id["parent_adapter"] == adapter.id
    other = api_b.post(
        "/v1/fine_tuning/jobs",
        {"model": adapter.name, "training_file": file_id},
        format="json",
    )
    assert other.status_code == 400 and other.json()["error"]["code"] == "model_not_found"


@pytest.mark.django_db
def test_a_job_waiting_for_validation_is_failed_when_its_plan_passes_the_token_quota(
    api_a, tenant_a, settings
):
    from worker.tasks import validate_file

    settings.LOFT_INLINE_VALIDATION_MAX_BYTES = 100
    Quota.objects.create(org=tenant_a.org, max_monthly_trained_tokens=10)
    file_id = upload(api_a, jsonl(chat_rows(30))).json()["id"]
    job = create(api_a, file_id).json()
    assert job["status"] == "validating_files"
    validate_file(file_id)
    job = api_a.get(f"/v1/fine_tuning/jobs/{job['id']}").json()
    assert job["status"] == "failed" and job["error"]["code"] == "quota_exceeded"
    assert job["error"]["param"] == "monthly_trained_tokens"


@pytest.mark.django_db
def test_a_parent_adapter_survives_background_validation(api_a, tenant_a, settings, tmp_path):
    from worker.tasks import validate_file

    adapter = stored_adapter(tenant_a, tmp_path)
    settings.LOFT_INLINE_VALIDATION_MAX_BYTES = 100
    file_id = upload(api_a, jsonl(chat_rows(30))).json()["id"]
    job = create(api_a, file_id, hyperparameters={"parent_adapter": adapter.id}).json()
    validate_file(file_id)
    job = api_a.get(f"/v1/fine_tuning/jobs/{job['id']}").json()
    assert job["status"] == "queued" and job["parent_adapter"] == adapter.id, job["error"]


@pytest.mark.django_db
@pytest.mark.parametrize(
    "body",
    [
        {"method": {"type": "supervised", "supervised": "x"}},
        {"method": ["supervised"]},
        {"hyperparameters": {"learning_rate_multiplier": 10**400}},
        {"hyperparameters": {"lora_dropout": 10**400}},
        {"hyperparameters": {"lora_alpha": 10**400}},
        {"hyperparameters": {"max_steps": 10**30}},
        {"hyperparameters": []},
        {"hyperparameters": ""},
        {"hyperparameters": {"parent_adapter": "\u0000"}},
        {"hyperparameters": {"parent_adapter": 7}},
        {"metadata": {"\u0000": "x"}},
        {"metadata": {"k": 1}},
        {"suffix": "no spaces please"},
        {"seed": -1},
        {"model": "\u0000"},
        {"training_file": None},
    ],
)
def test_malformed_create_bodies_get_a_400_never_a_500(api_a, tenant_a, body):
    payload = json.dumps(
        {"model": BaseModel.default().name, "training_file": training_file(tenant_a), **body}
    )
    response = api_a.post("/v1/fine_tuning/jobs", payload, content_type="application/json")
    assert response.status_code == 400, response.content
    assert response.json()["error"]["message"]
    assert not FineTuneJob.objects.exists()


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/v1/fine_tuning/jobs/%00", 400),
        ("/v1/fine_tuning/jobs?after=%00", 400),
        ("/v1/fine_tuning/jobs/ftjob-x/events?after=ftevent-%C2%B2", 404),
        ("/v1/usage?month=9999-12", 400),
        ("/v1/models/%00", 400),
        ("/v1/adapters/%00/download", 400),
        ("/v1/fine_tuning/jobs?limit=0", 400),
    ],
)
def test_odd_paths_and_cursors_get_a_4xx_never_a_500(api_a, path, status):
    assert api_a.get(path).status_code == status


@pytest.mark.django_db
def test_every_way_a_job_ends_announces_it_once_and_records_what_it_used(api_a, tenant_a, settings):
    from loft.models import WebhookDelivery, WebhookEndpoint

    settings.LOFT_WEBHOOK_QUEUE = settings.LOFT_TRAINING_QUEUE  # nobody sends them here
    WebhookEndpoint.objects.create(org=tenant_a.org, url="https://hooks.example.com/loft")
    file_id = training_file(tenant_a)
    jobs = [FineTuneJob.objects.get(pk=create(api_a, file_id).json()["id"]) for _ in range(4)]

    jobs[0].request_cancel()  # before it started
    jobs[0].request_cancel()
    attempt = jobs[1].claim("w")
    assert jobs[1].finish(attempt, "succeeded", "Done.", trained_tokens=5)
    assert not jobs[1].finish(attempt, "failed", "Late.")  # fenced: it ended already
    # A running job is cancelled, then its worker dies: the reaper ends it.
    jobs[2].claim("w")
    jobs[2].request_cancel()
    # A running job whose worker died for the last allowed time fails.
    jobs[3].claim("w")
    FineTuneJob.objects.filter(pk__in=[jobs[2].pk, jobs[3].pk]).update(
        heartbeat_at=timezone.now() - timedelta(minutes=5)
    )
    assert sorted(FineTuneJob.reap_stale(lease_seconds=60, max_attempts=1)) == sorted(
        [jobs[2].id, jobs[3].id]
    )
    assert FineTuneJob.reap_stale(lease_seconds=60, max_attempts=1) == []

    statuses = [FineTuneJob.objects.get(pk=job.pk).status for job in jobs]
    assert statuses == ["cancelled", "succeeded", "cancelled", "failed"]
    announced = sorted(WebhookDelivery.objects.values_list("event_type", flat=True))
    assert announced == sorted(f"fine_tuning.job.{status}" for status in statuses)
    # The ledger has a line for each job that ran (the first never did).
    assert sorted(UsageRecord.objects.values_list("job_id", flat=True)) == sorted(
        job.id for job in jobs[1:]
    )


@pytest.mark.django_db
def test_a_job_object_holds_every_declared_member_and_its_latest_evaluation(
    api_a, tenant_a, tmp_path
):
    """JobSerializer writes its object out by hand from a row of columns, for speed; the
    fields it declares document it in the OpenAPI schema. Both must name the same members."""
    created = create(api_a, training_file(tenant_a), suffix="demo", metadata={"k": "v"}).json()
    assert list(created) == JobSerializer.Meta.fields
    assert created["estimated_finish"] > created["created_at"] and created["evaluation"] is None
    assert created["timings"] == {}  # no worker has claimed it yet
    job = FineTuneJob.objects.get(pk=created["id"])
    adapter = stored_adapter(tenant_a, tmp_path)
    Adapter.objects.filter(pk=adapter.pk).update(job=job)
    finished = timezone.now()
    timings = {"attempt": 1, "queue": 0.4, "setup": 1.2, "training": 15.9, "evaluation": 4.1}
    timings |= {"upload": 0.6, "total": 22.2}
    FineTuneJob.objects.filter(pk=job.pk).update(
        status="succeeded", finished_at=finished, timings=timings
    )
    for loss in (2.0, 1.0):
        latest = Evaluation.objects.create(
            org=tenant_a.org,
            job=job,
            base_model=job.base_model,
            results={"base": {"loss": 3.0}, "adapter": {"loss": loss}},
            verdict={"better": True},
        )

    retrieved = api_a.get(f"/v1/fine_tuning/jobs/{job.id}").json()
    assert api_a.get("/v1/fine_tuning/jobs").json()["data"] == [retrieved]
    assert list(retrieved) == JobSerializer.Meta.fields
    assert retrieved["fine_tuned_model"] == adapter.name and retrieved["adapter"] == adapter.id
    assert retrieved["status"] == "succeeded" and retrieved["estimated_finish"] is None
    assert retrieved["finished_at"] == int(finished.timestamp())
    assert retrieved["evaluation"] == json.loads(json.dumps(latest.summary()))
    assert retrieved["evaluation"]["adapter"] == {"loss": 1.0}
    assert retrieved["timings"] == timings
    assert {k: retrieved[k] for k in ("suffix", "metadata", "model")} == {
        "suffix": "demo",
        "metadata": {"k": "v"},
        "model": BaseModel.default().name,
    }
