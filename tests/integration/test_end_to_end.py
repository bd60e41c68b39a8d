"""Image in, mp4 in S3 out, status in Redis: a real worker process, real redis-server, S3 over HTTP."""

from __future__ import annotations

import io
import re
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest
import torch
from celery import Celery
from PIL import Image

from producer import keys
from producer.client import Client
from producer.contract import TASK_NAME, JobState
from tests.integration.conftest import BUCKET, LONG, PREFIX, SMALL, WorkerProcess, probe

pytestmark = pytest.mark.integration
ISO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


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
    assert record.memory is not None
    if torch.cuda.is_available():  # the worker's device: "auto" picks from what its warm-up measured
        assert 1 <= record.memory.decode_chunk_size <= 6
    else:  # "auto" on a CPU: min(8, frames)
        assert record.memory.decode_chunk_size == 6
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


def test_a_small_image_is_written_without_asking_first_a_big_one_is_asked_for(client: Client) -> None:
    """S3 requests as boto3 sends them to the server: a small new image is one PUT (asking first, a HEAD, costs
    as much and a new image is the usual case); a big one is looked for first, and not sent again once there."""
    sent: list[str] = []
    client.store.s3.meta.events.register("before-call.s3", lambda model, **_: sent.append(model.name))  # type: ignore[attr-defined]

    def png(side: int) -> bytes:
        data = io.BytesIO()
        Image.effect_noise((side, side), 64).convert("RGB").save(data, format="PNG")
        return data.getvalue()

    small, big = png(40), png(400)
    assert len(small) < client.store.ask_first_above < len(big)
    for image, operations in ((small, ["PutObject"]), (big, ["HeadObject", "PutObject"]), (big, ["HeadObject"])):
        sent.clear()
        client.submit(image, **SMALL)
        assert sent == operations


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
