"""The browser, end to end, in headless Chromium against a live server and a real worker: sign
in, run the whole wizard with a small file, watch the job succeed on its page without a reload,
open the evaluation, download the adapter and check it against its manifest; and the error
path, a malformed file's line-numbered errors shown in the wizard.

The screenshots README shows are written here, to docs/screenshots/.
"""

import hashlib
import json
import zipfile

import pytest

from jobs.models import FineTuneJob
from tests.helpers import PASSWORD, PROJECT_DIR, banana_jsonl

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

SCREENSHOTS = PROJECT_DIR / "docs" / "screenshots"


@pytest.fixture
def page(chromium, live_server, tenant_a):
    context = chromium.new_context(viewport={"width": 1100, "height": 900}, accept_downloads=True)
    page = context.new_page()
    page.set_default_timeout(30_000)
    page.goto(f"{live_server.url}/login")
    page.fill("#id_username", tenant_a.user.username)
    page.fill("#id_password", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(f"{live_server.url}/")
    yield page
    context.close()


def shot(page, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)


def test_the_wizard_trains_an_adapter_watched_live_then_evaluated_and_downloaded(
    page, live_server, celery_worker, tenant_a, tmp_path
):
    dataset = tmp_path / "banana.jsonl"
    dataset.write_bytes(banana_jsonl(24))

    # 1. data: upload, and the report with the rendered preview appears
    page.goto(f"{live_server.url}/train/new")
    page.set_input_files("#upload-file", str(dataset))
    page.click("#upload-form button[type=submit]")
    page.wait_for_url("**/train/new?file=*")
    page.get_by_text("As training sees it").wait_for()
    shot(page, "1-wizard-data")
    page.get_by_role("button", name="Next: model and method").click()

    # 2. model and method: Quick preset, two steps (Advanced), a suffix
    page.wait_for_url("**/train/new/model")
    page.check("input[name=preset][value=quick]")
    page.click("summary")
    assert page.input_value("#field-lora_rank") == "8"  # the preset filled the fields
    page.fill("#field-max_steps", "2")
    page.fill("#field-batch_size", "4")
    page.fill("#field-max_seq_length", "128")
    page.fill("#field-suffix", "banana")
    shot(page, "2-wizard-model")
    page.get_by_role("button", name="Next: review").click()

    # 3. review: the pre-flight plan, then launch
    page.wait_for_url("**/train/new/review")
    page.get_by_text("Pre-flight estimate").wait_for()
    assert "2 steps" in page.content()
    shot(page, "3-wizard-review")
    page.click("#launch")
    page.wait_for_url("**/jobs/*")
    job = FineTuneJob.objects.get(suffix="banana")

    # The job page updates itself: the same document sees the job succeed.
    page.evaluate("window.loftSameDocument = true")
    page.locator("#job-status").filter(has_text="running").or_(
        page.locator("#job-status").filter(has_text="succeeded")
    ).wait_for(timeout=300_000)
    shot(page, "4-job-running")
    page.locator("#job-status", has_text="succeeded").wait_for(timeout=600_000)
    assert page.evaluate("window.loftSameDocument") is True  # no reload happened
    page.locator(".chart svg polyline").wait_for()
    shot(page, "5-job-succeeded")

    # The adapter downloads as a zip whose files match its manifest.
    with page.expect_download() as download:
        page.click("#download-adapter")
    archive = zipfile.ZipFile(download.value.path())
    manifest = json.loads(archive.read("manifest.json"))
    for name, entry in manifest["files"].items():
        assert hashlib.sha256(archive.read(name)).hexdigest() == entry["sha256"], name
    assert "adapter_model.safetensors" in manifest["files"]

    # The evaluation report, side by side.
    page.click("#open-evaluation")
    page.wait_for_url("**/evaluations/*")
    page.get_by_role("heading", name="Side by side").wait_for()
    assert job.evaluations.exists()
    shot(page, "6-evaluation")

    # An operator's view of the same moment: the worker that ran the job, live.
    tenant_a.user.is_staff = True
    tenant_a.user.save()
    page.goto(f"{live_server.url}/ops/")
    worker_row = page.locator("#workers tbody tr", has_text="test-worker@")
    worker_row.wait_for()
    assert "online" in worker_row.inner_text()
    as_of = page.locator("#ops-live p.muted").first.inner_text()
    page.wait_for_function(  # refreshed in place by live.js, every 5 s
        "(before) => document.querySelector('#ops-live p.muted').innerText !== before",
        arg=as_of,
        timeout=15_000,
    )
    shot(page, "8-ops")


def test_a_malformed_file_shows_its_line_numbered_errors_in_the_wizard(page, live_server, tmp_path):
    broken = tmp_path / "broken.jsonl"
    broken.write_text(
        '{"messages": [{"role": "user", "content": "Hi"}]}\n'
        "this is not json\n"
        '{"prompt": "only a prompt"}\n'
    )
    page.goto(f"{live_server.url}/train/new")
    page.set_input_files("#upload-file", str(broken))
    page.click("#upload-form button[type=submit]")
    error = page.locator("#upload-error")
    error.wait_for()
    text = error.inner_text()
    assert "line 2" in text.lower(), text
    assert page.url.endswith("/train/new")  # nothing to go on with
    page.set_viewport_size({"width": 380, "height": 900})
    shot(page, "7-wizard-errors")
