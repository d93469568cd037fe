"""Webhooks: endpoints per tenant, events signed so OpenAI's client verifies them, retried with
backoff and every attempt visible. Deliveries go to a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import base64
import hashlib
import hmac
import socketserver
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import openai
import pytest
import yaml
from django.db import connection, transaction
from django.utils import timezone

from loft.models import EVENTS, JOB_EVENTS, WebhookDelivery, WebhookEndpoint
from loft.webhooks import announce, attempt_delivery, check_url, send_overdue
from tests.helpers import WorkerProcess, wait_for
from worker.tasks import deliver_webhook

SUCCEEDED, FAILED, CANCELLED = JOB_EVENTS
JOB = {"id": "ftjob-abc123", "object": "fine_tuning.job", "status": "succeeded"}


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes
    at: float


class Receiver:
    """A tenant's webhook receiver: records every request and answers from a script.

    ``answers`` are the status codes of successive requests; the last one repeats.
    """

    def __init__(self):
        self.requests: list[Received] = []
        self.answers = [200]
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["content-length"]))
                headers = {name.lower(): value for name, value in self.headers.items()}
                receiver.requests.append(Received(headers, body, time.monotonic()))
                code = receiver.answers.pop(0) if len(receiver.answers) > 1 else receiver.answers[0]
                self.send_response(code)
                self.send_header("location", "http://127.0.0.1:9/elsewhere")
                self.end_headers()
                self.wfile.write(b"thanks" if code < 300 else b"not now")

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hooks/loft?source=tests"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)


@pytest.fixture
def receiver():
    receiver = Receiver()
    receiver.thread.start()
    yield receiver
    receiver.server.shutdown()
    receiver.server.server_close()


class SlowReceiver:
    """A receiver that reads the request, then dribbles its answer one byte every ``interval``
    seconds for ``lasting`` seconds: every read gets a byte well within a socket timeout."""

    def __init__(self, interval: float = 0.5, lasting: float = 20.0):
        self.requests = 0
        self.closed_at: list[float] = []
        receiver = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self):
                self.request.recv(65536)
                receiver.requests += 1
                ends = time.monotonic() + lasting
                try:
                    for byte in b"HTTP/1.1 200 OK\r\nx-slow: " + b"a" * 1000:
                        if time.monotonic() > ends:
                            break
                        self.request.sendall(bytes([byte]))
                        time.sleep(interval)
                except OSError:
                    receiver.closed_at.append(time.monotonic())  # Loft hung up

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/slow"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def slow_receiver():
    receiver = SlowReceiver()
    yield receiver
    receiver.server.shutdown()
    receiver.server.server_close()


@pytest.fixture(autouse=True)
def private_urls_allowed(settings):
    """The receiver is on 127.0.0.1, which production refuses; one test turns this off again."""
    settings.LOFT_WEBHOOK_ALLOW_PRIVATE_URLS = True


def register(api, url: str, **fields) -> dict:
    response = api.post("/v1/webhook_endpoints", {"url": url, **fields}, format="json")
    assert response.status_code == 201, response.json()
    return response.json()


def openai_unwrap(received: Received, secret: str):
    client = openai.OpenAI(api_key="unused", base_url="http://unused")
    return client.webhooks.unwrap(received.body, received.headers, secret=secret)


def deliveries_of(api, endpoint_id: str) -> list[dict]:
    response = api.get(f"/v1/webhook_endpoints/{endpoint_id}/deliveries")
    assert response.status_code == 200, response.json()
    return response.json()["data"]


def time_passes(delivery: WebhookDelivery) -> None:
    """Make the delivery's next attempt due now instead of waiting for its backoff."""
    WebhookDelivery.objects.filter(pk=delivery.pk).update(next_attempt_at=timezone.now())


# --- the API ---------------------------------------------------------------------------------


@pytest.mark.django_db
def test_creating_an_endpoint_shows_its_signing_secret_once(api_a, receiver):
    created = register(api_a, receiver.url, name="ci")
    secret = created["signing_secret"]
    assert secret.startswith("whsec_") and len(base64.b64decode(secret[6:])) == 32
    assert created["object"] == "webhook_endpoint" and created["event_types"] == list(EVENTS)
    assert created["signing_secret_hint"] == f"whsec_…{secret[-4:]}"

    shown = api_a.get(f"/v1/webhook_endpoints/{created['id']}").json()
    listed = api_a.get("/v1/webhook_endpoints").json()
    assert "signing_secret" not in shown and shown["url"] == receiver.url
    assert listed["object"] == "list" and [e["id"] for e in listed["data"]] == [created["id"]]
    assert all("signing_secret" not in endpoint for endpoint in listed["data"])


@pytest.mark.django_db
def test_clients_cannot_set_the_id_org_or_secret(api_a, tenant_a, tenant_b, receiver):
    created = register(
        api_a,
        receiver.url,
        id="wh-chosen",
        org=tenant_b.org.id,
        org_id=tenant_b.org.id,
        secret="whsec_" + base64.b64encode(b"k" * 32).decode(),
        signing_secret="whsec_" + base64.b64encode(b"k" * 32).decode(),
        created_at=1,
    )
    stored = WebhookEndpoint.objects.get(pk=created["id"])
    assert stored.id != "wh-chosen" and stored.org_id == tenant_a.org.id
    assert (
        stored.secret
        == created["signing_secret"]
        != "whsec_" + base64.b64encode(b"k" * 32).decode()
    )
    assert created["created_at"] > 1


@pytest.mark.django_db
def test_another_tenants_endpoint_is_not_found_and_not_listed(api_a, api_b, receiver):
    created = register(api_a, receiver.url)
    for response in [
        api_b.get(f"/v1/webhook_endpoints/{created['id']}"),
        api_b.get(f"/v1/webhook_endpoints/{created['id']}/deliveries"),
        api_b.delete(f"/v1/webhook_endpoints/{created['id']}"),
    ]:
        assert response.status_code == 404
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    assert api_b.get("/v1/webhook_endpoints").json()["data"] == []
    assert WebhookEndpoint.objects.filter(pk=created["id"]).exists()


@pytest.mark.django_db
@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8000/hook",
        "http://localhost/hook",
        "http://169.254.169.254/latest/meta-data/",
        "http://10.1.2.3/hook",
        "http://[::1]/hook",
        "ftp://example.com/hook",
        # IPv4 addresses inside IPv6 ones: NAT64, 6to4, IPv4-compatible and IPv4-mapped.
        "http://[64:ff9b::7f00:1]/hook",
        "http://[64:ff9b::a9fe:a9fe]/hook",
        "http://[64:ff9b:1::a00:1]/hook",
        "http://[2002:a00:1::1]/hook",
        "http://[::127.0.0.1]/hook",
        "http://[::ffff:10.1.2.3]/hook",
    ],
)
def test_urls_inside_the_network_are_refused_by_default(api_a, settings, url):
    settings.LOFT_WEBHOOK_ALLOW_PRIVATE_URLS = False
    response = api_a.post("/v1/webhook_endpoints", {"url": url}, format="json")
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "url"


@pytest.mark.parametrize(
    "address", ["8.8.8.8", "2606:4700:4700::1111", "64:ff9b::808:808", "::ffff:8.8.8.8"]
)
def test_public_addresses_are_allowed_whether_or_not_wrapped_in_ipv6(settings, address):
    settings.LOFT_WEBHOOK_ALLOW_PRIVATE_URLS = False
    host = f"[{address}]" if ":" in address else address
    assert check_url(f"https://{host}/hook") == [address]


@pytest.mark.django_db
def test_an_organization_may_register_only_so_many_endpoints(api_a, api_b, receiver, settings):
    settings.LOFT_WEBHOOK_MAX_ENDPOINTS = 2
    register(api_a, receiver.url)
    register(api_a, receiver.url)
    response = api_a.post("/v1/webhook_endpoints", {"url": receiver.url}, format="json")
    assert response.status_code == 400
    error = response.json()["error"]
    assert "at most 2 webhook endpoints" in error["message"]
    assert error["code"] == "too_many_webhook_endpoints"
    assert WebhookEndpoint.objects.count() == 2
    register(api_b, receiver.url)  # another organization's endpoints are its own count


@pytest.mark.django_db
def test_a_url_that_turned_private_after_registration_is_not_called(
    api_a, tenant_a, receiver, settings
):
    register(api_a, receiver.url)
    settings.LOFT_WEBHOOK_ALLOW_PRIVATE_URLS = False
    announce(tenant_a.org.id, SUCCEEDED, JOB)
    attempt_delivery(WebhookDelivery.objects.get())
    assert receiver.requests == []
    assert "not a public address" in WebhookDelivery.objects.get().last_error


@pytest.mark.django_db
def test_unknown_event_types_are_refused(api_a, tenant_a, receiver):
    response = api_a.post(
        "/v1/webhook_endpoints",
        {"url": receiver.url, "event_types": ["batch.completed"]},
        format="json",
    )
    assert response.status_code == 400 and response.json()["error"]["param"] == "event_types"
    with pytest.raises(ValueError, match="batch.completed"):
        announce(tenant_a.org.id, "batch.completed", JOB)


@pytest.mark.django_db(transaction=True)
def test_the_official_openai_client_manages_endpoints(live_server, tenant_a, receiver):
    client = openai.OpenAI(api_key=tenant_a.secret, base_url=f"{live_server.url}/v1", max_retries=0)
    created = client.webhooks.create(url=receiver.url, name="ci", event_types=[FAILED])
    assert created.signing_secret.startswith("whsec_") and created.event_types == [FAILED]
    assert [endpoint.id for endpoint in client.webhooks.list()] == [created.id]
    assert client.webhooks.retrieve(created.id).name == "ci"
    deleted = client.webhooks.delete(created.id)
    assert deleted.deleted and deleted.object == "webhook_endpoint.deleted"
    assert not WebhookEndpoint.objects.filter(pk=created.id).exists()


# --- delivery --------------------------------------------------------------------------------


@pytest.mark.django_db
def test_only_subscribed_enabled_endpoints_of_the_org_get_an_event(
    api_a, api_b, tenant_a, receiver
):
    failures_only = register(api_a, receiver.url, event_types=[FAILED])
    everything = register(api_a, receiver.url)
    switched_off = register(api_a, receiver.url)
    WebhookEndpoint.objects.filter(pk=switched_off["id"]).update(enabled=False)
    other_tenants = register(api_b, receiver.url)

    announce(tenant_a.org.id, SUCCEEDED, JOB)
    announce(tenant_a.org.id, FAILED, JOB)

    sent = sorted(WebhookDelivery.objects.values_list("endpoint_id", "event_type"))
    assert sent == sorted(
        [(everything["id"], SUCCEEDED), (everything["id"], FAILED), (failures_only["id"], FAILED)]
    )
    assert not WebhookDelivery.objects.filter(endpoint_id=other_tenants["id"]).exists()


@pytest.mark.django_db
def test_a_delivery_is_signed_so_that_the_official_openai_client_accepts_it(
    api_a, tenant_a, receiver
):
    secret = register(api_a, receiver.url)["signing_secret"]
    announce(tenant_a.org.id, SUCCEEDED, JOB)
    delivery = WebhookDelivery.objects.get()
    assert attempt_delivery(delivery) is None

    [received] = receiver.requests
    event = openai_unwrap(received, secret)
    assert event.type == SUCCEEDED and event.data.id == JOB["id"] and event.object == "event"
    assert event.id == delivery.event_id and event.data.status == "succeeded"
    assert received.headers["webhook-id"] == delivery.id
    assert received.headers["user-agent"] == "Loft-Webhooks/1"
    assert received.headers["content-type"] == "application/json"

    # The same check by hand, as a receiver without the openai package would do it.
    signed = f"{received.headers['webhook-id']}.{received.headers['webhook-timestamp']}."
    key = base64.b64decode(secret.removeprefix("whsec_"))
    digest = hmac.new(key, signed.encode() + received.body, hashlib.sha256).digest()
    assert received.headers["webhook-signature"] == "v1," + base64.b64encode(digest).decode()
    assert abs(int(received.headers["webhook-timestamp"]) - time.time()) < 60

    tampered = Received(received.headers, received.body.replace(b"abc123", b"abc124"), 0)
    with pytest.raises(openai.InvalidWebhookSignatureError):
        openai_unwrap(tampered, secret)


@pytest.mark.django_db
def test_a_failed_attempt_is_retried_after_its_backoff_and_every_answer_is_kept(
    api_a, tenant_a, receiver, settings
):
    settings.LOFT_WEBHOOK_RETRY_DELAYS = [30, 300]
    receiver.answers = [500, 200]
    endpoint = register(api_a, receiver.url)
    announce(tenant_a.org.id, SUCCEEDED, JOB)
    delivery = WebhookDelivery.objects.get()

    assert 28 <= attempt_delivery(delivery) <= 30
    assert attempt_delivery(delivery) is None, "not due yet: nothing is sent"
    assert len(receiver.requests) == 1
    [pending] = deliveries_of(api_a, endpoint["id"])
    assert pending["status"] == "pending" and pending["response_codes"] == [500]
    assert 28 <= pending["next_attempt_at"] - pending["attempts_log"][0]["at"] <= 31
    assert "HTTP 500" in pending["last_error"]

    time_passes(delivery)
    assert attempt_delivery(delivery) is None
    [done] = deliveries_of(api_a, endpoint["id"])
    assert done["status"] == "succeeded" and done["attempts"] == 2
    assert done["response_codes"] == [500, 200] and done["last_error"] == ""
    assert done["delivered_at"] is not None and done["attempts_log"][1]["response"] == "thanks"

    assert attempt_delivery(delivery) is None, "a delivered event is never sent again"
    assert len(receiver.requests) == 2
    assert receiver.requests[0].headers["webhook-id"] == receiver.requests[1].headers["webhook-id"]


@pytest.mark.django_db
def test_a_delivery_fails_for_good_when_its_retries_run_out(api_a, tenant_a, receiver, settings):
    settings.LOFT_WEBHOOK_RETRY_DELAYS = [0]
    register(api_a, receiver.url)
    announce(tenant_a.org.id, CANCELLED, JOB)
    delivery = WebhookDelivery.objects.get()
    receiver.server.shutdown()
    receiver.server.server_close()  # nobody listens: an attempt without a response

    assert attempt_delivery(delivery) == 0
    delivery.refresh_from_db()
    assert delivery.last_response_code is None and "No response" in delivery.last_error

    assert attempt_delivery(delivery) is None
    delivery.refresh_from_db()
    assert delivery.status == "failed" and delivery.attempts == 2
    assert delivery.next_attempt_at is None


@pytest.mark.django_db
def test_a_receiver_that_answers_a_byte_at_a_time_is_cut_off_at_the_deadline(
    api_a, tenant_a, slow_receiver, settings
):
    settings.LOFT_WEBHOOK_TIMEOUT_SECONDS = 2
    settings.LOFT_WEBHOOK_RETRY_DELAYS = [30]
    register(api_a, slow_receiver.url)
    announce(tenant_a.org.id, SUCCEEDED, JOB)
    started = time.monotonic()
    retry_in = attempt_delivery(WebhookDelivery.objects.get())
    took = time.monotonic() - started

    assert took < 3.5, f"the attempt took {took:.1f} s, past its 2 s deadline"
    assert slow_receiver.requests == 1
    delivery = WebhookDelivery.objects.get()
    assert delivery.status == "pending" and delivery.attempts == 1 and 28 <= retry_in <= 30
    assert delivery.last_response_code is None
    assert "did not answer in full within 2 seconds" in delivery.last_error
    assert wait_for(lambda: slow_receiver.closed_at, bool, timeout=5, what="Loft hanging up")


@pytest.mark.django_db(transaction=True)
def test_nothing_sends_an_event_again_while_an_attempt_at_it_is_in_flight(
    api_a, tenant_a, slow_receiver, settings
):
    settings.LOFT_WEBHOOK_TIMEOUT_SECONDS = 2
    register(api_a, slow_receiver.url)
    announce(tenant_a.org.id, SUCCEEDED, JOB)
    delivery = WebhookDelivery.objects.get()
    claimed_at = timezone.now()

    def attempt_in_another_worker():
        try:
            attempt_delivery(delivery)
        finally:
            connection.close()  # this thread's own; the test database is dropped at the end

    in_flight = threading.Thread(target=attempt_in_another_worker)
    in_flight.start()
    try:
        wait_for(lambda: slow_receiver.requests, bool, timeout=5, what="the first attempt")
        leased = WebhookDelivery.objects.get()
        # The claim outlasts all the attempt may take, Celery's hard limit on its task included,
        # so the overdue sweep cannot find it due while it runs.
        assert deliver_webhook.time_limit is not None
        assert leased.next_attempt_at - claimed_at >= timedelta(
            seconds=deliver_webhook.time_limit + 10
        )
        assert send_overdue() == 0
        assert attempt_delivery(leased) is None, "a second message is turned away"
    finally:
        in_flight.join(10)
    assert not in_flight.is_alive()
    assert slow_receiver.requests == 1
    assert WebhookDelivery.objects.get().attempts == 1


def test_deliveries_have_a_queue_of_their_own_that_compose_consumes(settings):
    training_queues = {settings.LOFT_TRAINING_QUEUE, settings.LOFT_INFERENCE_QUEUE}
    assert settings.LOFT_WEBHOOK_QUEUE not in training_queues
    compose = yaml.safe_load((Path(__file__).parent.parent / "docker-compose.yml").read_text())
    consumers = [
        name
        for name, service in compose["services"].items()
        if "worker" in service.get("command", [])
        and settings.LOFT_WEBHOOK_QUEUE
        in service["command"][service["command"].index("--queues") + 1].split(",")
    ]
    assert consumers and "deploy" not in compose["services"][consumers[0]], "no GPU for HTTP calls"


@pytest.mark.django_db
def test_redirects_are_not_followed(api_a, tenant_a, receiver):
    receiver.answers = [302]
    register(api_a, receiver.url)
    announce(tenant_a.org.id, SUCCEEDED, JOB)
    attempt_delivery(WebhookDelivery.objects.get())
    delivery = WebhookDelivery.objects.get()
    assert len(receiver.requests) == 1
    assert delivery.last_response_code == 302 and delivery.status == "pending"


@pytest.mark.django_db
def test_the_api_deletes_an_endpoint_with_its_deliveries(api_a, tenant_a, receiver):
    endpoint = register(api_a, receiver.url)
    announce(tenant_a.org.id, SUCCEEDED, JOB)
    response = api_a.delete(f"/v1/webhook_endpoints/{endpoint['id']}")
    assert response.json() == {
        "id": endpoint["id"],
        "object": "webhook_endpoint.deleted",
        "deleted": True,
    }
    assert not WebhookDelivery.objects.exists()
    paths = api_a.get("/v1/openapi.json", HTTP_ACCEPT="application/json").json()["paths"]
    assert "/v1/webhook_endpoints/{id}/deliveries" in paths


# --- through a real worker -------------------------------------------------------------------


@pytest.fixture
def webhook_worker(settings, tmp_path):
    """A worker of its own: quick retries, the 127.0.0.1 receiver allowed, a private queue."""
    settings.LOFT_WEBHOOK_QUEUE = f"webhooks-{time.monotonic_ns()}"
    worker = WorkerProcess(
        tmp_path,
        "webhooks",
        settings.LOFT_WEBHOOK_QUEUE,
        LOFT_WEBHOOK_QUEUE=settings.LOFT_WEBHOOK_QUEUE,
        LOFT_WEBHOOK_RETRY_DELAYS="1",
        LOFT_WEBHOOK_ALLOW_PRIVATE_URLS="true",
    ).start()
    yield worker
    worker.stop()


def wait_until_delivered(delivery: WebhookDelivery, worker: WorkerProcess) -> WebhookDelivery:
    return wait_for(
        delivery,
        lambda d: d.status != "pending",
        timeout=30,
        interval=0.2,
        what="the delivery",
        explain=lambda d: f"still pending: {d.attempts_log}\n{worker.output()}",
    )


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_a_worker_delivers_on_commit_retries_with_backoff_and_recovers_lost_messages(
    webhook_worker, api_a, tenant_a, receiver
):
    secret = register(api_a, receiver.url)["signing_secret"]
    receiver.answers = [500, 200]
    with transaction.atomic():
        announce(tenant_a.org.id, SUCCEEDED, JOB)
    delivery = wait_until_delivered(WebhookDelivery.objects.get(), webhook_worker)

    assert delivery.status == "succeeded"
    assert [a["response_code"] for a in delivery.attempts_log] == [500, 200]
    first, second = receiver.requests
    assert second.at - first.at >= 1, "the retry waited for its backoff"
    assert openai_unwrap(second, secret).type == SUCCEEDED

    # A delivery whose message was lost (say the broker restarted) is found and sent again.
    lost = WebhookDelivery.objects.create(
        org=tenant_a.org,
        endpoint=delivery.endpoint,
        event_id="evt-lost",
        event_type=FAILED,
        payload={**delivery.payload, "id": "evt-lost", "type": FAILED},
        next_attempt_at=timezone.now() - timedelta(minutes=5),
    )
    assert send_overdue() == 1
    assert wait_until_delivered(lost, webhook_worker).status == "succeeded"
    assert openai_unwrap(receiver.requests[-1], secret).type == FAILED
