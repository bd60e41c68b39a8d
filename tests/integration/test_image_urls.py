"""http(s) image URLs through the SSRF guard, against real HTTP servers on loopback.

127.0.0.2 stands in for a public host (the guard is told so through its `public` predicate): its
redirects to 127.0.0.1, a private address, must be refused at the hop, never followed.
"""

from __future__ import annotations

import io
import socket
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from producer.client import Client
from producer.contract import ErrorCode, InvalidParameter, JobState
from producer.netguard import BadResponse, HTTPFailure, Stopped, TooLarge, UnsafeURL, fetch
from producer.storage import FileStore
from tests.integration.conftest import SMALL, wait_until
from worker.errors import JobFailed
from worker.inputs import fetch_image

pytestmark = pytest.mark.integration
PNG = io.BytesIO()
Image.new("RGB", (64, 64), (250, 150, 30)).save(PNG, format="PNG")
IMAGE = PNG.getvalue()


class Site:
    """A tiny web server: path -> (status, headers, body)."""

    def __init__(self, host: str, routes: dict[str, tuple[int, dict[str, str], bytes]]):
        site = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                status, headers, body = site.routes.get(self.path, (404, {}, b"not found"))
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.routes = routes
        self.server = ThreadingHTTPServer((host, 0), Handler)
        self.base = f"http://{host}:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def private() -> Iterator[Site]:
    site = Site("127.0.0.1", {"/img.png": (200, {"content-length": str(len(IMAGE))}, IMAGE), "/busy": (503, {}, b"")})
    yield site
    site.close()


@pytest.fixture
def public(private: Site) -> Iterator[Site]:
    site = Site("127.0.0.2", {})
    site.routes.update(
        {
            "/img.png": (200, {"content-length": str(len(IMAGE))}, IMAGE),
            "/to-private": (302, {"location": f"{private.base}/img.png"}, b""),
            "/to-public": (301, {"location": "/img.png"}, b""),
            "/loop": (302, {"location": "/loop"}, b""),
            "/big": (200, {}, b"x" * 50_000),  # no length declared: the cap must hold while streaming
            "/big-declared": (200, {"content-length": "50000"}, b"x" * 50_000),
        }
    )
    yield site
    site.close()


def pretend_public(address: str) -> bool:
    return address == "127.0.0.2"


def test_a_public_host_is_fetched_and_its_redirects_followed(public: Site) -> None:
    assert fetch(f"{public.base}/img.png", max_bytes=10**6, public=pretend_public) == IMAGE
    assert fetch(f"{public.base}/to-public", max_bytes=10**6, public=pretend_public) == IMAGE


def test_a_redirect_to_a_private_address_is_refused(public: Site) -> None:
    with pytest.raises(UnsafeURL, match="non-public"):
        fetch(f"{public.base}/to-private", max_bytes=10**6, public=pretend_public)


@pytest.mark.parametrize("host", ["127.0.0.1", "[::ffff:127.0.0.1]", "localhost"])
def test_loopback_in_any_spelling_is_refused(private: Site, host: str) -> None:
    port = private.base.rsplit(":", 1)[1]
    with pytest.raises(UnsafeURL):
        fetch(f"http://{host}:{port}/img.png", max_bytes=10**6)


def test_size_is_capped_while_streaming_and_redirect_loops_end(public: Site) -> None:
    for path in ("/big", "/big-declared"):
        with pytest.raises(TooLarge):
            fetch(f"{public.base}{path}", max_bytes=10_000, public=pretend_public)
    with pytest.raises(HTTPFailure, match="redirects"):
        fetch(f"{public.base}/loop", max_bytes=10_000, public=pretend_public)


def test_a_worker_renders_from_a_url_when_private_urls_are_allowed(
    svdq_env: dict[str, str], start_worker: Any, private: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"{private.base}/img.png"
    with Client.from_env() as client, pytest.raises(InvalidParameter) as err:
        client.submit(url, **SMALL)  # loopback, not allowed by default
    assert err.value.param == "image"

    monkeypatch.setitem(svdq_env, "SVDQ_ALLOW_PRIVATE_URLS", "1")
    monkeypatch.setenv("SVDQ_ALLOW_PRIVATE_URLS", "1")
    fresh = start_worker(env={"SVDQ_RETRY_BACKOFF": "0.2"})
    with Client.from_env(queue=fresh.queue) as client:
        record = client.submit(url, **SMALL).wait(timeout=120)
        missing = client.submit(f"{private.base}/nothing.png", **SMALL).wait(timeout=120)
        # A host answering 503 is retried, never waited for (SVDQ_FETCH_WAIT is for the store): 3 quick attempts.
        busy = client.submit(f"{private.base}/busy", **SMALL).wait(timeout=30)
    assert record.state is JobState.SUCCEEDED, record.error
    assert missing.state is JobState.FAILED and missing.error is not None
    assert missing.error.code == "invalid_input" and "HTTP 404" in missing.error.message
    assert busy.state is JobState.FAILED and busy.error is not None and busy.attempts == 3
    assert busy.error.code == "storage_unavailable" and "503" in busy.error.message


def test_the_worker_refuses_private_urls_it_was_not_allowed(
    svdq_env: dict[str, str], start_worker: Any, private: Site, tmp_path: Path
) -> None:
    fresh = start_worker()
    with Client.from_env(queue=fresh.queue, allow_private_urls=True) as client:  # a producer that allows it...
        record = client.submit(f"{private.base}/img.png", **SMALL).wait(timeout=120)
    assert record.state is JobState.FAILED  # ...does not make the worker fetch it
    assert record.error is not None and record.error.code == "invalid_input" and "non-public" in record.error.message


class Raw:
    """A hostile host: each connection gets `script(conn)`'s bytes, as slowly or as malformed as it likes."""

    def __init__(self, script: Any):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.base = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.hung_up = threading.Event()  # the client closed on it mid-answer

        def serve() -> None:
            while True:
                try:
                    conn, _ = self.sock.accept()
                except OSError:  # closed
                    return
                threading.Thread(target=self._answer, args=(conn, script), daemon=True).start()

        threading.Thread(target=serve, daemon=True).start()

    def _answer(self, conn: socket.socket, script: Any) -> None:
        with conn:
            conn.recv(65536)
            try:
                script(conn)
            except OSError:
                self.hung_up.set()

    def close(self) -> None:
        self.sock.close()


def drip(head: bytes, pause: float = 0.5) -> Any:
    def script(conn: socket.socket) -> None:
        conn.sendall(head)
        for _ in range(600):
            time.sleep(pause)
            conn.sendall(b"a")

    return script


def test_a_host_that_drips_its_answer_is_cut_off_at_the_deadline_or_at_a_stop() -> None:
    """One byte every half second passes every read's timeout: only the fetch's own deadline (SVDQ_FETCH_TIMEOUT)
    or its caller's stop (a cancel) ends it, in headers or in the body alike."""
    in_headers = Raw(drip(b"HTTP/1.1 200 OK\r\nX-Slow: "))
    in_body = Raw(drip(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n"))
    try:
        for host in (in_headers, in_body):
            started = time.monotonic()
            with pytest.raises(Stopped, match="took longer than 2s"):
                fetch(f"{host.base}/img.png", max_bytes=10**6, allow_private=True, deadline=2)
            assert time.monotonic() - started < 4
        asked = threading.Event()
        threading.Timer(1.0, asked.set).start()
        started = time.monotonic()
        with pytest.raises(Stopped, match="canceled"):
            fetch(f"{in_body.base}/img.png", max_bytes=10**6, allow_private=True, deadline=60, stop=asked.is_set)
        assert time.monotonic() - started < 3
        assert in_headers.hung_up.wait(5) and in_body.hung_up.wait(5)  # the connections were closed on them
        with pytest.raises(JobFailed) as failed:  # as the worker sees it: the job's input, not worth a retry
            fetch_image(
                FileStore(Path("/nonexistent")), f"{in_body.base}/img.png", 10**6, allow_private_urls=True, deadline=1
            )
        assert failed.value.code is ErrorCode.INVALID_INPUT and "SVDQ_FETCH_TIMEOUT" in failed.value.message
    finally:
        in_headers.close()
        in_body.close()


def test_a_cancel_frees_a_worker_stuck_on_a_slow_image_host(
    svdq_env: dict[str, str], start_worker: Any, private: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(svdq_env, "SVDQ_ALLOW_PRIVATE_URLS", "1")
    monkeypatch.setenv("SVDQ_ALLOW_PRIVATE_URLS", "1")
    slow = Raw(drip(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n"))
    try:
        fresh = start_worker()
        with Client.from_env(queue=fresh.queue) as client:
            stuck = client.submit(f"{slow.base}/img.png", **SMALL)
            behind = client.submit(f"{private.base}/img.png", **SMALL)
            wait_until(stuck, lambda r: r.stage == "fetch", timeout=60)
            time.sleep(1)  # well into the download
            canceled_at = time.time()
            stuck.cancel()
            record = behind.wait(timeout=60)
        assert record.state is JobState.SUCCEEDED and record.started_at is not None
        # The download stops at the cancel (within the record check's interval), not at SVDQ_FETCH_TIMEOUT's 60 s.
        assert datetime.fromisoformat(record.started_at).timestamp() - canceled_at < 5
        assert stuck.status().state is JobState.CANCELED and slow.hung_up.wait(5)
    finally:
        slow.close()


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 2OO \x1b]0;PWNED\x07\x1b[2Jfake: job succeeded\r\n\r\n",  # a status line that is not one
        b"HTTP/1.1 200 OK\r\nContent-Length: abc\r\n\r\nxyz",
        b"HTTP/1.1 200 OK\r\nX-Long: " + b"a" * 70_000 + b"\r\n\r\n",
    ],
    ids=["status-line", "content-length", "header-line"],
)
def test_a_malformed_answer_fails_the_job_as_bad_input_without_the_host_s_bytes(answer: bytes) -> None:
    host = Raw(lambda conn: conn.sendall(answer))
    try:
        url = f"{host.base}/img.png?X-Amz-Signature=SIGSECRET"
        with pytest.raises(BadResponse):
            fetch(url, max_bytes=10**6, allow_private=True)
        with pytest.raises(JobFailed) as failed:
            fetch_image(FileStore(Path("/nonexistent")), url, 10**6, allow_private_urls=True)
    finally:
        host.close()
    assert failed.value.code is ErrorCode.INVALID_INPUT and not failed.value.transient
    assert "malformed" in failed.value.message or "not a number" in failed.value.message
    assert "\x1b" not in failed.value.message and "PWNED" not in failed.value.message
    assert "SIGSECRET" not in failed.value.message  # a presigned URL's signature is never repeated


def test_urls_a_request_line_cannot_carry_are_refused_at_submit_without_repeating_them() -> None:
    for url in ("http://example.com/a b.png?token=SECRET", "http://example.com/a\tb.png", "http://example.com/\x00"):
        with pytest.raises(UnsafeURL, match="space or a control character") as refused:
            fetch(url, max_bytes=10)
        assert "SECRET" not in str(refused.value)
    with pytest.raises(UnsafeURL, match="over 2,048"):
        fetch("http://example.com/" + "a" * 2100, max_bytes=10)
    with pytest.raises(UnsafeURL, match="non-ASCII"):  # http.client would raise UnicodeEncodeError at the send
        fetch("http://example.com/caf\u00e9.png", max_bytes=10)
