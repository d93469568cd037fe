"""/v1/files: OpenAI-compatible uploads, streamed to S3, validated, scoped to the tenant."""

import io

import openai
import pytest

from jobs.models import File
from loft import storage
from loft.models import ApiKey, Organization
from tests.helpers import api_client_for, chat_rows, jsonl, objects_of, upload, wait_for


def validated_by_a_worker(client, file_id: str) -> dict:
    """The file object once a worker has validated the upload (its status left "uploaded")."""
    return wait_for(
        lambda: client.get(f"/v1/files/{file_id}").json(),
        lambda file: file["status"] != "uploaded",
        timeout=90,
        interval=0.5,
        what="the worker's validation",
    )


def test_the_official_openai_client_creates_reads_lists_downloads_and_deletes(
    live_server, transactional_db
):
    org = Organization.objects.create(slug="sdk", name="SDK")
    _, secret = ApiKey.issue(org)
    client = openai.OpenAI(api_key=secret, base_url=f"{live_server.url}/v1", max_retries=0)
    content = jsonl(chat_rows(5))

    created = client.files.create(file=("train.jsonl", content), purpose="fine-tune")
    assert created.id.startswith("file-") and created.object == "file"
    assert created.bytes == len(content) and created.filename == "train.jsonl"
    assert created.status == "processed" and created.purpose == "fine-tune"

    assert client.files.retrieve(created.id).id == created.id
    assert [f.id for f in client.files.list()] == [created.id]
    assert client.files.content(created.id).read() == content
    deleted = client.files.delete(created.id)
    assert deleted.deleted is True
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(created.id)
    assert objects_of(org) == []


@pytest.mark.django_db
def test_the_file_object_carries_the_validation_report(api_a, tenant_a):
    rows = chat_rows(4) + chat_rows(1)  # one duplicate
    body = upload(api_a, jsonl(rows)).json()
    assert body["status"] == "processed", body
    assert body["format"] == "chat" and body["file_type"] == "jsonl" and body["rows"] == 5
    report = body["validation"]
    assert report["duplicate_rows"] == 1
    assert report["role_counts"] == {"user": 5, "assistant": 5}
    assert set(report["tokens_per_row"]) == {"min", "median", "p95", "max"}
    assert body["tokens"] == report["tokens"] > 0
    first = report["preview"][0]["segments"]
    trained = [s["text"] for s in first if s["trained"]]
    assert trained == ["0<|im_end|>"]  # the answer and its end-of-turn token, nothing else
    assert "What is 0 + 0?" in "".join(s["text"] for s in first if not s["trained"])
    file = File.objects.get(pk=body["id"])
    assert storage.get_bytes(file.s3_key) == jsonl(rows)
    assert file.s3_key.startswith(f"orgs/{tenant_a.org.id}/files/{file.id}/")


@pytest.mark.django_db
def test_a_few_bad_rows_among_good_ones_are_counted_and_listed(api_a):
    content = jsonl(chat_rows(6)) + b'{"messages": [{"role": "bot", "content": "x"}]}\n{"oops"\n'
    body = upload(api_a, content).json()
    assert body["status"] == "processed"
    assert body["rows"] == 6
    assert body["validation"]["error_count"] == 2
    assert body["validation"]["errors"] == [
        'line 7: messages[0].role "bot" is not one of system, user, assistant, tool',
        "line 8: not valid JSON (Expecting ':' delimiter, column 8)",
    ]


@pytest.mark.django_db
def test_csv_and_a_forced_format_are_read(api_a):
    body = upload(api_a, b'prompt,completion\nhello,world\n"multi\nline",ok\n', "train.csv").json()
    assert (body["status"], body["format"], body["file_type"], body["rows"]) == (
        "processed",
        "prompt_completion",
        "csv",
        2,
    )
    forced = upload(api_a, jsonl([{"text": "plain words"}]), format="text").json()
    assert forced["format"] == "text"


@pytest.mark.django_db
def test_another_tenants_file_is_not_found_on_any_route_nor_listed(api_a, api_b, tenant_a):
    file_id = upload(api_a, jsonl(chat_rows(2))).json()["id"]
    for response in [
        api_b.get(f"/v1/files/{file_id}"),
        api_b.get(f"/v1/files/{file_id}/content"),
        api_b.delete(f"/v1/files/{file_id}"),
    ]:
        assert response.status_code == 404
        assert response.json()["error"]["message"] == f"No such File object: {file_id}"
    assert api_b.get("/v1/files").json()["data"] == []
    assert api_a.get(f"/v1/files/{file_id}").status_code == 200


@pytest.mark.django_db
def test_lists_are_newest_first_and_filter_by_purpose(api_a):
    ids = [upload(api_a, jsonl(chat_rows(1, start=i))).json()["id"] for i in range(3)]
    page = api_a.get("/v1/files", {"limit": 2}).json()
    assert [f["id"] for f in page["data"]] == ids[::-1][:2] and page["has_more"]
    assert api_a.get("/v1/files", {"purpose": "eval"}).json()["data"] == []


@pytest.mark.django_db
def test_the_list_leaves_out_the_validation_report_that_retrieve_gives(api_a):
    file_id = upload(api_a, jsonl(chat_rows(3))).json()["id"]
    (listed,) = api_a.get("/v1/files").json()["data"]
    retrieved = api_a.get(f"/v1/files/{file_id}").json()
    assert "validation" not in listed and retrieved["validation"]["rows"] == 3
    assert listed == {key: value for key, value in retrieved.items() if key != "validation"}


@pytest.mark.django_db
def test_an_upload_over_the_limit_gets_413_and_leaves_nothing(api_a, tenant_a, settings):
    settings.LOFT_MAX_UPLOAD_BYTES = 100 * 1024
    declared_too_large = upload(api_a, jsonl(chat_rows(4000)))  # refused before reading
    # Declared small enough, found too large while streaming:
    streamed_too_large = upload(api_a, b" " * 120 * 1024 + jsonl(chat_rows(1)))
    for response in (declared_too_large, streamed_too_large):
        assert response.status_code == 413
        assert "upload limit of 100.0 KB" in response.json()["error"]["message"]
    assert File.objects.count() == 0 and objects_of(tenant_a.org) == []


@pytest.mark.django_db
def test_a_bad_purpose_or_missing_file_is_refused_and_leaves_nothing(api_a, tenant_a):
    response = api_a.post(
        "/v1/files",
        {"file": io.BytesIO(jsonl(chat_rows(1))), "purpose": "assistants"},
        format="multipart",
    )
    assert response.status_code == 400 and response.json()["error"]["param"] == "purpose"
    missing = api_a.post("/v1/files", {"purpose": "fine-tune"}, format="multipart")
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "file"
    assert File.objects.count() == 0 and objects_of(tenant_a.org) == []


@pytest.mark.django_db
def test_storage_down_during_upload_is_a_503_and_leaves_no_row(api_a, settings):
    storage.client.cache_clear()
    settings.S3_ENDPOINT_URL = "http://127.0.0.1:9"
    try:
        response = upload(api_a, jsonl(chat_rows(3)))
    finally:
        storage.client.cache_clear()
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "storage_unavailable"
    assert File.objects.count() == 0


@pytest.mark.django_db
def test_a_large_file_whose_head_is_unusable_is_refused_at_once(api_a, tenant_a, settings):
    settings.LOFT_INLINE_VALIDATION_MAX_BYTES = 1024
    response = upload(api_a, b'{"messages": []}\n' * 200)
    assert response.status_code == 400
    assert response.json()["error"]["message"].startswith(
        'The file has no usable rows. line 1: "messages" is empty'
    )
    assert File.objects.count() == 0 and objects_of(tenant_a.org) == []


@pytest.mark.slow  # the session's Celery worker
def test_a_large_upload_is_validated_by_a_worker(
    celery_worker, transactional_db, tenant_a, settings
):
    settings.LOFT_INLINE_VALIDATION_MAX_BYTES = 1024
    client = api_client_for(tenant_a.secret)
    body = upload(client, jsonl(chat_rows(200))).json()
    assert body["status"] == "uploaded"
    body = validated_by_a_worker(client, body["id"])
    assert body["status"] == "processed", body
    assert body["rows"] == 200


@pytest.mark.slow  # the session's Celery worker
def test_an_upload_slower_to_check_than_the_inline_budget_is_finished_by_a_worker(
    celery_worker, transactional_db, tenant_a, settings
):
    settings.LOFT_INLINE_VALIDATION_SECONDS = 0
    client = api_client_for(tenant_a.secret)
    body = upload(client, jsonl(chat_rows(20))).json()
    assert body["status"] == "uploaded"
    body = validated_by_a_worker(client, body["id"])
    assert body["status"] == "processed", body
    assert body["rows"] == 20


@pytest.mark.slow  # the session's Celery worker
def test_a_large_file_unusable_past_its_head_ends_in_error_with_its_reason(
    celery_worker, transactional_db, tenant_a, settings
):
    settings.LOFT_INLINE_VALIDATION_MAX_BYTES = 1024
    settings.LOFT_HEAD_CHECK_BYTES = 1024
    client = api_client_for(tenant_a.secret)
    # The head (first KiB) is fine chat; plain text rows come later, which a file cannot mix.
    body = upload(client, jsonl(chat_rows(30)) + jsonl([{"text": "later"}] * 5)).json()
    assert body["status"] == "uploaded"
    body = validated_by_a_worker(client, body["id"])
    assert body["status"] == "error"
    assert body["status_details"].startswith(
        "The file mixes formats: chat messages (first on line 1, 30 rows)"
    )
    assert objects_of(tenant_a.org) == []


def test_an_interrupted_upload_leaves_no_object_and_no_row(live_server, transactional_db):
    import socket
    import urllib.parse

    org = Organization.objects.create(slug="flaky", name="Flaky")
    _, secret = ApiKey.issue(org)
    boundary = "cutboundary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="cut.jsonl"\r\n\r\n'
    ).encode()
    sent = jsonl(chat_rows(400_000))[: 20 * 2**20]  # 20 MiB: several multipart parts reach S3
    url = urllib.parse.urlsplit(live_server.url)
    with socket.create_connection((url.hostname, url.port)) as connection:
        connection.sendall(
            (
                f"POST /v1/files HTTP/1.1\r\nHost: {url.netloc}\r\n"
                f"Authorization: Bearer {secret}\r\n"
                f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
                f"Content-Length: {len(head) + 100 * 2**20}\r\n\r\n"
            ).encode()
            + head
        )
        connection.sendall(sent)
        # The body ends here, 80 MiB short of its length. Wait for the server to answer (or to
        # hang up): until then it may not even have begun the multipart upload, and a look at
        # the bucket would pass before there is anything to leave behind.
        connection.shutdown(socket.SHUT_WR)
        connection.settimeout(60)
        answer = connection.recv(65536)
    assert answer == b"" or answer.startswith(b"HTTP/1.1 4"), answer[:200]
    # The client is gone mid-file. Whatever the server makes of that, nothing may remain.
    wait_for(
        lambda: not (objects_of(org) or _open_multipart_uploads(org)),
        timeout=30,
        interval=0.5,
        what="no object nor open multipart upload left",
        explain=lambda _: f"{objects_of(org)} {_open_multipart_uploads(org)}",
    )
    assert objects_of(org) == []
    assert _open_multipart_uploads(org) == []
    assert File.objects.filter(org=org).count() == 0


def _open_multipart_uploads(org) -> list[str]:
    listed = storage.client().list_multipart_uploads(
        Bucket=storage.bucket(), Prefix=f"orgs/{org.id}/"
    )
    return [upload["Key"] for upload in listed.get("Uploads", [])]
