"""The gateway's page at `/`, in a real headless Chromium (the system's, driven by Playwright): submit through
the form, watch the progress reach 100%, play the video. Here the store is a folder (file://), so the video
comes from the gateway itself, which also answers Range requests for it."""

from __future__ import annotations

import os
import shutil
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import SMALL
from tests.integration.test_gateway import ALICE, KEYS, Gateway

pytestmark = pytest.mark.integration


@pytest.fixture
def browser() -> Iterator[Any]:
    executable = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    if executable is None or sync_playwright is None:
        missing = "chromium" if executable is None else "playwright (the dev extra)"
        if os.environ.get("CI"):
            pytest.fail(f"CI must install {missing} (.ci/run) for the gateway page's browser test")
        pytest.skip(f"no {missing} here: the gateway page's browser test needs it")  # e.g. on a GPU host

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        yield chromium
        chromium.close()


def until(page: Any, selector: str, predicate: str, timeout: float = 10) -> None:
    """Poll `predicate` on the element from here: the page's Content-Security-Policy forbids the eval that
    Playwright's wait_for_function would run inside it."""
    deadline = time.monotonic() + timeout
    while not page.eval_on_selector(selector, predicate):
        assert time.monotonic() < deadline, (selector, predicate, page.text_content("#status"))
        time.sleep(0.2)


def test_the_page_submits_follows_and_plays_a_job(
    svdq_env: dict[str, str], start_worker: Any, browser: Any, image_file: Path, tmp_path: Path
) -> None:
    env = {"SVDQ_STORAGE_URL": (tmp_path / "store").as_uri()}
    worker = start_worker(env=env)
    gateway = Gateway({**svdq_env, **env, "SVDQ_QUEUE": worker.queue, "SVDQ_API_KEYS": KEYS}, tmp_path / "gw.log")
    try:
        page = browser.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
        page.goto(gateway.url + "/")
        page.fill("#key", ALICE)
        page.set_input_files("#image", str(image_file))
        for name in ("num_frames", "num_inference_steps", "width", "height"):
            page.fill(f"#{name}", str(SMALL[name]))
        page.click("#go")

        until(page, "#progress", "e => e.value >= 1", timeout=120)
        until(page, "video", "e => e.readyState >= 2", timeout=30)  # its first frame decoded
        assert page.text_content("#status").startswith("succeeded")
        assert page.eval_on_selector("video", "e => [e.duration > 0, e.error]") == [True, None]
        job_id = page.text_content("#job-id")
        until(page, "#recent", f"e => e.textContent.includes('{job_id}') && e.textContent.includes('succeeded')")
        assert errors == []  # a Content-Security-Policy violation would be one

        # The file itself, in parts, as a <video> element seeking through it asks.
        request = urllib.request.Request(
            f"{gateway.url}/v1/jobs/{job_id}/video", headers={"Authorization": f"Bearer {ALICE}", "Range": "bytes=0-99"}
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 206 and len(response.read()) == 100
            assert response.headers["Content-Range"].startswith("bytes 0-99/")
    finally:
        gateway.stop()
