"""The Datasets pages: list with upload, detail with report, preview and errors; tenant walls."""

import pytest
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext

from jobs.models import File
from tests.helpers import chat_rows, jsonl, named, objects_of, signed_in, upload

pytestmark = pytest.mark.django_db


def test_an_empty_list_invites_an_upload(tenant_a):
    page = signed_in(tenant_a).get("/datasets")
    assert page.status_code == 200
    html = page.content.decode()
    assert "No datasets yet — upload one" in html
    assert 'id="drop-zone"' in html and "<progress" in html and "upload.js" in html


def test_the_detail_page_shows_the_report_the_marked_preview_and_the_errors(api_a, tenant_a):
    content = jsonl(chat_rows(3)) + b'{"messages": [{"role": "bot", "content": "x"}]}\n'
    file_id = upload(api_a, content, "qa.jsonl").json()["id"]
    browser = signed_in(tenant_a)
    assert "qa.jsonl" in browser.get("/datasets").content.decode()
    html = browser.get(f"/datasets/{file_id}").content.decode()
    assert "Rows</dt><dd>3</dd>" in html
    assert "<mark>0&lt;|im_end|&gt;</mark>" in html  # the trained answer, end token included
    assert (
        "line 4: messages[0].role &quot;bot&quot; is not one of system, user, assistant, tool"
        in html
    )


def test_the_list_does_not_load_the_reports(api_a, tenant_a):
    upload(api_a, jsonl(chat_rows(2)))
    browser = signed_in(tenant_a)
    with CaptureQueriesContext(connection) as queries:
        assert browser.get("/datasets").status_code == 200
    listing = [q["sql"] for q in queries.captured_queries if 'FROM "jobs_file"' in q["sql"]]
    assert listing and not any('"jobs_file"."report"' in sql for sql in listing)


def test_a_browser_session_can_upload_through_the_api_with_its_csrf_token(tenant_a):
    browser = Client(enforce_csrf_checks=True)
    browser.login(username=tenant_a.user.username, password="pw-for-tests-1")
    browser.get("/datasets")
    token = browser.cookies["csrftoken"].value
    refused = upload(browser, jsonl(chat_rows(2)))
    assert refused.status_code == 403  # no CSRF token: refused before anything is stored
    assert objects_of(tenant_a.org) == []
    accepted = browser.post(
        "/v1/files",
        {"file": _named(jsonl(chat_rows(2))), "purpose": "fine-tune"},
        HTTP_X_CSRFTOKEN=token,
    )
    assert accepted.status_code == 200, accepted.content
    assert File.objects.get(pk=accepted.json()["id"]).org == tenant_a.org


def _named(content):
    return named(content, "browser.jsonl")


def test_another_tenants_dataset_page_is_not_found(api_a, tenant_b):
    file_id = upload(api_a, jsonl(chat_rows(2))).json()["id"]
    browser = signed_in(tenant_b)
    assert browser.get(f"/datasets/{file_id}").status_code == 404
    assert browser.post(f"/datasets/{file_id}/delete").status_code == 404
    assert file_id not in browser.get("/datasets").content.decode()
    assert File.objects.filter(pk=file_id).exists()


def test_deleting_from_the_page_removes_the_row_and_the_object(api_a, tenant_a):
    file_id = upload(api_a, jsonl(chat_rows(2))).json()["id"]
    response = signed_in(tenant_a).post(f"/datasets/{file_id}/delete")
    assert response.status_code == 302
    assert not File.objects.filter(pk=file_id).exists()
    assert objects_of(tenant_a.org) == []


def test_pages_need_a_signed_in_user():
    assert Client().get("/datasets").status_code == 302
