"""One job, start to finish, in numbered steps. The Celery task is a thin wrapper around `run_job`.

Every way a job can end is written to its record: success with a result, or failure with an
error code. Nothing a request contains can take the worker process down.

Steps 1-4 run in the task and hold the GPU; step 5 (the encoder's last frames, the upload, the final
status) is handed to the process's Finisher, so the next job can start on the GPU meanwhile.
"""

from __future__ import annotations

import logging
import random
import secrets
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from producer.contract import ErrorCode, InvalidParameter, JobRequest, JobState, check_request, result_name
from producer.status import InvalidTransition, StatusStore
from producer.storage import StorageUnavailable, Stored
from worker.decode import OutOfMemory
from worker.errors import JobCanceled, JobFailed, backoff
from worker.inputs import fetch_image, fit, open_image
from worker.runtime import Runtime
from worker.video import PendingVideo, Stopwatch, start_video

log = logging.getLogger(__name__)


class Progress:
    """Writes stage and progress to the record, at most every `interval` seconds unless forced, and
    raises JobCanceled as soon as the record is no longer `started` (checked on every call)."""

    def __init__(
        self, status: StatusStore, job_id: str, interval: float = 0.25, clock: Callable[[], float] = time.monotonic
    ):
        self.status, self.job_id, self.interval, self.clock = status, job_id, interval, clock
        self._last = float("-inf")

    def __call__(self, stage: str, progress: float, *, force: bool = False, **extra: Any) -> None:
        now = self.clock()
        if force or now - self._last >= self.interval:
            self._last = now
            fraction = round(min(max(progress, 0.0), 1.0), 4)
            if not self.status.update(self.job_id, stage=stage, progress=fraction, **extra):
                raise JobCanceled(self.job_id)
        elif self.status.state(self.job_id) is not JobState.STARTED:
            raise JobCanceled(self.job_id)


def run_job(rt: Runtime, job_id: str, raw_request: Any, worker: str) -> dict[str, Any]:
    status = rt.status

    # 1. Check the message: a malformed request fails its own job, never the worker.
    try:
        request = check_request(raw_request if isinstance(raw_request, dict) else {})
    except InvalidParameter as exc:
        log.warning("job %s has an invalid request: %s", job_id, exc)
        status.create(job_id, raw_request if isinstance(raw_request, dict) else {})
        return _fail(rt, job_id, JobFailed(ErrorCode.INVALID_INPUT, f"invalid request: {exc}"))

    # 2. Claim the job. A plain Celery client may have sent no record: create it first.
    status.create(job_id, request.model_dump())
    try:
        status.transition(
            job_id, JobState.STARTED, count_attempt=True,
            worker=worker, started_at=status.now(), stage="fetch", progress=0.0, error=None,
        )  # fmt: skip
    except InvalidTransition as exc:  # canceled while queued, or already finished elsewhere
        log.info("job %s not run: %s", job_id, exc)
        if exc.current is JobState.CANCELED:
            _notify(rt, job_id)
        return {"job_id": job_id, "state": exc.current.value if exc.current else None}
    _notify(rt, job_id)

    # 3-4. Fetch the image and render on the device.
    timings = {"load": round(rt.take_load_seconds(), 4)}
    memory: dict[str, Any] = {"decode_chunk_size": 0}
    seed = request.seed if request.seed is not None else secrets.randbelow(2**32)
    try:
        with _peak_memory(rt.renderer.device, memory):
            pending = _render(rt, job_id, request, seed, timings, memory)
    except JobCanceled:
        log.info("job %s canceled while rendering; the GPU is free", job_id)
        _notify(rt, job_id)
        return {"job_id": job_id, "state": JobState.CANCELED.value}
    except JobFailed as exc:
        if exc.transient and (delay := _retry_delay(rt, job_id)) is not None:
            return _requeue(status, job_id, exc, delay)
        return _fail(rt, job_id, exc, timings=timings, memory=memory)
    except Exception as exc:
        return _fail(rt, job_id, exc, timings=timings, memory=memory)

    # 5. Hand the rest to the finisher and free the GPU for the next job.
    rt.finisher.submit(job_id, lambda: _complete(rt, job_id, request, seed, pending, timings, memory))
    return {"job_id": job_id, "state": JobState.STARTED.value, "stage": "finishing"}


def _render(
    rt: Runtime, job_id: str, request: JobRequest, seed: int, timings: dict[str, float], memory: dict[str, Any]
) -> PendingVideo:
    # 3. Fetch and decode the input image.
    started = time.perf_counter()
    data = fetch_image(
        rt.store, request.image, rt.settings.max_image_bytes, allow_private_urls=rt.settings.allow_private_urls
    )
    image = fit(open_image(data, rt.settings.max_image_pixels), request.width, request.height)
    Stopwatch(timings).add("fetch", started)

    # 4. Denoise, then decode streamed into the encoder (worker.video).
    progress = Progress(rt.status, job_id)
    return start_video(
        rt.renderer, image, request, seed, rt.settings, timings=timings, memory=memory, progress=progress
    )


def _complete(
    rt: Runtime,
    job_id: str,
    request: JobRequest,
    seed: int,
    pending: PendingVideo,
    timings: dict[str, float],
    memory: dict[str, Any],
) -> None:
    """Step 5, on the finisher's thread: the encoder's last frames, the upload, the final status."""
    try:
        Progress(rt.status, job_id)("upload", 0.95, force=True)
        video = pending.finish()
        started = time.perf_counter()
        stored = _upload(rt, result_name(job_id, request.format), video.data, video.format.content_type)
        url = rt.store.public_url(stored.key)
        Stopwatch(timings).add("upload", started)
    except JobCanceled:
        log.info("job %s canceled before its upload", job_id)
        _notify(rt, job_id)
        return
    except Exception as exc:
        _fail(rt, job_id, exc, timings=timings, memory=memory)
        return
    finally:
        pending.close()
    result = {
        "key": stored.key, "format": request.format, "url": url, "bytes": len(video.data), "frames": video.frames,
        "width": request.width, "height": request.height, "fps": request.fps, "seed": seed,
    }  # fmt: skip
    log.info("job %s succeeded: %s (%d bytes)", job_id, stored.key, len(video.data))
    _finish(rt, job_id, JobState.SUCCEEDED, result=result, timings=timings, memory=memory, stage="done",
            progress=1.0)  # fmt: skip


def _retry_delay(rt: Runtime, job_id: str) -> float | None:
    """Seconds to wait before the next attempt, or None when this was the last one allowed."""
    attempts = rt.status.get(job_id).attempts
    if attempts >= rt.settings.max_attempts:
        return None
    return backoff(attempts, rt.settings.retry_backoff, rt.settings.retry_backoff_max, random.random())


def _requeue(status: StatusStore, job_id: str, exc: JobFailed, delay: float) -> dict[str, Any]:
    log.warning("job %s: %s; retrying in %.1fs", job_id, exc, delay)
    try:
        status.transition(job_id, JobState.QUEUED, error=exc.as_error(), stage="retrying", progress=0.0)
    except InvalidTransition:  # canceled meanwhile: no retry
        return {"job_id": job_id, "state": JobState.CANCELED.value}
    return {"job_id": job_id, "state": JobState.QUEUED.value, "retry_in": round(delay, 3)}


def _upload(rt: Runtime, name: str, data: bytes, content_type: str) -> Stored:
    """Put the video, retrying a storage outage in place: the render is done and is not redone."""
    s = rt.settings
    for attempt in range(1, s.max_attempts + 1):
        try:
            return rt.store.put(name, data, content_type)
        except StorageUnavailable as exc:
            if attempt == s.max_attempts:
                raise JobFailed(ErrorCode.STORAGE_UNAVAILABLE, f"{exc} (upload tried {attempt} times)") from None
            delay = backoff(attempt, s.retry_backoff, s.retry_backoff_max, random.random())
            log.warning("upload of %s failed (%s); retrying in %.1fs", name, exc, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


@contextmanager
def _peak_memory(device: torch.device, memory: dict[str, Any]) -> Iterator[None]:
    """Record the device's memory peak over the job's device work (CUDA only)."""
    if device.type != "cuda":
        yield
        return
    torch.cuda.reset_peak_memory_stats(device)
    try:
        yield
    finally:
        memory["peak_bytes"] = int(torch.cuda.max_memory_allocated(device))


def _error_of(job_id: str, exc: BaseException) -> dict[str, str]:
    """The record's `error` for an exception: known failures by their code, anything else as internal."""
    if isinstance(exc, JobFailed):
        log.warning("job %s failed: %s", job_id, exc)
        return exc.as_error()
    if isinstance(exc, OutOfMemory):
        log.warning("job %s ran out of device memory", job_id)
        message = "the GPU ran out of memory, even with forward chunking and a decode chunk of 1"
        return {"code": ErrorCode.OUT_OF_MEMORY.value, "message": message}
    log.error("job %s crashed", job_id, exc_info=exc)
    return {"code": ErrorCode.INTERNAL.value, "message": f"{type(exc).__name__}: {str(exc)[:500]}"}


def _fail(rt: Runtime, job_id: str, exc: BaseException, **fields: Any) -> dict[str, Any]:
    return _finish(rt, job_id, JobState.FAILED, error=_error_of(job_id, exc), **fields)


def _finish(rt: Runtime, job_id: str, state: JobState, **fields: Any) -> dict[str, Any]:
    try:
        rt.status.transition(job_id, state, **fields)
    except InvalidTransition as exc:  # canceled while it ran: the cancel stands
        log.info("job %s: result dropped, %s", job_id, exc)
        return {"job_id": job_id, "state": exc.current.value if exc.current else None}
    _notify(rt, job_id)
    return {"job_id": job_id, "state": state.value}


def _notify(rt: Runtime, job_id: str) -> None:
    """Queue the job's webhook for its current state, if it asked for one (sent off the job's thread)."""
    record = rt.status.get(job_id)
    if record.webhook and rt.webhooks is not None:
        event = f"job.{record.state.value}"
        rt.webhooks.send(record.webhook, event, f"{job_id}.{record.state.value}.{record.attempts}",
                         record.to_json_dict())  # fmt: skip
