"""Webhooks: tell a tenant's endpoints when its jobs end, signed the way OpenAI signs its own.

Signatures follow Standard Webhooks, the scheme of OpenAI's webhooks, so a receiver checks
Loft's deliveries with the official client unchanged,
``openai.OpenAI().webhooks.unwrap(body, headers, secret="whsec_…")``:
``webhook-signature: v1,<base64 HMAC-SHA256 of "{webhook-id}.{webhook-timestamp}.{body}">``,
keyed with the base64-decoded part of the secret after ``whsec_``.

``announce`` records one delivery per subscribed endpoint and hints a worker; the worker's
``attempt_delivery`` claims the row, POSTs once and records the outcome. Failed attempts are
retried after ``LOFT_WEBHOOK_RETRY_DELAYS``; when those run out, the delivery has failed.

An attempt has ``LOFT_WEBHOOK_TIMEOUT_SECONDS`` in all, name lookup to the last byte read: a
socket timeout alone bounds each read, and a receiver that sends a byte every few seconds would
hold a worker for ever. Deliveries have a queue of their own (``LOFT_WEBHOOK_QUEUE``), so a slow
receiver never holds up training.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import http.client
import ipaddress
import json
import logging
import socket
import ssl
import threading
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
from loft.models import EVENTS, WEBHOOK_SECRET_PREFIX, WebhookDelivery, WebhookEndpoint

__all__ = ["EVENTS", "announce", "attempt_delivery", "check_url", "sign"]

logger = logging.getLogger(__name__)

USER_AGENT = "Loft-Webhooks/1"
# Enough of a receiver's answer to debug it with; the rest is neither read nor kept.
RESPONSE_SNIPPET_BYTES = 200
# A pending delivery this far past due lost its message (broker restart, dead worker).
OVERDUE_GRACE = timedelta(minutes=1)
# A host name that does not resolve in this long is refused (a resolver that never answers
# would otherwise hold a web request or a worker).
DNS_TIMEOUT_SECONDS = 5.0
# Celery's limits on the delivery task, past an attempt's own deadline: a backstop should the
# deadline fail. The claim's lease outlasts the hard limit, so that the overdue sweep never
# sends an event while an attempt at it may still be running.
TASK_SOFT_LIMIT_MARGIN_SECONDS = 15
TASK_HARD_LIMIT_MARGIN_SECONDS = 30
LEASE_MARGIN_SECONDS = 60

# IPv6 ranges that carry an IPv4 address in their last 32 bits; Python's ``is_global`` judges
# them by the IPv6 prefix alone, so 64:ff9b::127.0.0.1 passes as public.
NAT64_WELL_KNOWN = ipaddress.ip_network("64:ff9b::/96")
IPV4_COMPATIBLE = ipaddress.ip_network("::/96")
# RFC 8215's NAT64 prefix for local use: the IPv4 address may sit anywhere; none is public.
NAT64_LOCAL_USE = ipaddress.ip_network("64:ff9b:1::/48")


class UnsafeWebhookURL(ValueError):
    """A URL Loft will not call: not http(s), unresolvable, or an address inside the network."""


class DeliveryDeadlineExceeded(TimeoutError):
    """The receiver did not answer in full within the attempt's deadline."""


def sign(secret: str, message_id: str, timestamp: str, body: bytes) -> str:
    """The ``webhook-signature`` header value for one message."""
    key = base64.b64decode(secret.removeprefix(WEBHOOK_SECRET_PREFIX))
    signed = f"{message_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


def attempt_lease_seconds() -> int:
    """How long a claimed attempt keeps other workers off its delivery."""
    return settings.LOFT_WEBHOOK_TIMEOUT_SECONDS + LEASE_MARGIN_SECONDS


def embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one stands for (mapped, 6to4, NAT64, IPv4-compatible), if any."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address in NAT64_WELL_KNOWN or address in IPV4_COMPATIBLE:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def is_public(address: str) -> bool:
    """Whether ``address``, and the IPv4 address inside it if it carries one, is public."""
    ip = ipaddress.ip_address(address)
    if not ip.is_global:
        return False
    if isinstance(ip, ipaddress.IPv6Address):
        if ip in NAT64_LOCAL_USE:
            return False
        inner = embedded_ipv4(ip)
        return inner is None or inner.is_global
    return True


def resolve(host: str, port: int, timeout: float) -> list[str]:
    """The addresses of ``host``, or ``UnsafeWebhookURL`` when it does not resolve in time.

    getaddrinfo cannot be interrupted, so it runs in a daemon thread that is left behind
    when it is late: the caller goes on at the deadline, and the lookup ends when the
    resolver gives up.
    """
    outcome: dict = {}

    def lookup() -> None:
        try:
            outcome["infos"] = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError) as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=lookup, name=f"resolve {host}", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise UnsafeWebhookURL(f"The host {host} did not resolve within {timeout:g} seconds.")
    if "error" in outcome:
        reason = getattr(outcome["error"], "strerror", None) or outcome["error"]
        raise UnsafeWebhookURL(f"The host {host} does not resolve ({reason}).")
    return list(dict.fromkeys(info[4][0] for info in outcome["infos"]))


def check_url(url: str, timeout: float = DNS_TIMEOUT_SECONDS) -> list[str]:
    """The addresses ``url`` may be sent to; raises ``UnsafeWebhookURL`` where it may not.

    Unless ``LOFT_WEBHOOK_ALLOW_PRIVATE_URLS`` is set, a host that resolves to any loopback,
    private, link-local or otherwise non-public address is refused, IPv4 addresses wrapped in
    IPv6 ones included, so that a tenant cannot make Loft's workers call services inside Loft's
    own network. The name lookup gets ``timeout`` seconds.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UnsafeWebhookURL("A webhook URL must start with http:// or https:// and name a host.")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise UnsafeWebhookURL("The webhook URL's port is not a number from 1 to 65535.") from None
    addresses = resolve(parts.hostname, port, timeout)
    if not settings.LOFT_WEBHOOK_ALLOW_PRIVATE_URLS:
        for address in addresses:
            if not is_public(address):
                raise UnsafeWebhookURL(
                    f"The host {parts.hostname} resolves to {address}, which is not a public "
                    "address; webhooks are sent only to public addresses."
                )
    return addresses


class PinnedConnection(http.client.HTTPConnection):
    """Connects to the address that passed ``check_url``, not to whatever DNS says next.

    The Host header and the TLS server name stay the URL's host, so certificates are still
    checked against the name the tenant registered. ``abort`` (from another thread) shuts the
    socket, which wakes a read blocked on it.
    """

    def __init__(self, host: str, port: int, *, address: str, timeout: float, tls: bool):
        super().__init__(host, port, timeout=timeout)
        self.address = address
        self.tls_context = ssl.create_default_context() if tls else None
        self.aborted = False

    def connect(self) -> None:
        sock = socket.create_connection((self.address, self.port), self.timeout)
        if self.tls_context is not None:
            sock = self.tls_context.wrap_socket(sock, server_hostname=self.host)
        self.sock = sock
        if self.aborted:  # the deadline passed while connecting
            raise DeliveryDeadlineExceeded()

    def abort(self) -> None:
        self.aborted = True
        if self.sock is not None:
            # socket.socket's own shutdown: an SSLSocket's would drop its TLS state under the
            # thread reading from it. An error means the socket is already closed.
            with contextlib.suppress(OSError):
                socket.socket.shutdown(self.sock, socket.SHUT_RDWR)


def post(url: str, body: bytes, headers: dict[str, str], deadline: float) -> tuple[int, str]:
    """One POST, redirects not followed; the status and the start of the response body.

    The whole exchange, name lookup included, ends within ``deadline`` seconds, or raises
    ``DeliveryDeadlineExceeded``.
    """
    started = time.monotonic()
    address = check_url(url, timeout=min(DNS_TIMEOUT_SECONDS, deadline))[0]
    remaining = deadline - (time.monotonic() - started)
    if remaining <= 0:
        raise DeliveryDeadlineExceeded()
    parts = urlsplit(url)
    tls = parts.scheme == "https"
    connection = PinnedConnection(
        parts.hostname or "",
        parts.port or (443 if tls else 80),
        address=address,
        timeout=remaining,
        tls=tls,
    )
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    watchdog = threading.Timer(remaining, connection.abort)
    watchdog.daemon = True
    watchdog.start()
    try:
        connection.request("POST", path, body=body, headers=headers)
        response = connection.getresponse()
        snippet = response.read(RESPONSE_SNIPPET_BYTES).decode(errors="replace")
    except (OSError, http.client.HTTPException):
        # The socket's own timeout (the time left) may fire just before the watchdog.
        if connection.aborted or time.monotonic() - started >= deadline:
            raise DeliveryDeadlineExceeded() from None
        raise
    finally:
        watchdog.cancel()
        connection.close()
    if connection.aborted:  # the read ended early because the socket was shut
        raise DeliveryDeadlineExceeded()
    return response.status, snippet


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
    deadline = settings.LOFT_WEBHOOK_TIMEOUT_SECONDS
    try:
        code, response = post(delivery.endpoint.url, body, headers, deadline)
    except UnsafeWebhookURL as exc:
        error = str(exc)
    except DeliveryDeadlineExceeded:
        error = f"The endpoint did not answer in full within {deadline} seconds."
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
    if not delivery.claim(lease=timedelta(seconds=attempt_lease_seconds())):
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
    if event_type not in EVENTS:
        raise ValueError(f"Unknown webhook event type {event_type!r}; known: {EVENTS}.")
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
