"""Signed webhook deliveries (Standard Webhooks), from a thread of their own.

A job's `started` and terminal events are queued here; a few sender threads POST them, signed with HMAC-SHA256
under SVDQ_WEBHOOK_SECRET (`whsec_<base64>`), so receivers verify with any Standard Webhooks library.
5xx, 429 and network errors are retried with backoff; the render never waits on a slow endpoint, and
a full queue drops the event (logged) rather than block the GPU. Endpoints are the job submitters', so one
must not hold up the others: each POST ends within SVDQ_WEBHOOK_TIMEOUT however slowly its endpoint answers,
and a retry waits in a schedule, not in a sender thread. A job's events still go in order: each waits for the
one before it to be delivered or given up. Deliveries not yet made when the process dies are
lost: webhooks are notifications, the record in Redis is the truth.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import hashlib
import heapq
import hmac
import http.client
import itertools
import json
import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import redis

from producer.contract import JobRecord
from producer.netguard import PrivateAddress, Stopped, UnsafeURL, Watch, check_url, connect, watched
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

    @property
    def job(self) -> str:
        return self.msg_id.split(".", 1)[0]  # ids are JOB.STATE.ATTEMPTS (notify_record)


def post(delivery: Delivery, secret: str, *, allow_private: bool, timeout: float) -> int:
    """One signed POST, over within `timeout` seconds in all (Stopped past it); returns the HTTP status.
    Redirects are not followed."""
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
    watch = Watch(timeout, None)  # a byte every few seconds passes each read's timeout, not the watch's
    try:
        with watched(conn, watch):
            conn.request("POST", target.path, body=delivery.body, headers=headers)
            with contextlib.closing(conn.getresponse()) as response:
                return response.status
    finally:
        watch.close()


def _worth_retrying(status: int) -> bool:
    return status >= 500 or status == 429


@dataclass(order=True)
class _Due:
    at: float
    seq: int
    delivery: Delivery = field(compare=False)
    attempt: int = field(compare=False)


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
        senders: int = 4,
        refused: Callable[[str, str], None] = lambda job_id, why: None,
    ):
        self.secret, self.allow_private, self.timeout = secret, allow_private, timeout
        self.refused = refused  # a job's webhook the address guard stopped: said on the job (its webhook_error)
        self.max_attempts, self.backoff_base, self.capacity = max_attempts, backoff_base, capacity
        # Deliveries and retries, by when they are due: one schedule, read by every sender thread.
        self._due: list[_Due] = []
        self._behind: dict[str, collections.deque[Delivery]] = {}  # by job: its events after the one on its way
        self._seq = itertools.count()
        self._changed = threading.Condition()
        self._close_by: float | None = None
        self._threads = [
            threading.Thread(target=self._run, name=f"svdq-webhooks-{n}", daemon=True) for n in range(senders)
        ]
        for thread in self._threads:
            thread.start()

    def send(self, url: str, event_type: str, msg_id: str, data: dict) -> None:
        """Queue an event; never blocks."""
        if not self.secret:
            log.error("job webhook %s not sent: SVDQ_WEBHOOK_SECRET is not set on this worker", event_type)
            return
        body = json.dumps(
            {"type": event_type, "timestamp": data.get("finished_at") or data.get("started_at"), "data": data},
            separators=(",", ":"),
        ).encode()
        delivery = Delivery(url, msg_id, body)
        with self._changed:
            if self._pending() >= self.capacity:
                log.error("webhook queue full: dropped %s", msg_id)
            elif (behind := self._behind.get(delivery.job)) is not None:
                behind.append(delivery)
            else:
                self._behind[delivery.job] = collections.deque()
                self._schedule(delivery, 1, time.monotonic())

    def close(self, timeout: float = 30.0) -> None:
        """Deliver what is due within `timeout` (a retry due later is dropped), then stop."""
        close_by = time.monotonic() + timeout
        with self._changed:
            self._close_by = close_by
            self._changed.notify_all()
        for thread in self._threads:
            thread.join(max(0.0, close_by - time.monotonic()))
        with self._changed:
            if dropped := self._pending():
                log.warning("%d webhook deliveries not made at shutdown (retries due later, or held up)", dropped)

    def _pending(self) -> int:
        return len(self._due) + sum(len(behind) for behind in self._behind.values())

    def _schedule(self, delivery: Delivery, attempt: int, at: float) -> None:
        with self._changed:
            heapq.heappush(self._due, _Due(at, next(self._seq), delivery, attempt))
            self._changed.notify()

    def _done(self, delivery: Delivery) -> None:
        """Delivered or given up: the job's next event, if any, may go."""
        with self._changed:
            behind = self._behind.get(delivery.job)
            if behind:
                self._schedule(behind.popleft(), 1, time.monotonic())
            else:
                self._behind.pop(delivery.job, None)

    def _next(self) -> _Due | None:
        """The next delivery due, waiting for it; None once closing leaves nothing due in time."""
        with self._changed:
            while True:
                now = time.monotonic()
                if self._close_by is not None and (not self._due or self._due[0].at > self._close_by):
                    return None
                if self._due and self._due[0].at <= now:
                    return heapq.heappop(self._due)
                self._changed.wait(self._due[0].at - now if self._due else None)

    def _run(self) -> None:
        while (due := self._next()) is not None:
            try:
                retrying = self._attempt(due.delivery, due.attempt)
            except Exception:  # a sender that died would hold up every job's webhooks that wait behind it
                log.exception("webhook %s failed unexpectedly; not retried", due.delivery.msg_id)
                retrying = False
            if not retrying:
                self._done(due.delivery)

    def _attempt(self, delivery: Delivery, attempt: int) -> bool:
        """One POST; True when a retry is scheduled."""
        assert self.secret is not None
        try:
            status = post(delivery, self.secret, allow_private=self.allow_private, timeout=self.timeout)
        except UnsafeURL as exc:
            log.error("webhook %s refused: %s", delivery.msg_id, exc)
            hint = " (SVDQ_WEBHOOK_ALLOW_PRIVATE on the worker allows it)" if isinstance(exc, PrivateAddress) else ""
            self.refused(delivery.job, f"not called: {exc}{hint}")
            return False
        except (OSError, http.client.HTTPException) as exc:
            reason = f"{type(exc).__name__}: {exc}" if isinstance(exc, Stopped) else type(exc).__name__
        else:
            reason = f"HTTP {status}"
            if 200 <= status < 300:
                return False
            if not _worth_retrying(status):
                log.warning("webhook %s rejected: %s", delivery.msg_id, reason)
                return False
        if attempt >= self.max_attempts:
            log.error("webhook %s given up after %d attempts (%s)", delivery.msg_id, attempt, reason)
            return False
        delay = backoff(attempt, self.backoff_base, 60.0, random.random())
        log.warning("webhook %s failed (%s); retrying in %.1fs", delivery.msg_id, reason, delay)
        self._schedule(delivery, attempt + 1, time.monotonic() + delay)
        return True


def sender_for(settings: WorkerSettings, status: StatusStore | None = None) -> WebhookSender:
    secret = settings.webhook_secret.get_secret_value() if settings.webhook_secret else None

    def refused(job_id: str, why: str) -> None:
        if status is None:
            return
        try:
            status.update(job_id, webhook_error=why)  # while the job runs: its first event is the one refused
        except redis.RedisError as exc:
            log.warning("job %s: could not record why its webhook was not called: %s", job_id, exc)

    return WebhookSender(
        secret,
        allow_private=settings.webhook_allow_private,
        timeout=settings.webhook_timeout,
        max_attempts=settings.webhook_max_attempts,
        refused=refused,
    )


def notify(status: StatusStore, sender: WebhookSender | None, job_id: str) -> None:
    """Queue the job's webhook for its current state, if it asked for one (sent off the caller's thread)."""
    notify_record(sender, status.get(job_id))


def notify_record(sender: WebhookSender | None, record: JobRecord) -> None:
    if record.webhook and sender is not None:
        event = f"job.{record.state.value}"
        msg_id = f"{record.id}.{record.state.value}.{record.attempts}"
        sender.send(record.webhook, event, msg_id, record.to_json_dict())
