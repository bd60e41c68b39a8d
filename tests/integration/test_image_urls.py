"""http(s) image URLs through the SSRF guard, against real HTTP servers on loopback.

127.0.0.2 stands in for a public host (the guard is told so through its `public` predicate): its
redirects to 127.0.0.1, a private address, must be refused at the hop, never followed.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from producer.client import Client
from producer.contract import InvalidParameter, JobState
from producer.netguard import HTTPFailure, TooLarge, UnsafeURL, fetch
from tests.integration.conftest import SMALL

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
