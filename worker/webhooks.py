"""Signed webhook deliveries (Standard Webhooks), from a thread of their own.

A job's `started` and terminal events are queued here; the sender POSTs them, signed with HMAC-SHA256
under SVDQ_WEBHOOK_SECRET (`whsec_<base64>`), so receivers verify with any Standard Webhooks library.
5xx, 429 and network errors are retried with backoff; the render never waits on a slow endpoint, and
a full queue drops the event (logged) rather than block the GPU. Deliveries not yet made when the
process dies are lost: webhooks are notifications, the record in Redis is the truth.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.client
import json
import logging
import queue
import random
import threading
import time
from dataclasses import dataclass

from producer.contract import JobRecord
from producer.netguard import UnsafeURL, check_url, connect
from producer.status import StatusStore
from worker.backoff import backoff
from worker.settings import WorkerSettings

log = logging.getLogger(__name__)


def signature(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` header: `v1,` and the base64 HMAC-SHA256 of `{id}.{timestamp}.{body}`."""
    key = base64.b64decode(secret.removeprefix("whsec_") + "==")
    digest = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


@dataclass(frozen=True)
class Delivery:
    url: str
    msg_id: str
    body: bytes


def post(delivery: Delivery, secret: str, *, allow_private: bool, timeout: float) -> int:
    """One signed POST; returns the HTTP status. Redirects are not followed."""
    target = check_url(delivery.url, allow_private=allow_private)
    timestamp = int(time.time())
    headers = {
        "content-type": "application/json",
        "user-agent": "svdq-webhooks",
        "webhook-id": delivery.msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signature(secret, delivery.msg_id, timestamp, delivery.body),
    }
    conn = connect(target, timeout)
    try:
        conn.request("POST", target.path, body=delivery.body, headers=headers)
        return conn.getresponse().status
    finally:
        conn.close()


def _worth_retrying(status: int) -> bool:
    return status >= 500 or status == 429


class WebhookSender:
    def __init__(
        self,
        secret: str | None,
        *,
        allow_private: bool,
        timeout: float = 10.0,
        max_attempts: int = 5,
        backoff_base: float = 1.0,
        capacity: int = 1000,
    ):
        self.secret, self.allow_private, self.timeout = secret, allow_private, timeout
        self.max_attempts, self.backoff_base = max_attempts, backoff_base
        self._queue: queue.Queue[Delivery | None] = queue.Queue(maxsize=capacity)
        self._thread = threading.Thread(target=self._run, name="svdq-webhooks", daemon=True)
        self._thread.start()

    def send(self, url: str, event_type: str, msg_id: str, data: dict) -> None:
        """Queue an event; never blocks."""
        if not self.secret:
            log.error("job webhook %s not sent: SVDQ_WEBHOOK_SECRET is not set on this worker", event_type)
            return
        body = json.dumps(
            {"type": event_type, "timestamp": data.get("finished_at") or data.get("started_at"), "data": data},
            separators=(",", ":"),
        ).encode()
        try:
            self._queue.put_nowait(Delivery(url, msg_id, body))
        except queue.Full:
            log.error("webhook queue full: dropped %s", msg_id)

    def close(self, timeout: float = 30.0) -> None:
        """Deliver what is queued (within `timeout`), then stop."""
        self._queue.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        while (delivery := self._queue.get()) is not None:
            self._deliver(delivery)

    def _deliver(self, delivery: Delivery) -> None:
        assert self.secret is not None
        for attempt in range(1, self.max_attempts + 1):
            try:
                status = post(delivery, self.secret, allow_private=self.allow_private, timeout=self.timeout)
            except UnsafeURL as exc:
                log.error("webhook %s refused: %s", delivery.msg_id, exc)
                return
            except (OSError, http.client.HTTPException) as exc:
                status, reason = 0, type(exc).__name__
            else:
                reason = f"HTTP {status}"
                if 200 <= status < 300:
                    return
                if not _worth_retrying(status):
                    log.warning("webhook %s rejected: %s", delivery.msg_id, reason)
                    return
            if attempt < self.max_attempts:
                delay = backoff(attempt, self.backoff_base, 60.0, random.random())
                log.warning("webhook %s failed (%s); retrying in %.1fs", delivery.msg_id, reason, delay)
                time.sleep(delay)
        log.error("webhook %s given up after %d attempts", delivery.msg_id, self.max_attempts)


def sender_for(settings: WorkerSettings) -> WebhookSender:
    secret = settings.webhook_secret.get_secret_value() if settings.webhook_secret else None
    return WebhookSender(
        secret,
        allow_private=settings.webhook_allow_private,
        timeout=settings.webhook_timeout,
        max_attempts=settings.webhook_max_attempts,
    )


def notify(status: StatusStore, sender: WebhookSender | None, job_id: str) -> None:
    """Queue the job's webhook for its current state, if it asked for one (sent off the caller's thread)."""
    notify_record(sender, status.get(job_id))


def notify_record(sender: WebhookSender | None, record: JobRecord) -> None:
    if record.webhook and sender is not None:
        event = f"job.{record.state.value}"
        msg_id = f"{record.id}.{record.state.value}.{record.attempts}"
        sender.send(record.webhook, event, msg_id, record.to_json_dict())
