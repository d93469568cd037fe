"""The wizard and the job pages with Django's test client: every step, going back, errors
beside their field, tenant walls. (The same flow in a real browser: tests/test_browser.py.)"""

import re

import pytest

from jobs.models import File, FineTuneJob, JobEvent
from jobs.views.jobs import CHART_POINTS, SHOWN_EVENTS, loss_chart
from tests.helpers import chat_rows, jsonl, upload

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("private_queue")]


@pytest.fixture
def browser_a(client, tenant_a):
    client.force_login(tenant_a.user)
    return client


def dataset(api, rows: int = 30) -> str:
    response = upload(api, jsonl(chat_rows(rows)), name="support.jsonl")
    assert response.status_code == 200, response.content
    return response.json()["id"]


def preference_dataset(api, rows: int = 30) -> str:
    """OpenAI's preference rows: a prompt, the answer to prefer and one not to."""
    pairs = [
        {
            "input": {"messages": [{"role": "user", "content": f"What is {i} + {i}?"}]},
            "preferred_output": [{"role": "assistant", "content": str(2 * i)}],
            "non_preferred_output": [{"role": "assistant", "content": f"Maybe {2 * i + 1}."}],
        }
        for i in range(rows)
    ]
    response = upload(api, jsonl(pairs), name="pairs.jsonl")
    assert response.status_code == 200, response.content
    assert response.json()["format"] == "preference"
    return response.json()["id"]


QUICK_SETTINGS = {
    "model": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "preset": "quick",
    "n_epochs": "1",
    "batch_size": "auto",
    "learning_rate_multiplier": "2.0",
    "lora_rank": "8",
    "lora_alpha": "16",
    "lora_dropout": "0.0",
    "max_seq_length": "auto",
    "warmup_ratio": "0.0",
    "lr_scheduler": "linear",
    "max_steps": "2",
    "beta": "auto",  # on the page only where DPO is offered; read only where it is chosen
    "action": "next",
}


def test_the_wizard_walks_data_model_review_and_launches_a_job(browser_a, api_a, tenant_a):
    file_id = dataset(api_a)
    page = browser_a.get(f"/train/new?file={file_id}").content.decode()
    assert "support.jsonl" in page and "As training sees it" in page  # the report and preview
    assert browser_a.post("/train/new", {"file": file_id})["Location"] == "/train/new/model"

    page = browser_a.get("/train/new/model").content.decode()
    assert "Quick" in page and "Balanced" in page and "Thorough" in page
    assert 'name="method_type"' not in page and 'id="field-beta"' not in page  # chat: supervised
    assert 'value="auto"' in page  # Balanced: epochs from the data
    quick = browser_a.post(
        "/train/new/model",
        {
            "model": "HuggingFaceTB/SmolLM2-135M-Instruct",
            "preset": "quick",
            "action": "apply_preset",
        },
    ).content.decode()
    assert 'id="field-lora_rank" name="lora_rank" value="8"' in quick

    settings = {
        "model": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "preset": "quick",
        "quantization": "nf4",
        "n_epochs": "1",
        "batch_size": "auto",
        "learning_rate_multiplier": "2.0",
        "lora_rank": "0",  # out of range: refused beside its field
        "lora_alpha": "16",
        "lora_dropout": "0.05",
        "max_seq_length": "auto",
        "warmup_ratio": "0.03",
        "lr_scheduler": "cosine",
        "max_steps": "2",
        "packing": "on",
        "suffix": "wizard",
        "action": "next",
    }
    refused = browser_a.post("/train/new/model", settings).content.decode()
    assert 'id="error-lora_rank"' in refused and "lora_rank must be between 1 and 256" in refused
    assert not FineTuneJob.objects.exists()
    settings["lora_rank"] = "8"
    assert browser_a.post("/train/new/model", settings)["Location"] == "/train/new/review"

    # Going back keeps what was chosen.
    back = browser_a.get("/train/new/model").content.decode()
    assert 'name="max_steps" value="2"' in back and 'value="wizard"' in back
    assert '<option value="cosine" selected>' in back

    review = browser_a.get("/train/new/review").content.decode()
    assert "Pre-flight estimate" in review and "2 steps" in review
    launched = browser_a.post("/train/new/review")
    job = FineTuneJob.objects.get()
    assert launched["Location"] == f"/jobs/{job.id}"
    assert job.org == tenant_a.org and job.hyperparameters["lora_rank"] == 8
    assert job.hyperparameters["max_steps"] == 2 and job.suffix == "wizard"
    assert job.hyperparameters["lr_scheduler"] == "cosine"
    assert job.hyperparameters["objective"] == "supervised"
    assert "beta" not in job.requested_hyperparameters
    assert api_a.get(f"/v1/fine_tuning/jobs/{job.id}").json()["method"]["type"] == "supervised"

    page = browser_a.get(f"/jobs/{job.id}").content.decode()
    assert 'data-live-url="/jobs/' in page and "Cancel" in page
    assert "queued" in browser_a.get(f"/jobs/{job.id}/live").content.decode()
    assert browser_a.post(f"/jobs/{job.id}/cancel").status_code == 302
    job.refresh_from_db()
    assert job.status == "cancelled"
    assert "data-final" in browser_a.get(f"/jobs/{job.id}/live").content.decode()


def test_a_preference_file_offers_dpo_first_and_launches_a_dpo_job(browser_a, api_a):
    file_id = preference_dataset(api_a)
    assert browser_a.post("/train/new", {"file": file_id})["Location"] == "/train/new/model"

    page = browser_a.get("/train/new/model").content.decode()
    assert 'name="method_type" value="dpo" checked' in page
    assert 'name="method_type" value="supervised">' in page
    assert '<p data-only-for="dpo">' in page and 'id="field-beta"' in page  # shown: DPO chosen

    refused = browser_a.post(
        "/train/new/model", {**QUICK_SETTINGS, "method_type": "dpo", "beta": "3"}
    ).content.decode()
    assert 'id="error-beta"' in refused and "beta must be in (0, 2]" in refused
    chosen = {**QUICK_SETTINGS, "method_type": "dpo", "beta": "0.2"}
    assert browser_a.post("/train/new/model", chosen)["Location"] == "/train/new/review"
    review = browser_a.get("/train/new/review").content.decode()
    assert "DPO: learn to prefer the preferred answer over the other" in review
    assert "held close to the base model" in review and "Pre-flight estimate" in review

    launched = browser_a.post("/train/new/review")
    job = FineTuneJob.objects.get()
    assert launched["Location"] == f"/jobs/{job.id}"
    assert job.hyperparameters["objective"] == "dpo" and job.hyperparameters["beta"] == 0.2
    method = api_a.get(f"/v1/fine_tuning/jobs/{job.id}").json()["method"]
    assert method["type"] == "dpo" and method["dpo"]["hyperparameters"]["beta"] == 0.2
    assert browser_a.post(f"/jobs/{job.id}/cancel").status_code == 302


def test_a_preference_file_can_train_supervised_on_its_preferred_answers(browser_a, api_a):
    browser_a.post("/train/new", {"file": preference_dataset(api_a)})
    chosen = {**QUICK_SETTINGS, "method_type": "supervised", "beta": "not a number"}
    assert browser_a.post("/train/new/model", chosen)["Location"] == "/train/new/review"

    back = browser_a.get("/train/new/model").content.decode()
    assert 'name="method_type" value="supervised" checked' in back
    assert '<p data-only-for="dpo" hidden>' in back  # beta: not this method's
    review = browser_a.get("/train/new/review").content.decode()
    assert "Supervised: learn the preferred answers" in review

    browser_a.post("/train/new/review")
    job = FineTuneJob.objects.get()
    assert job.hyperparameters["objective"] == "supervised"
    assert "beta" not in job.requested_hyperparameters  # never sent for a supervised job
    assert api_a.get(f"/v1/fine_tuning/jobs/{job.id}").json()["method"]["type"] == "supervised"
    assert browser_a.post(f"/jobs/{job.id}/cancel").status_code == 302


def test_another_file_brings_its_own_method(browser_a, api_a):
    """DPO chosen for a preference file, then a chat file picked instead: supervised."""
    browser_a.post("/train/new", {"file": preference_dataset(api_a)})
    browser_a.post("/train/new/model", {**QUICK_SETTINGS, "method_type": "dpo"})
    assert browser_a.post("/train/new", {"file": dataset(api_a)})["Location"].endswith("/model")

    page = browser_a.get("/train/new/model").content.decode()
    assert 'name="method_type"' not in page
    review = browser_a.get("/train/new/review").content.decode()
    assert "Supervised: the answers in the file" in review and 'role="alert"' not in review


def test_a_file_with_errors_cannot_go_on_and_says_why(browser_a, api_a):
    response = upload(api_a, b'{"messages": []}\nnot json\n', name="broken.jsonl")
    assert response.status_code == 400  # the API refuses it at once, with line numbers
    assert "line 2: not valid JSON" in response.json()["error"]["message"]
    page = browser_a.post("/train/new", {}).content.decode()
    assert "Choose a dataset, or upload one." in page


def test_job_pages_are_the_tenants_own(client, api_a, tenant_a, tenant_b):
    job = FineTuneJob.submit(
        org=tenant_a.org,
        training_file=File.objects.get(pk=dataset(api_a)),
        hyperparameters={"max_steps": 1, "batch_size": 2, "max_seq_length": 128},
    )
    client.force_login(tenant_b.user)
    for url in (f"/jobs/{job.id}", f"/jobs/{job.id}/live"):
        assert client.get(url).status_code == 404
    assert client.post(f"/jobs/{job.id}/cancel").status_code == 404
    assert job.id not in client.get("/jobs").content.decode()


def test_a_finished_jobs_page_shows_where_its_time_went(browser_a, api_a, tenant_a):
    job = FineTuneJob.submit(
        org=tenant_a.org,
        training_file=File.objects.get(pk=dataset(api_a)),
        hyperparameters={"max_steps": 1, "batch_size": 2, "max_seq_length": 128},
    )
    assert 'id="job-timings"' not in browser_a.get(f"/jobs/{job.id}").content.decode()
    timings = {"attempt": 1, "queue": 0.4, "setup": 1.2, "training": 16.0, "evaluation": 2.0}
    FineTuneJob.objects.filter(pk=job.pk).update(
        status="succeeded", timings={**timings, "upload": 0.4, "total": 20.0}
    )
    page = browser_a.get(f"/jobs/{job.id}").content.decode()
    table = page.split('id="job-timings"')[1].split("</table>")[0]
    rows = re.findall(r'data-phase="(\w+)"><td>([^<]+)</td><td class="number">([\d.]+)</td>'
                      r'<td class="number">(\d+) %</td>', table)  # fmt: skip
    assert [(phase, seconds, share) for phase, _, seconds, share in rows] == [
        ("queue", "0.4", "2"),
        ("setup", "1.2", "6"),
        ("training", "16.0", "80"),
        ("evaluation", "2.0", "10"),
        ("upload", "0.4", "2"),
    ]
    assert "Total, from submission" in table and "20.0" in table


def test_the_loss_chart_scales_training_and_held_out_loss_into_the_box():
    chart = loss_chart([(1, 2.0), (2, 1.0), (4, 0.5)], 0.8, steps=4)
    xs = [float(p.split(",")[0]) for p in chart["points"].split()]
    ys = [float(p.split(",")[1]) for p in chart["points"].split()]
    assert xs[0] < xs[1] < xs[2] == chart["right"]
    assert ys[0] == chart["top"] and ys[2] > ys[1] > ys[0]  # lower loss is drawn lower
    assert chart["top"] < chart["validation_y"] < chart["bottom"]
    assert loss_chart([], None, 0) == {}


def test_held_out_loss_measured_during_training_is_drawn_where_it_was_measured():
    chart = loss_chart([(1, 2.0), (2, 1.0), (4, 0.5)], 0.7, steps=4, measured=[(2, 1.2), (4, 0.7)])
    measured = [tuple(map(float, p.split(","))) for p in chart["validation_points"].split()]
    trained = [tuple(map(float, p.split(","))) for p in chart["points"].split()]
    assert [x for x, _ in measured] == [trained[1][0], trained[2][0]]  # steps 2 and 4
    assert measured[0][1] < trained[1][1]  # 1.2 is drawn above 1.0
    assert chart["validation_y"] is None  # no flat line once there are measurements


def test_a_long_jobs_live_fragment_reads_its_newest_events_and_a_sample_of_its_losses(
    browser_a, api_a, tenant_a
):
    """One event per step: the fragment polled every two seconds reads a bounded number of
    them however long the job, and its chart keeps the first and the latest loss."""
    job = FineTuneJob.submit(
        org=tenant_a.org,
        training_file=File.objects.get(pk=dataset(api_a)),
        hyperparameters={"max_steps": 5000, "batch_size": 2, "max_seq_length": 128},
    )
    steps = 5000
    JobEvent.objects.bulk_create(
        JobEvent(
            job=job,
            message=f"Step {step}/{steps}",
            data={"step": step, "train_loss": 3.0 - step / steps},
        )
        for step in range(1, steps + 1)
    )
    page = browser_a.get(f"/jobs/{job.id}/live").content.decode()
    points = page.split('class="train-loss"')[0].rsplit('points="', 1)[1].split('"')[0].split()
    assert len(points) == CHART_POINTS
    assert page.count('<li class="event-') == SHOWN_EVENTS
    assert f"Step {steps}/{steps}" in page and "Step 1/" not in page
    assert "latest 2.0000" in page  # the chart's figure is the last step's loss
