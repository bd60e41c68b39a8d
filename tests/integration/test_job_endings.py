"""How a job ends when the device, the encoder, the storage or the user intervenes at the worst moment.

Mostly `run_job` in this process with a real Redis, the real tiny pipeline and a real file store; the fault is
injected where the real one would come from (the UNet's forward on the device, the store's put, the moment
between the render and the upload), since a CPU cannot run out of GPU memory on request. The encoder's failure
is a real worker process whose ffmpeg dies.
"""

from __future__ import annotations

import io
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import torch
from PIL import Image

from producer import keys
from producer.client import Client
from producer.contract import ErrorCode, JobState
from producer.status import StatusStore
from producer.storage import FileStore, InvalidReference, StorageUnavailable, Stored
from tests.integration.conftest import SMALL
from worker.finisher import Finisher
from worker.heartbeat import Heartbeat
from worker.pipeline import Renderer
from worker.render import run_job
from worker.runtime import Runtime
from worker.settings import WorkerSettings
from worker.spool import Spool
from worker.timelimit import HardLimit
from worker.tiny_model import build_tiny_pipeline

pytestmark = pytest.mark.integration
REQUEST = {"width": 64, "height": 64, "num_frames": 4, "num_inference_steps": 2}


class RefusingVideos(FileStore):
    """Storage that answers, and refuses the video for good (a permissions or policy error, not an outage);
    `on_read` runs when the worker fetches an input (to change the world at that moment)."""

    refuse = False
    on_read: Callable[[], None] | None = None

    def put(self, name: str, data: bytes, content_type: str) -> Stored:
        if self.refuse and name.endswith("/video.mp4"):
            raise InvalidReference(f"{name}: refused by the bucket's policy")
        return super().put(name, data, content_type)

    def read(self, ref: str, limit: int | None = None) -> bytes:
        if self.on_read is not None:
            self.on_read()
        return super().read(ref, limit)


class HeldFinisher(Finisher):
    """Finishes a job only once `go` is set: the moment between a render's end and its upload, held open."""

    def __init__(self) -> None:
        super().__init__()
        self.go = threading.Event()
        self.go.set()

    def submit(self, name: str, work: Callable[[], None]) -> None:
        def held() -> None:
            self.go.wait(60)
            work()

        super().submit(name, held)


@pytest.fixture
def rt(redis_url: str, tmp_path: Path) -> Iterator[Runtime]:
    store = RefusingVideos(tmp_path)
    status = StatusStore(redis.Redis.from_url(redis_url), result_ttl=60)
    runtime = Runtime(
        settings=WorkerSettings(redis_url=redis_url, storage_url=tmp_path.as_uri(), warmup=False),
        status=status,
        store=store,
        renderer=Renderer(pipe=build_tiny_pipeline(), device=torch.device("cpu"), dtype=torch.float32),
        heartbeat=Heartbeat(status, lease_ttl=30),
        spool=Spool(store, tmp_path / "spool", 10**8),
        finisher=HeldFinisher(),
    )
    yield runtime
    runtime.finisher.go.set()  # type: ignore[attr-defined]
    runtime.finisher.drain()
    runtime.heartbeat.close()
    runtime.spool.close()


def render(rt: Runtime) -> str:
    png = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 200, 90)).save(png, format="PNG")
    image = rt.store.put(f"inputs/{uuid.uuid4().hex}.png", png.getvalue(), "image/png").ref
    job_id = uuid.uuid4().hex
    run_job(rt, job_id, {"image": image, **REQUEST}, "w@test")
    rt.finisher.drain()
    return job_id


def unet_raising(rt: Runtime, exc: Exception) -> Callable[[], None]:
    """The UNet's forward raises `exc` (what the device would raise); returns the undo."""
    unet = rt.renderer.pipe.unet

    def forward(*args: Any, **kwargs: Any) -> Any:
        raise exc

    unet.forward = forward
    return lambda: delattr(unet, "forward")


def test_a_device_error_fails_the_job_internal_and_the_next_job_renders(rt: Runtime) -> None:
    undo = unet_raising(rt, RuntimeError("CUDA error: an illegal memory access was encountered"))
    failed = rt.status.get(render(rt))
    undo()
    assert failed.state is JobState.FAILED and failed.attempts == 1 and failed.error is not None
    assert failed.error.code == "internal"
    assert failed.error.message == "RuntimeError: CUDA error: an illegal memory access was encountered"
    assert rt.status.holder(failed.id) is None  # its lease released at once
    assert rt.status.get(render(rt)).state is JobState.SUCCEEDED


def test_out_of_memory_twice_fails_the_job_out_of_memory_after_retrying_with_forward_chunking(rt: Runtime) -> None:
    undo = unet_raising(rt, torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    failed = rt.status.get(render(rt))
    undo()
    assert failed.state is JobState.FAILED and failed.error is not None
    assert failed.error.code == "out_of_memory" and "forward chunking" in failed.error.message
    assert rt.renderer.forward_chunking  # the second try ran with it
    assert rt.status.get(render(rt)).state is JobState.SUCCEEDED


def test_a_job_canceled_between_its_render_and_its_upload_stores_nothing(rt: Runtime, tmp_path: Path) -> None:
    rt.finisher.go.clear()  # type: ignore[attr-defined]
    png = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(png, format="PNG")
    image = rt.store.put("inputs/held.png", png.getvalue(), "image/png").ref
    job_id = uuid.uuid4().hex
    assert run_job(rt, job_id, {"image": image, **REQUEST}, "w@test").detail == "finishing"
    rt.status.transition(job_id, JobState.CANCELED)  # the user's cancel, after the last check of the render
    rt.finisher.go.set()  # type: ignore[attr-defined]
    rt.finisher.drain()
    assert rt.status.get(job_id).state is JobState.CANCELED
    assert not [p for p in tmp_path.rglob("video.*") if job_id in str(p)]
    assert rt.status.holder(job_id) is None


def test_storage_that_refuses_the_video_for_good_fails_the_job_without_spooling_it(rt: Runtime, tmp_path: Path) -> None:
    rt.store.refuse = True  # type: ignore[attr-defined]
    failed = rt.status.get(render(rt))
    assert failed.state is JobState.FAILED and failed.attempts == 1 and failed.error is not None
    assert "refused by the bucket's policy" in failed.error.message
    assert rt.spool.pending() == 0 and not list((tmp_path / "spool").rglob("*.mp4"))


def test_an_encoder_that_dies_fails_the_job_internal_and_the_worker_lives(
    start_worker: Any, image_file: Path, tmp_path: Path
) -> None:
    ffmpeg = tmp_path / "ffmpeg"
    ffmpeg.write_text("#!/bin/sh\necho 'Conversion failed: simulated encoder crash' >&2\nexit 1\n")
    ffmpeg.chmod(0o755)
    worker = start_worker(env={"IMAGEIO_FFMPEG_EXE": str(ffmpeg)})
    with Client.from_env(queue=worker.queue) as client:
        jobs = [client.submit(image_file, **SMALL) for _ in range(2)]
        finals = [job.wait(timeout=120) for job in jobs]
    for final in finals:  # both: the worker took the second job after the first failed
        assert final.state is JobState.FAILED and final.attempts == 1 and final.error is not None
        assert final.error.code == "internal" and "simulated encoder crash" in final.error.message
    assert worker.proc.poll() is None


def test_a_job_canceled_while_its_retry_is_being_scheduled_stays_canceled(rt: Runtime) -> None:
    job_id = uuid.uuid4().hex

    def cancel_then_fail() -> None:  # the user cancels as the input's storage fails
        rt.status.transition(job_id, JobState.CANCELED)
        raise StorageUnavailable("the input's storage did not answer")

    image = render_input(rt)
    rt.store.on_read = cancel_then_fail  # type: ignore[attr-defined]
    outcome = run_job(rt, job_id, {"image": image, **REQUEST}, "w@test")
    assert outcome.state is JobState.CANCELED
    assert rt.status.redis.zscore(keys.RETRY_DUE, job_id) is None  # no retry is scheduled
    record = rt.status.get(job_id)
    assert record.state is JobState.CANCELED and rt.status.holder(job_id) is None


def test_a_job_canceled_as_its_stopping_worker_hands_it_back_stays_canceled(rt: Runtime) -> None:
    job_id = uuid.uuid4().hex

    def cancel_and_stop() -> None:  # the worker's grace ends and the user cancels, at the same moment
        rt.status.transition(job_id, JobState.CANCELED)
        rt.heartbeat._hand_back_at = 0.0  # what the heartbeat sets when the worker's stop deadline has passed

    image = render_input(rt)
    rt.store.on_read = cancel_and_stop  # type: ignore[attr-defined]
    outcome = run_job(rt, job_id, {"image": image, **REQUEST}, "w@test")
    assert outcome.state is None
    assert rt.status.redis.zscore(keys.RETRY_DUE, job_id) is None  # not sent back to the queue
    assert rt.status.get(job_id).state is JobState.CANCELED and rt.status.holder(job_id) is None


def test_a_spooled_upload_that_fails_otherwise_keeps_its_video_and_tries_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    class DiskTrouble(FileStore):
        fails = 1

        def put(self, name: str, data: bytes, content_type: str) -> Stored:
            if self.fails:
                self.fails -= 1
                raise OSError(28, "No space left on device")
            return super().put(name, data, content_type)

    store = DiskTrouble(tmp_path / "store")
    spool = Spool(store, tmp_path / "spool", 10**6, backoff_base=0.1, backoff_max=0.2)
    stored: list[Stored] = []
    try:
        spool.add(
            "job-1", "job-1/video.mp4", b"video bytes", "video/mp4", lambda tries: True, stored.append, lambda why: None
        )
    finally:
        spool.close(timeout=10)  # waits for the pending upload
    assert [s.key for s in stored] == ["job-1/video.mp4"]
    assert (tmp_path / "store" / "job-1" / "video.mp4").read_bytes() == b"video bytes"
    assert "No space left on device" in caplog.text


def render_input(rt: Runtime) -> str:
    png = io.BytesIO()
    Image.new("RGB", (64, 64), (9, 9, 9)).save(png, format="PNG")
    return rt.store.put(f"inputs/{uuid.uuid4().hex}.png", png.getvalue(), "image/png").ref


def test_a_requeue_or_an_end_whose_reply_was_lost_is_taken_as_done(rt: Runtime) -> None:
    """Redis ran the write, then the connection dropped before its answer (a restart, a failover); redis-py ran
    it again and was told the job was there already. The requeue took that for a cancel (nothing scheduled: the
    job waited `queued` for ever), and a final write announced nothing."""
    from worker.errors import JobFailed
    from worker.outcome import Attempt, end_job
    from worker.render import _requeue

    requeued, ended = uuid.uuid4().hex, uuid.uuid4().hex
    for job_id in (requeued, ended):
        rt.status.create(job_id, {"image": "x", **REQUEST})
        rt.status.claim(job_id, "w@test/1", lease_seconds=30)
    error = JobFailed(ErrorCode.STORAGE_UNAVAILABLE, "storage unreachable")
    due = rt.status.server_time() + 60
    rt.status.transition(requeued, JobState.QUEUED, fence=1, error=error.as_error(), stage="retrying", due=due)
    outcome = _requeue(rt, Attempt(requeued, 1, "w@test/1"), error, 60)  # the repeat
    assert outcome.state is JobState.QUEUED
    assert rt.status.get(requeued).state is JobState.QUEUED
    assert rt.status.redis.zscore(keys.RETRY_DUE, requeued) is not None  # the first run's schedule stands

    rt.status.transition(ended, JobState.SUCCEEDED, fence=1)
    assert end_job(rt, Attempt(ended, 1, "w@test/1"), JobState.SUCCEEDED).state is JobState.SUCCEEDED


def test_the_previous_job_s_slow_upload_does_not_count_against_the_next_job_s_time_limit(rt: Runtime) -> None:
    """The finisher holds one tail at a time: the next render waits for it, and that wait is not its own."""
    rt.settings.job_timeout = 1.5  # the render itself takes a fraction of it
    rt.finisher.submit("previous", lambda: time.sleep(2.5))  # the previous job, uploading slowly
    job = rt.status.get(render(rt))
    assert job.state is JobState.SUCCEEDED, job.error

    rt.settings.job_timeout = 0.2
    stopped = rt.status.get(render(rt))  # its own render takes longer: stopped
    assert stopped.state is JobState.FAILED and stopped.error is not None and stopped.error.code == "timeout"


def test_a_process_killed_while_its_job_waits_for_the_previous_upload_hands_that_job_back(rt: Runtime) -> None:
    """Celery's hard time limit counts the wait for the previous job's upload: a kill then is no fault of the
    job, whose render had ended. The main process hands it back (worker.timelimit), attempt not counted."""
    rt.finisher.go.clear()  # type: ignore[attr-defined]
    rt.finisher.submit("previous", lambda: None)  # the previous job's upload, stalled
    png = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 200, 90)).save(png, format="PNG")
    image = rt.store.put(f"inputs/{uuid.uuid4().hex}.png", png.getvalue(), "image/png").ref
    job_id = uuid.uuid4().hex
    task = threading.Thread(target=run_job, args=(rt, job_id, {"image": image, **REQUEST}, "w@test"))
    task.start()
    deadline = time.monotonic() + 60
    while (record := rt.status.get(job_id) if rt.status.state(job_id) else None) is None or record.stage != "upload":
        assert time.monotonic() < deadline and task.is_alive(), record
        time.sleep(0.05)
    hard = HardLimit()
    hard.attach(rt.status, notify=lambda job_id: None)
    assert hard.fail(job_id, f"w@test/{os.getpid()}", 13) is False  # not failed `timeout`...
    back = rt.status.get(job_id)
    assert back.state is JobState.QUEUED and back.stage == "handed_back" and back.handbacks == 1  # ...handed back
    rt.finisher.go.set()
    task.join(timeout=60)
    rt.finisher.drain()
    assert rt.status.get(job_id).state is JobState.QUEUED  # the killed process's late upload changes nothing
