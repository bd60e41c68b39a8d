"""The CLI as a user meets it, against a real Redis: pipes, waits that stop early, images that are not."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import redis

from producer import keys
from producer.client import Client
from producer.local_redis import LocalRedis
from tests.integration.conftest import SMALL, SVDQ, WorkerProcess, probe
from tests.odd_images import png_without_image_data

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


def test_an_image_that_makes_pillow_raise_an_unexpected_error_is_refused_in_one_line(
    svdq_env: dict[str, str], tmp_path: Path
) -> None:
    image = tmp_path / "no-frames.png"
    image.write_bytes(png_without_image_data())  # Pillow's verify() raises IndexError on it
    out = subprocess.run([SVDQ, "submit", str(image)], env=svdq_env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert out.stderr == f"svdq: image {image}: is not a readable image (IndexError: list index out of range)\n"


def test_status_into_a_closed_pipe_ends_quietly(svdq_env: dict[str, str], image_file: Path) -> None:
    job_id = submit(unread_queue_env(svdq_env), image_file)
    out = subprocess.run(
        f"{SVDQ} status {job_id} | head -1", shell=True, env=svdq_env, capture_output=True, text=True, timeout=60
    )
    assert out.stdout == f"job      {job_id}\n" and out.stderr == "", out.stderr


def test_a_wait_on_a_queue_no_worker_reads_says_so(svdq_env: dict[str, str], image_file: Path) -> None:
    env = unread_queue_env(svdq_env)
    job_id = submit(env, image_file)
    out = subprocess.run([SVDQ, "wait", job_id, "--timeout", "12"], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 4
    # Said while it waits (after 10 s), not only once the wait stops: a forgotten worker is a silent hang otherwise.
    notice, stopped = out.stderr.splitlines()
    assert notice.startswith(f"svdq: job {job_id} waits: no worker reads its queue '{env['SVDQ_QUEUE']}'"), notice
    assert f"still queued after 12s: no worker reads its queue '{env['SVDQ_QUEUE']}'" in stopped, stopped
    # The queue is not the default one: the worker to start must read it too.
    assert (
        f"`svdq wait {job_id}`" in stopped
        and f"(start one with `SVDQ_QUEUE={env['SVDQ_QUEUE']} svdq worker`," in stopped
    )
    for_a_model = subprocess.run(
        [SVDQ, "submit", str(image_file), *SIZE, "--model", "svd-xt"], env=env, capture_output=True, text=True
    )
    out = subprocess.run(
        [SVDQ, "wait", for_a_model.stdout.strip(), "--timeout", "1"], env=env, capture_output=True, text=True
    )
    assert f"`SVDQ_QUEUE={env['SVDQ_QUEUE']} svdq worker --model PATH --model-name svd-xt`," in out.stderr, out.stderr


def test_ctrl_c_says_the_job_goes_on_and_how_to_follow_it(svdq_env: dict[str, str], image_file: Path) -> None:
    env = unread_queue_env(svdq_env)
    job_id = submit(env, image_file)
    waiting = subprocess.Popen([SVDQ, "wait", job_id], env=env, stderr=subprocess.PIPE, text=True)
    # Into the wait: subscribed to the job's events. A fixed 3 s was not always past the imports on a busy
    # machine, and a Ctrl-C before the wait is (rightly) a bare "interrupted".
    r = redis.Redis.from_url(env["SVDQ_REDIS_URL"])
    deadline = time.monotonic() + 60
    while r.pubsub_numsub(keys.events(job_id))[0][1] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    waiting.send_signal(signal.SIGINT)
    _, err = waiting.communicate(timeout=30)
    assert waiting.returncode == 130
    assert err.startswith(f"svdq: stopped waiting (Ctrl-C). job {job_id} is still queued"), err
    assert f"`svdq wait {job_id}` to keep following it" in err and "Traceback" not in err


def test_cli_submit_wait_status_and_output(
    svdq_env: dict[str, str], worker: WorkerProcess, image_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out.mp4"
    flags = ["--frames", "4", "--steps", "2", "--width", "64", "--height", "64", "--fps", "6"]
    run = subprocess.run(
        [SVDQ, "submit", str(image_file), *flags, "--wait", "--json", "--output", str(out)],
        env=svdq_env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert run.returncode == 0, run.stderr
    record = json.loads(run.stdout)
    assert record["state"] == "succeeded" and record["result"]["fps"] == 6
    frames, meta = probe(out.read_bytes(), tmp_path)
    assert frames == 4 and meta["size"] == (64, 64)

    status = subprocess.run([SVDQ, "status", record["id"], "--json"], env=svdq_env, capture_output=True, text=True)
    assert status.returncode == 0 and json.loads(status.stdout)["id"] == record["id"]
    plain = subprocess.run([SVDQ, "submit", str(image_file), *flags], env=svdq_env, capture_output=True, text=True)
    assert plain.returncode == 0 and re.fullmatch(r"[0-9a-f]{32}\n", plain.stdout)
    missing = subprocess.run([SVDQ, "status", "no-such-job"], env=svdq_env, capture_output=True, text=True)
    assert missing.returncode == 3 and "no-such-job" in missing.stderr


def test_an_output_path_that_cannot_be_written_is_refused_before_anything_is_submitted(
    svdq_env: dict[str, str], image_file: Path, tmp_path: Path
) -> None:
    """It was a traceback and exit 1 ("the job failed") after the render; without --wait it was ignored."""
    flags = ["--frames", "4", "--steps", "2", "--width", "64", "--height", "64"]
    with Client.from_env() as client:
        before = {record.id for record in client.list(limit=10_000)}
        cases = [
            (["--wait", "--output", str(tmp_path / "no" / "such" / "x.mp4")], "no folder"),
            (["--wait", "--output", str(tmp_path)], "is a folder"),
            (["--output", str(tmp_path / "x.mp4")], "--output needs --wait"),
        ]
        for extra, says in cases:
            run = subprocess.run(
                [SVDQ, "submit", str(image_file), *flags, *extra], env=svdq_env, capture_output=True, text=True
            )
            assert run.returncode == 2 and says in run.stderr and "Traceback" not in run.stderr, run.stderr
        # Nothing submitted. (Not a count: other tests' records on this Redis expire meanwhile.)
        assert {record.id for record in client.list(limit=10_000)} <= before
        job_id = submit(svdq_env, image_file)
    wait = subprocess.run(
        [SVDQ, "wait", job_id, "--output", str(tmp_path / "no" / "x.mp4")], env=svdq_env, capture_output=True, text=True
    )
    assert wait.returncode == 2 and "no folder" in wait.stderr


def test_ping_answers_for_a_live_worker_and_exits_5_for_none(svdq_env: dict[str, str], worker: WorkerProcess) -> None:
    live = subprocess.run(
        [SVDQ, "ping", "--hostname", worker.hostname], env=svdq_env, capture_output=True, text=True, timeout=30
    )
    assert live.returncode == 0 and live.stdout.split() == [worker.hostname], live
    gone = subprocess.run(
        [SVDQ, "ping", "--hostname", "nobody@nowhere", "--timeout", "1"],
        env=svdq_env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert gone.returncode == 5 and "no worker nobody@nowhere answered" in gone.stderr, gone
    # %h is this host, as `svdq worker --hostname gpu0@%h` names itself (compose's healthcheck asks so).
    here = subprocess.run(
        [SVDQ, "ping", "--hostname", "nobody@%h", "--timeout", "1"], env=svdq_env, capture_output=True, text=True
    )
    assert here.returncode == 5 and f"no worker nobody@{socket.gethostname()} answered" in here.stderr, here


def test_top_into_a_pipe_prints_snapshots_one_after_another_without_screen_codes(svdq_env: dict[str, str]) -> None:
    top = subprocess.Popen(
        [SVDQ, "top", "--interval", "0.3"], env=svdq_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert top.stdout is not None
    seen: list[str] = []
    try:
        while sum("svdq top " in line for line in seen) < 2:  # each snapshot asks the workers: about a second
            line = top.stdout.readline()
            assert line, "top ended"
            seen.append(line)
    finally:
        top.terminate()
        top.communicate(timeout=30)
    assert not any("\x1b[" in line for line in seen), seen[:10]  # a terminal's clear-screen, into a pipe


def test_a_mistyped_worker_option_is_one_line_and_exit_2(svdq_env: dict[str, str]) -> None:
    """Celery's own options are parsed by click, whose error was a 31-line traceback and exit 1."""
    run = subprocess.run([SVDQ, "worker", "--modle", "./tiny"], env=svdq_env, capture_output=True, text=True)
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    assert run.stderr.strip().splitlines()[-1].startswith("svdq worker: No such option '--modle'")


def test_top_warns_when_redis_may_evict_jobs(svdq_env: dict[str, str], tmp_path: Path) -> None:
    """A capped Redis that evicts keys when full loses queued messages, records and leases: said up front."""
    server = LocalRedis(tmp_path)
    url = server.start()
    env = {**svdq_env, "SVDQ_REDIS_URL": url}
    try:
        admin = redis.Redis.from_url(url)
        admin.config_set("maxmemory", "100mb")
        admin.config_set("maxmemory-policy", "allkeys-lru")
        top = subprocess.run([SVDQ, "top", "--once"], env=env, capture_output=True, text=True, timeout=60)
        assert top.returncode == 0, top.stderr
        assert "WARNING: Redis evicts keys when it is full (maxmemory-policy allkeys-lru)" in top.stdout, top.stdout
        assert "set maxmemory-policy noeviction" in top.stdout
        admin.config_set("maxmemory-policy", "noeviction")
        shown = subprocess.run([SVDQ, "top", "--once", "--json"], env=env, capture_output=True, text=True, timeout=60)
        assert json.loads(shown.stdout)["warnings"] == []
        admin.close()
    finally:
        server.stop()


def test_top_json_refreshing_is_one_json_line_per_snapshot(svdq_env: dict[str, str]) -> None:
    """Without --once it printed one indented document after another, forever: neither JSON nor JSON Lines."""
    proc = subprocess.Popen(
        [SVDQ, "top", "--json", "--interval", "0.2"], env=svdq_env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline() for _ in range(3)]
    finally:
        proc.terminate()
        proc.communicate(timeout=30)  # closes the pipe
    snapshots = [json.loads(line) for line in lines]
    assert all({"workers", "queues"} <= set(snap) for snap in snapshots)
