"""One job, start to finish, in numbered steps. The Celery task is a thin wrapper around `run_job`.

Every way a job can end is written to its record: success with a result, or failure with an
error code. Nothing a request contains can take the worker process down.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from producer.contract import ErrorCode, InvalidParameter, JobRequest, JobState, check_request, result_name
from producer.status import InvalidTransition, StatusStore
from producer.storage import StorageUnavailable
from worker.decode import OutOfMemory
from worker.errors import JobFailed
from worker.inputs import fetch_image, open_image
from worker.runtime import Runtime
from worker.video import Stopwatch, make_video

log = logging.getLogger(__name__)


class Progress:
    """Writes stage and progress to the record, at most every `interval` seconds unless forced."""

    def __init__(
        self,
        status: StatusStore,
        job_id: str,
        interval: float = 0.25,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.status, self.job_id, self.interval, self.clock = status, job_id, interval, clock
        self._last = float("-inf")

    def __call__(self, stage: str, progress: float, *, force: bool = False) -> None:
        now = self.clock()
        if force or now - self._last >= self.interval:
            self._last = now
            self.status.update(self.job_id, stage=stage, progress=round(min(max(progress, 0.0), 1.0), 4))


@contextmanager
def _peak_memory(device: torch.device, memory: dict[str, Any]) -> Iterator[None]:
    """Record the device's memory peak over the job (CUDA only)."""
    if device.type != "cuda":
        yield
        return
    torch.cuda.reset_peak_memory_stats(device)
    try:
        yield
    finally:
        memory["peak_bytes"] = int(torch.cuda.max_memory_allocated(device))


def run_job(rt: Runtime, job_id: str, raw_request: Any, worker: str) -> dict[str, Any]:
    status = rt.status

    # 1. Check the message: a malformed request fails its own job, never the worker.
    try:
        request = check_request(raw_request if isinstance(raw_request, dict) else {})
    except InvalidParameter as exc:
        return _fail_unstarted(status, job_id, raw_request, exc)

    # 2. Claim the job. A plain Celery client may have sent no record: create it first.
    status.create(job_id, request.model_dump())
    try:
        status.transition(
            job_id,
            JobState.STARTED,
            count_attempt=True,
            worker=worker,
            started_at=status.now(),
            stage="fetch",
            progress=0.0,
            error=None,
        )
    except InvalidTransition as exc:  # canceled while queued, or already finished elsewhere
        log.info("job %s not run: %s", job_id, exc)
        return {"job_id": job_id, "state": exc.current.value if exc.current else None}

    timings = {"load": round(rt.take_load_seconds(), 4)}
    memory: dict[str, Any] = {"decode_chunk_size": 0}
    result: dict[str, Any] = {}
    error: dict[str, str] | None = None
    with _peak_memory(rt.renderer.device, memory):
        try:
            result = _render(rt, job_id, request, timings, memory)
        except JobFailed as exc:
            log.warning("job %s failed: %s", job_id, exc)
            error = exc.as_error()
        except OutOfMemory:
            log.warning("job %s ran out of device memory: %s", job_id, memory)
            message = "the GPU ran out of memory, even with forward chunking and a decode chunk of 1"
            error = {"code": ErrorCode.OUT_OF_MEMORY.value, "message": message}
        except Exception as exc:
            log.exception("job %s crashed", job_id)
            error = {"code": ErrorCode.INTERNAL.value, "message": f"{type(exc).__name__}: {str(exc)[:500]}"}
    if error is not None:
        return _finish(status, job_id, JobState.FAILED, error=error, timings=timings, memory=memory)
    log.info("job %s succeeded: %s (%d bytes)", job_id, result["key"], result["bytes"])
    return _finish(
        status,
        job_id,
        JobState.SUCCEEDED,
        result=result,
        timings=timings,
        memory=memory,
        stage="done",
        progress=1.0,
    )


def _render(
    rt: Runtime, job_id: str, request: JobRequest, timings: dict[str, float], memory: dict[str, Any]
) -> dict[str, Any]:
    progress = Progress(rt.status, job_id)
    clock = Stopwatch(timings)

    # 3. Fetch and decode the input image.
    started = time.perf_counter()
    image = open_image(fetch_image(rt.store, request.image))
    clock.add("fetch", started)

    # 4. Render: denoise, then decode streamed into the encoder (worker.video).
    seed = request.seed if request.seed is not None else secrets.randbelow(2**32)
    video = make_video(rt.renderer, image, request, seed, rt.settings, timings=timings, memory=memory,
                       progress=progress)  # fmt: skip

    # 5. Upload the video and make a URL for it.
    progress("upload", 0.95, force=True)
    started = time.perf_counter()
    try:
        stored = rt.store.put(result_name(job_id, request.format), video.data, video.format.content_type)
        url = rt.store.public_url(stored.key)
    except StorageUnavailable as exc:
        raise JobFailed(ErrorCode.STORAGE_UNAVAILABLE, str(exc)) from None
    clock.add("upload", started)
    return {
        "key": stored.key,
        "format": request.format,
        "url": url,
        "bytes": len(video.data),
        "frames": video.frames,
        "width": request.width,
        "height": request.height,
        "fps": request.fps,
        "seed": seed,
    }


def _finish(status: StatusStore, job_id: str, state: JobState, **fields: Any) -> dict[str, Any]:
    try:
        status.transition(job_id, state, **fields)
    except InvalidTransition as exc:  # canceled while it ran: the cancel stands
        log.info("job %s: result dropped, %s", job_id, exc)
        return {"job_id": job_id, "state": exc.current.value if exc.current else None}
    return {"job_id": job_id, "state": state.value}


def _fail_unstarted(status: StatusStore, job_id: str, raw_request: Any, exc: InvalidParameter) -> dict[str, Any]:
    log.warning("job %s has an invalid request: %s", job_id, exc)
    status.create(job_id, raw_request if isinstance(raw_request, dict) else {})
    error = {"code": ErrorCode.INVALID_INPUT.value, "message": f"invalid request: {exc}"}
    return _finish(status, job_id, JobState.FAILED, error=error)
