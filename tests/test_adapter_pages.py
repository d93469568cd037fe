"""The Adapters pages: list and detail with the evaluation headline, downloads, merged weights
on request; another tenant's adapter is not found."""

import io
import json
import zipfile

import pytest

from engine import artifacts
from jobs.models import Adapter, Evaluation
from loft import storage
from tests.helpers import random_adapter, signed_in, stored_adapter, wait_for


def adapter_of(tenant, tmp_path, name: str = "demo") -> Adapter:
    """tests/helpers.py's stored adapter (a fake folder), several per test."""
    (tmp_path / name).mkdir()
    return stored_adapter(tenant, tmp_path / name, name=name)


def unzipped(response) -> zipfile.ZipFile:
    assert response.status_code == 200 and response["Content-Type"] == "application/zip"
    return zipfile.ZipFile(io.BytesIO(b"".join(response.streaming_content)))


def evaluated(adapter: Adapter, base: dict, scores: dict, better: bool) -> Evaluation:
    verdict = {"better": better, "worse_on": [] if better else ["loss"]}
    adapter.metrics = {"verdict": verdict}
    adapter.save()
    return Evaluation.objects.create(
        org=adapter.org,
        adapter=adapter,
        base_model=adapter.base_model,
        results={"base": base, "adapter": scores},
        verdict=verdict,
    )


@pytest.mark.django_db
def test_an_empty_list_invites_training_one(tenant_a):
    html = signed_in(tenant_a).get("/adapters").content.decode()
    assert 'No adapters yet — <a href="/train/new">train one</a>.' in html


@pytest.mark.django_db
def test_the_list_and_detail_show_the_headline_and_flag_a_worse_adapter(tenant_a, tmp_path):
    good = adapter_of(tenant_a, tmp_path, "good")
    worse = adapter_of(tenant_a, tmp_path, "worse")
    evaluation = evaluated(good, {"exact_match": 0.0}, {"exact_match": 0.9}, better=True)
    evaluated(worse, {"exact_match": 0, "rouge_l": 0.5}, {"exact_match": 0, "rouge_l": 0.25}, False)
    browser = signed_in(tenant_a)

    html = browser.get("/adapters").content.decode()
    assert html.index(worse.name) < html.index(good.name)  # newest first
    assert "exact match 0% → 90%" in html and "ROUGE-L 50% → 25%" in html
    assert html.count("Worse than its base") == 1
    assert (
        f'href="/adapters/{good.id}"' in html and f'href="/v1/adapters/{good.id}/download"' in html
    )
    assert f'href="/adapters/{good.id}/playground"' in html and "293.0\xa0KB" in html

    html = browser.get(f"/adapters/{good.id}").content.decode()
    assert "exact match 0% → 90%" in html and f'href="/evaluations/{evaluation.id}"' in html
    assert "adapter_model.safetensors" in html and "Prepare merged weights" in html
    assert 'http-equiv="refresh"' not in html


@pytest.mark.django_db
def test_a_browser_session_downloads_the_zip_with_its_manifest(tenant_a, tmp_path):
    adapter = stored_adapter(tenant_a, tmp_path)
    archive = unzipped(signed_in(tenant_a).get(f"/v1/adapters/{adapter.id}/download"))
    assert json.loads(archive.read("manifest.json")) == adapter.manifest


@pytest.mark.django_db
def test_another_tenants_adapter_is_not_found(tenant_a, tenant_b, tmp_path):
    adapter = stored_adapter(tenant_a, tmp_path)
    outsider = signed_in(tenant_b)
    assert adapter.name not in outsider.get("/adapters").content.decode()
    for url in ("", "/merged.zip", "/playground"):
        assert outsider.get(f"/adapters/{adapter.id}{url}").status_code == 404
    assert outsider.get(f"/v1/adapters/{adapter.id}/download").status_code == 404
    assert outsider.post(f"/adapters/{adapter.id}/merge").status_code == 404
    assert Adapter.objects.get(pk=adapter.pk).merged_status == "none"


@pytest.mark.django_db
def test_asking_twice_for_merged_weights_queues_them_once(
    tenant_a, tmp_path, django_capture_on_commit_callbacks
):
    adapter = stored_adapter(tenant_a, tmp_path)
    browser = signed_in(tenant_a)
    with django_capture_on_commit_callbacks() as queued:
        first = browser.post(f"/adapters/{adapter.id}/merge", follow=True)
        again = browser.post(f"/adapters/{adapter.id}/merge", follow=True)
    assert len(queued) == 1
    assert "this page refreshes itself" in first.content.decode()
    assert "Merged weights are already queued." in again.content.decode()
    assert 'http-equiv="refresh" content="5"' in again.content.decode()
    assert browser.get(f"/adapters/{adapter.id}/merged.zip").status_code == 404  # not ready


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_merged_weights_are_made_by_a_worker_and_download_as_a_zip(
    tenant_a, celery_worker, cache, tmp_path
):
    adapter = adapter_of(tenant_a, tmp_path)
    random_adapter(cache, tmp_path / "real")
    adapter.manifest = artifacts.build_manifest(tmp_path / "real")
    storage.upload_folder(tmp_path / "real", adapter.s3_prefix, adapter.manifest)
    adapter.save()
    browser = signed_in(tenant_a)

    browser.post(f"/adapters/{adapter.id}/merge")
    adapter = wait_for(
        adapter,
        lambda a: a.merged_status in ("ready", "failed"),
        timeout=300,
        interval=1,
        what="merged weights",
        explain=lambda a: (a.merged_status, a.merged_error, celery_worker.output()),
    )
    assert adapter.merged_status == "ready", (adapter.merged_error, celery_worker.output())

    assert "Download merged .zip" in browser.get(f"/adapters/{adapter.id}").content.decode()
    archive = unzipped(browser.get(f"/adapters/{adapter.id}/merged.zip"))
    manifest = json.loads(archive.read("manifest.json"))
    assert {"model.safetensors", "config.json"} <= set(manifest["files"])
    assert manifest == adapter.merged_manifest
