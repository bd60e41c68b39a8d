"""Job N+1 renders while job N is encoded and uploaded, with one job in flight at most, statuses exact.

`run_job` in this process, a real Redis, the tiny pipeline, and a real file store whose uploads are
made slow so that the overlap (or its absence) cannot hide in a timing race.
"""

from __future__ import annotations

import io
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis
import torch
from PIL import Image

from producer.contract import JobRecord, JobState
from producer.status import StatusStore
from producer.storage import FileStore, Stored
from worker.heartbeat import Heartbeat
from worker.pipeline import Renderer
from worker.render import run_job
from worker.runtime import Runtime
from worker.settings import WorkerSettings
from worker.spool import Spool
from worker.tiny_model import build_tiny_pipeline

pytestmark = pytest.mark.integration
UPLOAD_SECONDS = 1.5


class SlowUploads(FileStore):
    def put(self, name: str, data: bytes, content_type: str) -> Stored:
        if name.endswith("/video.mp4"):
            time.sleep(UPLOAD_SECONDS)
        return super().put(name, data, content_type)


def test_next_job_renders_while_the_last_one_uploads(redis_url: str, tmp_path: Path) -> None:
    store = SlowUploads(tmp_path)
    png = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 200, 90)).save(png, format="PNG")
    image = store.put("inputs/in.png", png.getvalue(), "image/png").ref
    settings = WorkerSettings(redis_url=redis_url, storage_url=tmp_path.as_uri(), warmup=False)
    status = StatusStore(redis.Redis.from_url(redis_url), result_ttl=60)
    renderer = Renderer(pipe=build_tiny_pipeline(), device=torch.device("cpu"), dtype=torch.float32)
    rt = Runtime(
        settings=settings,
        status=status,
        store=store,
        renderer=renderer,
        heartbeat=Heartbeat(status, lease_ttl=30),
        spool=Spool(store, tmp_path / "spool", 10**8),
    )
    request = {"image": image, "width": 64, "height": 64, "num_frames": 4, "num_inference_steps": 2}
    first, second = uuid.uuid4().hex, uuid.uuid4().hex

    assert run_job(rt, first, request, "w@test").detail == "finishing"
    handed_off = status.get(first)
    assert (handed_off.state, handed_off.stage) == (JobState.STARTED, "upload")  # exact: not done yet

    run_job(rt, second, request, "w@test")
    # Bounded: job 2's render took less than job 1's upload, so its hand-off had to wait for job 1.
    assert status.get(first).state is JobState.SUCCEEDED
    rt.finisher.drain()

    one, two = status.get(first), status.get(second)
    assert one.state is two.state is JobState.SUCCEEDED
    assert two.started_at < one.finished_at, "job 2 should have started on the GPU while job 1 uploaded"
    assert one.finished_at < two.finished_at
    assert one.timings["upload"] >= UPLOAD_SECONDS and one.result is not None
    assert (tmp_path / one.result.key).is_file() and two.result is not None and (tmp_path / two.result.key).is_file()
    rt.heartbeat.close()
    rt.spool.close()


class RedisGoneAfterClaim(StatusStore):
    """The real store on a real Redis, whose connection drops right after a job is claimed."""

    gone = False

    def claim(self, *args: Any, **kwargs: Any) -> int:
        number = super().claim(*args, **kwargs)
        self.gone = True
        return number

    def get(self, job_id: str) -> JobRecord:
        if self.gone:
            raise redis.ConnectionError("Connection closed by server.")
        return super().get(job_id)


def test_a_redis_error_after_the_claim_lets_the_lease_lapse_for_recovery(redis_url: str, tmp_path: Path) -> None:
    """The error goes up to Celery, and the worker stops renewing the job's lease: it lapses, so a live worker
    recovers the job from its record, instead of it staying `started` with a lease renewed forever."""
    store = FileStore(tmp_path)
    png = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 200, 90)).save(png, format="PNG")
    image = store.put("inputs/in.png", png.getvalue(), "image/png").ref
    settings = WorkerSettings(redis_url=redis_url, storage_url=tmp_path.as_uri(), warmup=False, lease_ttl=1.5)
    status = RedisGoneAfterClaim(redis.Redis.from_url(redis_url), result_ttl=60)
    renderer = Renderer(pipe=build_tiny_pipeline(), device=torch.device("cpu"), dtype=torch.float32)
    rt = Runtime(
        settings=settings,
        status=status,
        store=store,
        renderer=renderer,
        heartbeat=Heartbeat(status, lease_ttl=1.5),
        spool=Spool(store, tmp_path / "spool", 10**8),
    )
    job_id = uuid.uuid4().hex
    request = {"image": image, "width": 64, "height": 64, "num_frames": 4, "num_inference_steps": 2}
    with pytest.raises(redis.ConnectionError):
        run_job(rt, job_id, request, "w@test")
    status.gone = False
    assert status.holder(job_id) is not None and status.get(job_id).state is JobState.STARTED
    time.sleep(3)  # two lease lengths: six heartbeats would have renewed it
    assert status.holder(job_id) is None
    rt.heartbeat.close()
    rt.spool.close()
