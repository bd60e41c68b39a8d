"""Signed webhooks to a real HTTP server, verified with the `standardwebhooks` package."""

from __future__ import annotations

import base64
import json
import os
import secrets
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from producer.client import Client
from producer.contract import InvalidParameter, JobState
from producer.status import StatusStore
from tests.integration.conftest import SMALL, SVDQ
from worker.settings import WorkerSettings
from worker.webhooks import notify, sender_for

pytestmark = pytest.mark.integration


class Receiver:
    """Records every POST; answers 503 to the first `fail_first` of them; with `hold`, answers only once
    `release` is set."""

    def __init__(self, fail_first: int = 0, hold: bool = False):
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.fail_first, self.answered = fail_first, 0
        self.release = threading.Event()
        if not hold:
            self.release.set()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                receiver.requests.append((dict(self.headers), body))
                receiver.release.wait(300)
                status = 503 if len(receiver.requests) <= receiver.fail_first else 204
                self.send_response(status)
                self.end_headers()
                receiver.answered += 1

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/svdq"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def events(self, count: int, timeout: float = 60) -> list[tuple[dict[str, str], bytes]]:
        deadline = time.monotonic() + timeout
        while len(self.requests) < count:
            assert time.monotonic() < deadline, f"got {len(self.requests)} of {count} webhook calls"
            time.sleep(0.05)
        return self.requests


SECRET = "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()


@pytest.fixture
def hooks_env(svdq_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    for name, value in {"SVDQ_WEBHOOK_SECRET": SECRET, "SVDQ_WEBHOOK_ALLOW_PRIVATE": "1"}.items():
        monkeypatch.setitem(svdq_env, name, value)
        monkeypatch.setenv(name, value)
    yield svdq_env


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def test_started_and_succeeded_arrive_signed(
    hooks_env: dict[str, str], start_worker: Any, receiver: Receiver, image_file: Path
) -> None:
    fresh = start_worker()
    with Client.from_env(queue=fresh.queue) as client:
        record = client.submit(image_file, **SMALL, webhook=receiver.url).wait(timeout=120)
    assert record.state is JobState.SUCCEEDED
    calls = receiver.events(2)
    payloads = [Webhook(SECRET).verify(body, headers) for headers, body in calls]
    assert [p["type"] for p in payloads] == ["job.started", "job.succeeded"]
    assert payloads[1]["data"]["id"] == record.id and payloads[1]["data"]["result"]["key"] == record.result.key
    assert len({headers["webhook-id"] for headers, _ in calls}) == 2
    wrong = "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()
    for headers, body in calls:
        with pytest.raises(WebhookVerificationError):
            Webhook(wrong).verify(body, headers)
    # The secret never travels: not in the call, not in the record.
    assert all(SECRET not in json.dumps(headers) + body.decode() for headers, body in calls)


def test_a_failing_endpoint_is_retried_with_the_same_message_id(
    hooks_env: dict[str, str], start_worker: Any, image_file: Path
) -> None:
    flaky = Receiver(fail_first=2)
    try:
        fresh = start_worker()
        with Client.from_env(queue=fresh.queue) as client:
            first = client.submit(image_file, **SMALL, webhook=flaky.url).wait(timeout=120)
        assert first.state is JobState.SUCCEEDED
        calls = flaky.events(4)  # 503, 503, then delivered; then the succeeded event
        ids = [headers["webhook-id"] for headers, _ in calls]
        assert ids[0] == ids[1] == ids[2] != ids[3]  # the same message, retried
    finally:
        flaky.close()


def test_an_endpoint_that_never_answers_delays_no_render(
    hooks_env: dict[str, str], start_worker: Any, image_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The endpoint holds every call until both jobs have succeeded, and the worker waits up to 120 s for an
    # answer: a sender on the render path would hold the first job (and the second behind it) past the waits.
    for name, value in {"SVDQ_WEBHOOK_TIMEOUT": "120", "SVDQ_WEBHOOK_MAX_ATTEMPTS": "1"}.items():
        monkeypatch.setitem(hooks_env, name, value)
        monkeypatch.setenv(name, value)
    held = Receiver(hold=True)
    try:
        fresh = start_worker()
        with Client.from_env(queue=fresh.queue) as client:
            first = client.submit(image_file, **SMALL, webhook=held.url)
            second = client.submit(image_file, **SMALL)
            records = first.wait(timeout=60), second.wait(timeout=60)
        assert [r.state for r in records] == [JobState.SUCCEEDED, JobState.SUCCEEDED]
        assert held.requests and held.answered == 0  # called, and still not answered
    finally:
        held.release.set()
        held.close()


def test_a_slow_endpoint_holds_up_no_other_job_s_webhooks_and_is_cut_off_at_the_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Endpoints are submitters': one that answers a byte every second (each read's timeout never fires) must not
    delay anyone else's events, nor hold a sender for longer than SVDQ_WEBHOOK_TIMEOUT."""
    import socket

    from worker import webhooks
    from worker.webhooks import WebhookSender

    real_post = webhooks.post

    def post(delivery: Any, *args: Any, **kwargs: Any) -> int:  # a seam: a bug no endpoint can provoke
        if delivery.msg_id == "broken.started.1":
            raise RuntimeError("a bug in the sender")
        return real_post(delivery, *args, **kwargs)

    monkeypatch.setattr(webhooks, "post", post)
    drip = socket.create_server(("127.0.0.1", 0))
    dripped = threading.Event()

    def serve_slowly() -> None:
        conn, _ = drip.accept()
        with conn:
            conn.recv(65536)
            for byte in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 60:
                try:
                    conn.sendall(bytes([byte]))
                except OSError:  # the sender hung up: its timeout
                    dripped.set()
                    return
                time.sleep(1)

    threading.Thread(target=serve_slowly, daemon=True).start()
    fast = Receiver()
    sender = WebhookSender(SECRET, allow_private=True, timeout=3, max_attempts=1, senders=1)
    several = WebhookSender(SECRET, allow_private=True, timeout=3, max_attempts=1)
    try:
        started = time.monotonic()
        sender.send(f"http://127.0.0.1:{drip.getsockname()[1]}/slow", "job.succeeded", "slow.1", {})
        sender.send(fast.url, "job.succeeded", "fast.1", {})
        fast.events(1, timeout=20)
        # One sender thread: the fast call waited for the slow one's cut-off (3 s), not for its 60 s of bytes.
        assert time.monotonic() - started < 10
        assert dripped.wait(10)
        # Several: a sender that meets a bug goes on, and a slow endpoint holds up nobody else's calls.
        threading.Thread(target=serve_slowly, daemon=True).start()
        started = time.monotonic()
        several.send("http://127.0.0.1:1/a", "job.started", "broken.started.1", {})  # see the patched post
        several.send(f"http://127.0.0.1:{drip.getsockname()[1]}/slow", "job.succeeded", "slow2.succeeded.1", {})
        several.send(fast.url, "job.succeeded", "fast2.succeeded.1", {})
        several.send(fast.url, "job.succeeded", "broken.succeeded.1", {})  # after the broken job's first event
        fast.events(3, timeout=20)
        assert time.monotonic() - started < 2.5  # before the slow call's cut-off
        # The broken job's next event went once its first was given up (the sender thread lived on).
        assert {h["webhook-id"] for h, _ in fast.requests[1:]} == {"fast2.succeeded.1", "broken.succeeded.1"}
    finally:
        sender.close(timeout=5)
        several.close(timeout=5)
        fast.close()
        drip.close()


def test_a_job_revoked_while_queued_is_announced_once(
    hooks_env: dict[str, str], start_worker: Any, celery_control: Any, receiver: Receiver, image_file: Path
) -> None:
    """Flower's Revoke on a queued job: the worker that cancels it says so at once; when its message comes up
    later, the worker that drops it does not say it again."""
    fresh = start_worker()
    later = f"later-{uuid.uuid4().hex[:8]}"  # nobody reads it yet
    with Client.from_env(queue=later) as client:
        job = client.submit(image_file, webhook=receiver.url, **SMALL)
        celery_control.control.revoke(job.id, destination=[fresh.hostname], reply=True, timeout=10)
        assert job.status().state is JobState.CANCELED
        [(headers, body)] = receiver.events(1)
        assert Webhook(SECRET).verify(body, headers)["type"] == "job.canceled"
        celery_control.control.add_consumer(later, destination=[fresh.hostname], reply=True, timeout=10)
        deadline = time.monotonic() + 60
        while f"job {job.id} not run" not in fresh.log_text():  # its message came up and was dropped
            assert time.monotonic() < deadline, fresh.log_text()[-3000:]
            time.sleep(0.2)
    time.sleep(1)  # a second announcement would be on its way by now
    assert len(receiver.requests) == 1


def test_private_webhook_urls_are_refused_at_submit(svdq_env: dict[str, str], image_file: Path) -> None:
    assert os.environ.get("SVDQ_WEBHOOK_ALLOW_PRIVATE") is None
    with Client.from_env() as client:
        for url in ("http://127.0.0.1:9/x", "http://10.0.0.1/x", "ftp://example.com/x", "http://[::1]/x"):
            with pytest.raises(InvalidParameter) as err:
                client.submit(image_file, **SMALL, webhook=url)
            assert err.value.param == "webhook"


def test_a_webhook_the_worker_s_address_guard_stops_is_said_on_the_job(client: Client) -> None:
    """A producer allowed private webhooks (SVDQ_WEBHOOK_ALLOW_PRIVATE on its side), the worker not: the worker
    called nothing, and the job said nothing of why (its webhook_error stayed empty)."""
    settings = WorkerSettings(webhook_secret=SECRET, webhook_allow_private=False)
    status = StatusStore(client.redis, result_ttl=60)
    job_id = uuid.uuid4().hex
    status.create(job_id, {"image": "inputs/x.png"}, webhook="http://127.0.0.1:9/hooks")
    status.claim(job_id, "test/1", lease_seconds=60)
    sender = sender_for(settings, status)
    try:
        notify(status, sender, job_id)
        deadline = time.monotonic() + 30
        while (why := status.get(job_id).webhook_error) is None:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        sender.close()
    assert why.startswith("not called: ") and "non-public address (127.0.0.1)" in why
    assert "SVDQ_WEBHOOK_ALLOW_PRIVATE" in why


def test_a_webhook_the_worker_cannot_sign_is_said_on_the_job(
    svdq_env: dict[str, str], monkeypatch: pytest.MonkeyPatch, worker: Any, receiver: Receiver, image_file: Path
) -> None:
    assert "SVDQ_WEBHOOK_SECRET" not in svdq_env  # the session's worker has nothing to sign with
    monkeypatch.setenv("SVDQ_WEBHOOK_ALLOW_PRIVATE", "1")  # the receiver is on loopback
    with Client.from_env() as client:
        record = client.submit(image_file, webhook=receiver.url, **SMALL).wait(timeout=120)
    assert record.state is JobState.SUCCEEDED and receiver.requests == []
    assert record.webhook_error is not None and "SVDQ_WEBHOOK_SECRET" in record.webhook_error
    shown = subprocess.run([SVDQ, "status", record.id], env=svdq_env, capture_output=True, text=True, timeout=30)
    assert "webhook  not called: the worker has no SVDQ_WEBHOOK_SECRET" in shown.stdout, shown
