"""Webhooks: tell a tenant's endpoints when its jobs end, signed the way OpenAI signs its own.

Signatures follow Standard Webhooks, the scheme of OpenAI's webhooks, so a receiver checks
Loft's deliveries with the official client unchanged,
``openai.OpenAI().webhooks.unwrap(body, headers, secret="whsec_…")``:
``webhook-signature: v1,<base64 HMAC-SHA256 of "{webhook-id}.{webhook-timestamp}.{body}">``,
keyed with the base64-decoded part of the secret after ``whsec_``.

``announce`` records one delivery per subscribed endpoint and hints a worker; the worker's
``attempt_delivery`` claims the row, POSTs once and records the outcome. Failed attempts are
retried after ``LOFT_WEBHOOK_RETRY_DELAYS``; when those run out, the delivery has failed.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.client
import ipaddress
import json
import logging
import socket
import ssl
import time
from datetime import timedelta
from functools import partial
from urllib.parse import urlsplit

from django.conf import settings
from django.db import transaction
from django.utils import timezone
from kombu.exceptions import OperationalError

from loft.celery import app as celery_app
from loft.ids import make_id
from loft.models import JOB_EVENTS, WEBHOOK_SECRET_PREFIX, WebhookDelivery, WebhookEndpoint

__all__ = ["JOB_EVENTS", "announce", "attempt_delivery", "check_url", "sign"]

logger = logging.getLogger(__name__)

USER_AGENT = "Loft-Webhooks/1"
# Enough of a receiver's answer to debug it with; the rest is neither read nor kept.
RESPONSE_SNIPPET_BYTES = 200
# A pending delivery this far past due lost its message (broker restart, dead worker).
OVERDUE_GRACE = timedelta(minutes=1)


class UnsafeWebhookURL(ValueError):
    """A URL Loft will not call: not http(s), unresolvable, or an address inside the network."""


def sign(secret: str, message_id: str, timestamp: str, body: bytes) -> str:
    """The ``webhook-signature`` header value for one message."""
    key = base64.b64decode(secret.removeprefix(WEBHOOK_SECRET_PREFIX))
    signed = f"{message_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


def check_url(url: str) -> list[str]:
    """The addresses ``url`` may be sent to; raises ``UnsafeWebhookURL`` where it may not.

    Unless ``LOFT_WEBHOOK_ALLOW_PRIVATE_URLS`` is set, a host that resolves to any loopback,
    private, link-local or otherwise non-public address is refused, so that a tenant cannot
    make Loft's workers call services inside Loft's own network.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UnsafeWebhookURL("A webhook URL must start with http:// or https:// and name a host.")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
        infos = socket.getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM)
    except ValueError:
        raise UnsafeWebhookURL("The webhook URL's port is not a number from 1 to 65535.") from None
    except socket.gaierror as exc:
        raise UnsafeWebhookURL(
            f"The host {parts.hostname} does not resolve ({exc.strerror})."
        ) from None
    addresses = list(dict.fromkeys(info[4][0] for info in infos))
    if not settings.LOFT_WEBHOOK_ALLOW_PRIVATE_URLS:
        for address in addresses:
            if not ipaddress.ip_address(address).is_global:
                raise UnsafeWebhookURL(
                    f"The host {parts.hostname} resolves to {address}, which is not a public "
                    "address; webhooks are sent only to public addresses."
                )
    return addresses


class PinnedConnection(http.client.HTTPConnection):
    """Connects to the address that passed ``check_url``, not to whatever DNS says next.

    The Host header and the TLS server name stay the URL's host, so certificates are still
    checked against the name the tenant registered.
    """

    def __init__(self, host: str, port: int, *, address: str, timeout: float, tls: bool):
        super().__init__(host, port, timeout=timeout)
        self.address = address
        self.tls_context = ssl.create_default_context() if tls else None

    def connect(self) -> None:
        sock = socket.create_connection((self.address, self.port), self.timeout)
        if self.tls_context is not None:
            sock = self.tls_context.wrap_socket(sock, server_hostname=self.host)
        self.sock = sock


def post(url: str, body: bytes, headers: dict[str, str], timeout: float) -> tuple[int, str]:
    """One POST, redirects not followed; the status and the start of the response body."""
    address = check_url(url)[0]
    parts = urlsplit(url)
    tls = parts.scheme == "https"
    connection = PinnedConnection(
        parts.hostname or "",
        parts.port or (443 if tls else 80),
        address=address,
        timeout=timeout,
        tls=tls,
    )
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    try:
        connection.request("POST", path, body=body, headers=headers)
        response = connection.getresponse()
        return response.status, response.read(RESPONSE_SNIPPET_BYTES).decode(errors="replace")
    finally:
        connection.close()


def send(delivery: WebhookDelivery) -> dict:
    """POST the delivery's event once, freshly signed; the outcome, as the attempts log keeps it."""
    body = json.dumps(delivery.payload, separators=(",", ":")).encode()
    timestamp = str(int(time.time()))
    headers = {
        "content-type": "application/json",
        "user-agent": USER_AGENT,
        # The same id on every retry, so that a receiver can drop a duplicate.
        "webhook-id": delivery.id,
        "webhook-timestamp": timestamp,
        "webhook-signature": sign(delivery.endpoint.secret, delivery.id, timestamp, body),
    }
    code, error, response = None, "", ""
    started = time.monotonic()
    try:
        code, response = post(
            delivery.endpoint.url, body, headers, settings.LOFT_WEBHOOK_TIMEOUT_SECONDS
        )
    except UnsafeWebhookURL as exc:
        error = str(exc)
    except (OSError, http.client.HTTPException) as exc:
        error = f"No response from the endpoint: {exc or type(exc).__name__}."
    else:
        if not 200 <= code < 300:
            error = f"The endpoint answered HTTP {code}; only 2xx counts as delivered."
    return {
        "at": int(time.time()),
        "response_code": code,
        "error": error,
        "duration_ms": round((time.monotonic() - started) * 1000),
        "response": response,
    }


def attempt_delivery(delivery: WebhookDelivery) -> float | None:
    """Send the delivery if it is due and nobody else is sending it.

    Returns the seconds until its next attempt, or None when there is none to schedule: it
    succeeded, gave up, was not due or was claimed by another worker.
    """
    timeout = settings.LOFT_WEBHOOK_TIMEOUT_SECONDS
    if not delivery.claim(lease=timedelta(seconds=4 * timeout + 30)):
        return None
    delivery.refresh_from_db()
    delivery.record_attempt(send(delivery), settings.LOFT_WEBHOOK_RETRY_DELAYS)
    if delivery.status != WebhookDelivery.Status.PENDING:
        return None
    return max(0.0, (delivery.next_attempt_at - timezone.now()).total_seconds())


def enqueue(delivery_id: str, countdown: float | None = None) -> None:
    """Hint a worker to attempt a delivery. If the broker is down, ``send_overdue`` hints later."""
    try:
        celery_app.send_task(
            "worker.tasks.deliver_webhook",
            args=[delivery_id],
            countdown=countdown,
            queue=settings.LOFT_WEBHOOK_QUEUE,
        )
    except OperationalError as exc:
        logger.warning("webhook delivery %s not queued, the sweep will retry: %s", delivery_id, exc)


def send_overdue() -> int:
    """Hint again the pending deliveries whose message was lost; how many there were."""
    overdue = WebhookDelivery.objects.filter(
        status=WebhookDelivery.Status.PENDING,
        next_attempt_at__lte=timezone.now() - OVERDUE_GRACE,
    ).values_list("pk", flat=True)
    delivery_ids = list(overdue[:1000])
    for delivery_id in delivery_ids:
        enqueue(delivery_id)
    return len(delivery_ids)


def announce(org_id: str, event_type: str, data: dict) -> None:
    """Queue an event for every enabled endpoint of the org that subscribed to its type.

    ``data`` is the JSON-ready object the event is about, e.g. the job as the API shows it.
    Call this inside the transaction that changed the job: workers hear of the deliveries only
    once it commits, and nothing is sent for a change that was rolled back.
    """
    if event_type not in JOB_EVENTS:
        raise ValueError(f"Unknown webhook event type {event_type!r}; known: {JOB_EVENTS}.")
    event = {
        "id": make_id("evt"),
        "object": "event",
        "type": event_type,
        "created_at": int(time.time()),
        "data": data,
    }
    endpoints = WebhookEndpoint.objects.filter(
        org_id=org_id, enabled=True, event_types__contains=[event_type]
    )
    for endpoint in endpoints:
        delivery = WebhookDelivery.objects.create(
            org_id=org_id,
            endpoint=endpoint,
            event_id=event["id"],
            event_type=event_type,
            payload=event,
        )
        transaction.on_commit(partial(enqueue, delivery.id))
