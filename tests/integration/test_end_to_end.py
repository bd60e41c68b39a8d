"""Image in, mp4 in S3 out, status in Redis: a real worker process, real redis-server, S3 over HTTP."""

from __future__ import annotations

import io
import json
import re
import subprocess
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import imageio_ffmpeg
import pytest
import redis
from celery import Celery
from PIL import Image

from producer import keys
from producer.client import Client
from producer.contract import DEFAULT_QUEUE, TASK_NAME, InvalidParameter, JobState
from producer.status import StatusStore
from tests.integration.conftest import BUCKET, LONG, PREFIX, SMALL, SVDQ, WorkerProcess

pytestmark = pytest.mark.integration
ISO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def probe(data: bytes, tmp_path: Path) -> tuple[int, dict[str, Any]]:
    """Decode every frame with the ffmpeg that imageio-ffmpeg ships; return the count and stream facts."""
    path = tmp_path / f"{uuid.uuid4().hex}.mp4"
    path.write_bytes(data)
    run = subprocess.run(
        [
            imageio_ffmpeg.get_ffmpeg_exe(),
            "-hide_banner",
            "-i",
            str(path),
            "-map",
            "0:v:0",
            "-f",
            "rawvideo",
            "-pix_fmt",
            "rgb24",
            "-",
        ],
        capture_output=True,
        check=True,
        timeout=60,
    )
    stream = re.search(rb"Video: (\w+).*?, (yuv\w+).*?, (\d+)x(\d+).*?, ([\d.]+) fps", run.stderr)
    assert stream is not None, run.stderr.decode(errors="replace")
    codec, pix_fmt, width, height, fps = stream.groups()
    size = (int(width), int(height))
    frames, rest = divmod(len(run.stdout), size[0] * size[1] * 3)
    assert rest == 0
    return frames, {"codec": codec.decode(), "pix_fmt": pix_fmt.decode(), "size": size, "fps": float(fps)}


def test_render_lands_in_s3_and_decodes_as_requested(
    client: Client, worker: WorkerProcess, s3: Any, image_file: Path, tmp_path: Path
) -> None:
    job = client.submit(image_file, **{**SMALL, "num_frames": 6, "fps": 9, "width": 72, "height": 64}, seed=3)
    record = job.wait(timeout=120)

    assert record.state is JobState.SUCCEEDED, record.error
    assert record.worker == worker.hostname
    assert record.attempts == 1 and record.progress == 1.0 and record.error is None
    assert all(ISO_UTC.match(t or "") for t in (record.created_at, record.started_at, record.finished_at))
    assert {"load", "denoise", "decode", "encode", "upload"} <= set(record.timings)
    assert record.request["num_frames"] == 6 and record.request["image"].startswith(f"s3://{BUCKET}/")

    result = record.result
    assert result is not None and result.key == f"{PREFIX}/{job.id}/video.mp4"
    assert (result.frames, result.width, result.height, result.fps, result.seed) == (6, 72, 64, 9, 3)
    video = s3.get_object(Bucket=BUCKET, Key=result.key)["Body"].read()
    assert result.bytes == len(video)
    frames, meta = probe(video, tmp_path)
    assert frames == 6
    assert meta["size"] == (72, 64) and meta["fps"] == 9.0
    assert meta["codec"] == "h264" and meta["pix_fmt"].startswith("yuv420p")
    assert record.memory is not None and record.memory.decode_chunk_size == 6  # "auto" on a CPU: min(8, frames)
    assert record.memory.decode_chunk_halvings == 0 and record.memory.forward_chunking is False
    # The presigned URL is a plain HTTP GET away.
    assert result.url is not None
    with urllib.request.urlopen(result.url, timeout=10) as resp:
        assert resp.read() == video


def test_second_job_on_a_worker_pays_no_load(svdq_env: dict[str, str], start_worker: Any, image_file: Path) -> None:
    fresh = start_worker()
    with Client.from_env(queue=fresh.queue) as client:
        first = client.submit(image_file, **SMALL).wait(timeout=120)
        second = client.submit(image_file, **SMALL).wait(timeout=120)
    assert first.state is second.state is JobState.SUCCEEDED
    assert first.worker == second.worker == fresh.hostname
    assert first.timings["load"] > 0
    assert second.timings["load"] == 0


@pytest.mark.parametrize(
    ("params", "named"),
    [
        ({"num_frames": 0}, "num_frames"),
        ({"width": 100}, "width"),
        ({"height": 4096}, "height"),
        ({"motion_bucket_id": 300}, "motion_bucket_id"),
        ({"min_guidance_scale": 3.0, "max_guidance_scale": 1.0}, "max_guidance_scale"),
        ({"frames": 4}, "frames"),
    ],
)
def test_bad_parameter_is_refused_with_nothing_stored_or_enqueued(
    client: Client, s3: Any, params: dict[str, Any], named: str
) -> None:
    r = client.redis
    jobs_before = sorted(r.scan_iter(keys.JOB_PATTERN))
    queued_before = r.llen(DEFAULT_QUEUE)
    objects_before = s3.list_objects_v2(Bucket=BUCKET).get("KeyCount", 0)
    fresh_image = io.BytesIO()
    Image.new("RGB", (32, 32), (uuid.uuid4().int % 255, 1, 2)).save(fresh_image, format="PNG")

    with pytest.raises(InvalidParameter) as err:
        client.submit(fresh_image.getvalue(), **params)

    assert err.value.param == named and named in str(err.value)
    assert sorted(r.scan_iter(keys.JOB_PATTERN)) == jobs_before
    assert r.llen(DEFAULT_QUEUE) == queued_before
    assert s3.list_objects_v2(Bucket=BUCKET).get("KeyCount", 0) == objects_before


def test_cli_refuses_a_bad_parameter_naming_it(svdq_env: dict[str, str], image_file: Path) -> None:
    run = subprocess.run(
        [SVDQ, "submit", str(image_file), "--frames", "0"], env=svdq_env, capture_output=True, text=True
    )
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr == "svdq: --frames: must be 1 to 128 (got 0)\n"  # the flag the user typed


@pytest.mark.parametrize(
    "payload",
    [b"this is not an image at all", b"", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40],
    ids=["text", "empty", "truncated-png"],
)
def test_corrupt_image_fails_its_job_and_the_worker_takes_the_next(
    client: Client, worker: WorkerProcess, s3: Any, image_file: Path, payload: bytes
) -> None:
    key = f"{PREFIX}/uploads/{uuid.uuid4().hex}.png"
    s3.put_object(Bucket=BUCKET, Key=key, Body=payload)
    bad = client.submit(f"s3://{BUCKET}/{key}", **SMALL).wait(timeout=60)
    assert bad.state is JobState.FAILED
    assert bad.error is not None and bad.error.code == "invalid_input"
    assert "image" in bad.error.message
    assert bad.attempts == 1  # bad input is never retried
    assert bad.result is None

    good = client.submit(image_file, **SMALL).wait(timeout=120)
    assert good.state is JobState.SUCCEEDED
    assert good.worker == bad.worker == worker.hostname


def test_submit_wait_says_why_a_job_failed(svdq_env: dict[str, str], worker: WorkerProcess, s3: Any) -> None:
    key = f"{PREFIX}/uploads/{uuid.uuid4().hex}.png"
    s3.put_object(Bucket=BUCKET, Key=key, Body=b"this is not an image at all")
    argv = [SVDQ, "submit", f"s3://{BUCKET}/{key}", "--wait", "--width", "64", "--height", "64", "--frames", "4"]
    out = subprocess.run([*argv, "--steps", "2"], env=svdq_env, capture_output=True, text=True, timeout=120)
    job_id = out.stdout.strip()
    assert out.returncode == 1 and re.fullmatch(r"[0-9a-f]{32}", job_id)
    assert f"svdq: job {job_id} failed: invalid_input: " in out.stderr and "could not be decoded" in out.stderr


def test_plain_celery_message_without_a_record(
    svdq_env: dict[str, str], worker: WorkerProcess, s3: Any, image_file: Path, client: Client
) -> None:
    key = f"{PREFIX}/uploads/{uuid.uuid4().hex}.png"
    s3.put_object(Bucket=BUCKET, Key=key, Body=image_file.read_bytes())
    job_id = uuid.uuid4().hex
    plain = Celery(broker=svdq_env["SVDQ_REDIS_URL"])
    try:
        plain.send_task(TASK_NAME, kwargs={"job_id": job_id, "request": {"image": f"s3://{BUCKET}/{key}", **SMALL}})
    finally:
        plain.close()
    # The record appears when a worker takes the message: there is nothing to find before that.
    deadline = time.monotonic() + 60
    while not client.redis.exists(keys.job(job_id)):
        assert time.monotonic() < deadline, "no worker took the plain Celery message"
        time.sleep(0.05)
    record = client.job(job_id).wait(timeout=120)
    assert record.state is JobState.SUCCEEDED
    assert record.created_at is not None and record.request["num_frames"] == SMALL["num_frames"]
    assert s3.head_object(Bucket=BUCKET, Key=f"{PREFIX}/{job_id}/video.mp4")["ContentLength"] > 0


def test_worker_answers_ping_while_rendering(
    client: Client, worker: WorkerProcess, celery_control: Celery, image_file: Path
) -> None:
    job = client.submit(image_file, **LONG)
    deadline = time.monotonic() + 60
    while (rec := job.status()).stage != "denoise":
        assert time.monotonic() < deadline and not rec.state.is_terminal(), rec
        time.sleep(0.05)

    replies = celery_control.control.ping(destination=[worker.hostname], timeout=2.0)

    still = job.status()
    assert replies == [{worker.hostname: {"ok": "pong"}}]
    assert still.state is JobState.STARTED, "the job should still be rendering when the ping comes back"
    assert job.wait(timeout=120).state is JobState.SUCCEEDED


def test_same_image_is_stored_once(client: Client, s3: Any) -> None:
    data = io.BytesIO()
    Image.new("RGB", (40, 40), (uuid.uuid4().int % 255, 9, 9)).save(data, format="PNG")
    first = client.submit(data.getvalue(), **SMALL)
    second = client.submit(data.getvalue(), **SMALL)
    ref = first.status().request["image"]
    assert ref == second.status().request["image"]
    key = ref.removeprefix(f"s3://{BUCKET}/")
    assert key.startswith(f"{PREFIX}/inputs/")
    listed = s3.list_objects_v2(Bucket=BUCKET, Prefix=key)
    assert listed["KeyCount"] == 1


def test_terminal_records_expire(client: Client, worker: WorkerProcess, image_file: Path) -> None:
    job = client.submit(image_file, **SMALL)
    job.wait(timeout=120)
    ttl = client.redis.ttl(keys.job(job.id))
    assert 0 < ttl <= client.settings.result_ttl


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


def test_status_store_enforces_the_transition_table(redis_url: str) -> None:
    store = StatusStore(redis.Redis.from_url(redis_url), result_ttl=60)
    job_id = uuid.uuid4().hex
    assert store.create(job_id, {"image": "x"}) is True
    assert store.create(job_id, {"image": "y"}) is False
    with pytest.raises(Exception, match="cannot go from queued to succeeded"):
        store.transition(job_id, JobState.SUCCEEDED)
    assert store.update(job_id, progress=0.5) is False  # not started: progress is not written
    store.claim(job_id, "test/1", lease_seconds=60)
    assert store.update(job_id, progress=0.5, stage="denoise") is True
    store.transition(job_id, JobState.CANCELED)
    with pytest.raises(Exception, match="cannot go from canceled to started"):
        store.claim(job_id, "test/1", lease_seconds=60)
    record = store.get(job_id)
    assert (record.state, record.attempts, record.progress, record.request) == (
        JobState.CANCELED,
        1,
        0.5,
        {"image": "x"},
    )
    assert record.finished_at is not None


@pytest.mark.parametrize(
    ("fmt", "content_type", "magic"), [("webm", "video/webm", b"\x1a\x45\xdf\xa3"), ("gif", "image/gif", b"GIF8")]
)
def test_webm_and_gif_have_their_own_content_type_and_magic_number(
    client: Client, worker: WorkerProcess, s3: Any, image_file: Path, fmt: str, content_type: str, magic: bytes
) -> None:
    record = client.submit(image_file, **SMALL, format=fmt, decode_chunk_size=3).wait(timeout=120)
    assert record.state is JobState.SUCCEEDED, record.error
    assert record.result is not None and record.result.key.endswith(f"/video.{fmt}")
    assert record.memory is not None and record.memory.decode_chunk_size == 3
    head = s3.head_object(Bucket=BUCKET, Key=record.result.key)
    assert head["ContentType"] == content_type and head["ContentLength"] == record.result.bytes
    assert client.job(record.id).video_bytes()[:4] == magic


def test_ping_answers_for_a_live_worker_and_exits_5_for_none(svdq_env: dict[str, str], worker: WorkerProcess) -> None:
    live = subprocess.run([SVDQ, "ping", "--hostname", worker.hostname], env=svdq_env, capture_output=True, text=True,
                          timeout=30)  # fmt: skip
    assert live.returncode == 0 and live.stdout.split() == [worker.hostname], live
    gone = subprocess.run([SVDQ, "ping", "--hostname", "nobody@nowhere", "--timeout", "1"], env=svdq_env,
                          capture_output=True, text=True, timeout=30)  # fmt: skip
    assert gone.returncode == 5 and "no worker nobody@nowhere answered" in gone.stderr, gone
