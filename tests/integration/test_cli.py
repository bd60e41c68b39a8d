"""The CLI as a user meets it, against a real Redis: pipes, waits that stop early, images that are not."""

from __future__ import annotations

import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from tests.integration.conftest import SMALL, SVDQ

pytestmark = pytest.mark.integration

SIZE = ["--width", str(SMALL["width"]), "--height", str(SMALL["height"]), "--frames", str(SMALL["num_frames"])]


def unread_queue_env(svdq_env: dict[str, str]) -> dict[str, str]:
    return {**svdq_env, "SVDQ_QUEUE": f"unread-{uuid.uuid4().hex[:8]}"}


def submit(env: dict[str, str], image: Path) -> str:
    out = subprocess.run([SVDQ, "submit", str(image), *SIZE], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_a_text_file_is_refused_by_its_name(svdq_env: dict[str, str], tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("not a picture")
    out = subprocess.run([SVDQ, "submit", str(notes)], env=svdq_env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert out.stderr == f"svdq: image {notes}: is not an image svdq can read (PNG, JPEG, WebP, GIF, BMP or TIFF)\n"


def test_status_into_a_closed_pipe_ends_quietly(svdq_env: dict[str, str], image_file: Path) -> None:
    job_id = submit(unread_queue_env(svdq_env), image_file)
    out = subprocess.run(f"{SVDQ} status {job_id} | head -1", shell=True, env=svdq_env, capture_output=True,
                         text=True, timeout=60)  # fmt: skip
    assert out.stdout == f"job      {job_id}\n" and out.stderr == "", out.stderr


def test_a_wait_on_a_queue_no_worker_reads_says_so(svdq_env: dict[str, str], image_file: Path) -> None:
    env = unread_queue_env(svdq_env)
    job_id = submit(env, image_file)
    out = subprocess.run([SVDQ, "wait", job_id, "--timeout", "1"], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 4
    assert f"still queued after 1s: no worker reads its queue '{env['SVDQ_QUEUE']}'" in out.stderr, out.stderr
    assert f"`svdq wait {job_id}`" in out.stderr


def test_ctrl_c_says_the_job_goes_on_and_how_to_follow_it(svdq_env: dict[str, str], image_file: Path) -> None:
    env = unread_queue_env(svdq_env)
    job_id = submit(env, image_file)
    waiting = subprocess.Popen([SVDQ, "wait", job_id], env=env, stderr=subprocess.PIPE, text=True)
    time.sleep(3)  # well into the wait
    waiting.send_signal(signal.SIGINT)
    _, err = waiting.communicate(timeout=30)
    assert waiting.returncode == 130
    assert err.startswith(f"svdq: stopped waiting (Ctrl-C). job {job_id} is still queued"), err
    assert f"`svdq wait {job_id}` to keep following it" in err and "Traceback" not in err
