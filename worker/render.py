"""One job, start to finish, in numbered steps. The Celery task is a thin wrapper around `run_job`.

Every way a job can end is written to its record: success with a result, or failure with an
error code. Nothing a request contains can take the worker process down.

Steps 1-4 run in the task and hold the GPU; step 5 (the encoder's last frames, the upload, the final
status) is handed to the process's Finisher, so the next job can start on the GPU meanwhile.

From its claim to its final status a job holds a lease (producer.status), kept alive by the process's
heartbeat; every write it makes is fenced by its attempt number, so a worker that lost its lease (frozen,
cut off) can never overwrite the attempt that took the job over.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import secrets
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import redis
import torch

from producer.contract import (
    ErrorCode,
    InvalidParameter,
    JobRequest,
    JobState,
    Stage,
    check_job_id,
    check_request,
    result_name,
    shown,
)
from producer.status import AttemptsExhausted, InvalidTransition, JobNotFound, Leased, MalformedRecord, StatusStore
from producer.storage import StorageUnavailable, Stored
from worker import webhooks
from worker.decode import OutOfMemory
from worker.errors import HandBack, JobCanceled, JobFailed, backoff
from worker.events import TaskEvents
from worker.inputs import fetch_image, fit, open_image
from worker.runtime import Runtime
from worker.spool import SpoolFull
from worker.video import PendingVideo, Stopwatch, start_video

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Attempt:
    """One execution of a job: its number fences every write, `holder` names the lease's owner."""

    job_id: str
    number: int
    holder: str


class Progress:
    """Writes stage and progress to the record, at most every `interval` seconds unless forced, and
    raises JobCanceled as soon as the record is no longer this attempt's `started` (checked on every call),
    or HandBack once `hand_back()` says the worker's stop grace period is over."""

    def __init__(
        self,
        status: StatusStore,
        attempt: Attempt,
        interval: float = 0.25,
        clock: Callable[[], float] = time.monotonic,
        hand_back: Callable[[], bool] = lambda: False,
        events: TaskEvents | None = None,
    ):
        self.status, self.attempt, self.interval, self.clock = status, attempt, interval, clock
        self.hand_back, self.events = hand_back, events
        self._last = self._last_check = float("-inf")

    def check(self) -> None:
        """Between the UNet's blocks, inside a step (a step at the caps takes seconds on a GPU): the same stop
        conditions as a step's, with the record read at most every `interval` seconds."""
        if self.hand_back():
            raise HandBack(self.attempt.job_id)
        now = self.clock()
        if now - self._last_check < self.interval:
            return
        self._last_check = now
        try:
            if self.status.state(self.attempt.job_id) is not JobState.STARTED:
                raise JobCanceled(self.attempt.job_id)
        except redis.RedisError:  # Redis restarting: the next step's write will tell
            return

    def __call__(self, stage: str, progress: float, *, force: bool = False, **extra: Any) -> None:
        if self.hand_back():
            raise HandBack(self.attempt.job_id)
        now = self.clock()
        job_id = self.attempt.job_id
        try:
            if force or now - self._last >= self.interval:
                self._last = now
                fraction = round(min(max(progress, 0.0), 1.0), 4)
                if not self.status.update(job_id, fence=self.attempt.number, stage=stage, progress=fraction, **extra):
                    raise JobCanceled(job_id)
                if self.events is not None:
                    self.events.progress(job_id, stage, fraction, force=force)
            elif self.status.state(job_id) is not JobState.STARTED:
                raise JobCanceled(job_id)
        except redis.RedisError as exc:  # Redis restarting: the render goes on, the record catches up later
            log.warning("job %s: progress not written (%s)", job_id, exc)


def run_job(
    rt: Runtime, job_id: Any, raw_request: Any, worker: str, queue: str | None = None, task_id: str | None = None
) -> dict[str, Any]:
    # 1. Check the message: its id, its request, and that it asks for what the job's record asks for.
    accepted = _accept(rt, job_id, raw_request, queue)
    if isinstance(accepted, dict):
        return accepted
    request = accepted

    # 2. Claim the job and its lease.
    attempt = _claim(rt, job_id, worker, task_id)
    if isinstance(attempt, dict):
        return attempt
    if request.model and request.model != (served := rt.settings.served_model()):
        wrong = f"this worker serves model {served!r}, the job asks for {request.model!r} (it reached the wrong queue)"
        return _fail(rt, attempt, JobFailed(ErrorCode.INVALID_INPUT, wrong))
    try:
        rt.settings.check_caps(request)  # the producer checked with its own settings: these are this GPU's
    except InvalidParameter as exc:
        return _fail(rt, attempt, JobFailed(ErrorCode.INVALID_INPUT, str(exc)))

    # 3-4. Fetch the image and render on the device.
    timings = {"load": round(rt.take_load_seconds(), 4)}
    memory: dict[str, Any] = {"decode_chunk_size": 0}
    seed = request.seed if request.seed is not None else secrets.randbelow(2**32)
    try:
        with _peak_memory(rt.renderer.device, memory):
            pending = _render(rt, attempt, request, seed, timings, memory)
    except JobCanceled:
        log.info("job %s canceled (or taken over) while rendering; the GPU is free", job_id)
        rt.heartbeat.release(job_id)
        _ended(rt, job_id)
        return {"job_id": job_id, "state": JobState.CANCELED.value}
    except HandBack:
        return _hand_back(rt, attempt)
    except JobFailed as exc:
        if exc.transient and (delay := _retry_delay(rt, attempt.number)) is not None:
            return _requeue(rt, attempt, exc, delay)
        return _fail(rt, attempt, exc, timings=timings, memory=memory)
    except Exception as exc:
        return _fail(rt, attempt, exc, timings=timings, memory=memory)

    # 5. Hand the rest to the finisher and free the GPU for the next job.
    rt.finisher.submit(job_id, lambda: _complete(rt, attempt, request, seed, pending, timings, memory))
    return {"job_id": job_id, "state": JobState.STARTED.value, "stage": "finishing"}


def _accept(rt: Runtime, job_id: Any, raw_request: Any, queue: str | None) -> JobRequest | dict[str, Any]:
    """The request to render, or the outcome for a message that must not run.

    An id outside the grammar names no record, key or file: dropped. A malformed request fails its own job,
    never the worker, and never a job that already has a record. The record is the truth: a plain Celery
    client may have sent none (it is created here), and a message whose request is not its record's is
    refused, or any sender could re-render someone else's job."""
    status = rt.status
    try:
        check_job_id(job_id)
    except InvalidParameter:
        log.error("dropped a message with an invalid job id %s", shown(job_id))
        return {"job_id": None, "state": None, "dropped": "invalid job_id"}
    body = raw_request if isinstance(raw_request, dict) else {}
    try:
        request = check_request(body)
    except InvalidParameter as exc:
        if not status.create(job_id, body, queue=queue):
            log.warning("job %s: dropped a message with an invalid request (%s); its record stands", job_id, exc)
            return {"job_id": job_id, "state": None, "dropped": "invalid request"}
        log.warning("job %s has an invalid request: %s", job_id, exc)
        return _fail(rt, Attempt(job_id, 0, ""), JobFailed(ErrorCode.INVALID_INPUT, f"invalid request: {exc}"))
    if not status.create(job_id, request.model_dump(), queue=queue) and (refused := _refused(status, job_id, request)):
        log.warning("job %s: message dropped: %s", job_id, refused)
        return {"job_id": job_id, "state": None, "dropped": refused}
    return request


def _refused(status: StatusStore, job_id: str, request: JobRequest) -> str | None:
    """Why a message for a job that has a record must not run it; None when the record asks for the same."""
    try:
        recorded = check_request(status.get(job_id).request)
    except JobNotFound:  # expired just now: the claim finds no record and refuses on its own
        return None
    except (MalformedRecord, InvalidParameter) as exc:
        return f"the job's record is unreadable ({exc})"
    return None if recorded == request else "its request differs from the job's record"


def _claim(rt: Runtime, job_id: str, worker: str, task_id: str | None) -> Attempt | dict[str, Any]:
    """This process's attempt at the job, or the outcome when it must not run here."""
    holder = f"{worker}/{os.getpid()}"
    try:
        number = rt.status.claim(
            job_id, holder, rt.settings.lease_ttl, max_attempts=rt.settings.max_attempts,
            worker=worker, started_at=rt.status.now(), stage=Stage.FETCH, progress=0.0, error=None,
        )  # fmt: skip
    except Leased as exc:  # a redelivered message: the job runs on a live worker, it must not run twice
        log.info("job %s not run here: %s", job_id, exc)
        return {"job_id": job_id, "state": JobState.STARTED.value, "running_on": exc.holder}
    except AttemptsExhausted as exc:  # its worker died on every attempt: a poison job
        lost = JobFailed(ErrorCode.WORKER_LOST, f"{exc}; it is not tried again")
        return _fail(rt, Attempt(job_id, exc.attempts, holder), lost, unleased=True)
    except InvalidTransition as exc:  # canceled while queued, or already finished elsewhere
        log.info("job %s not run: %s", job_id, exc)
        if exc.current is JobState.CANCELED:
            _notify(rt, job_id)
        return {"job_id": job_id, "state": exc.current.value if exc.current else None}
    rt.heartbeat.hold(job_id, holder, worker)
    rt.events.track(job_id, task_id)
    rt.events.started(job_id)
    record = rt.status.get(job_id)
    if record.webhook and not (rt.webhooks and rt.webhooks.secret):  # said on the job, not only in this log
        unsigned = "not called: the worker has no SVDQ_WEBHOOK_SECRET to sign it with"
        log.warning("job %s: webhook %s", job_id, unsigned)
        rt.status.update(job_id, fence=number, webhook_error=unsigned)
    rt.metrics.job_started(record)
    webhooks.notify_record(rt.webhooks, record)
    return Attempt(job_id, number, holder)


def _render(
    rt: Runtime, attempt: Attempt, request: JobRequest, seed: int, timings: dict[str, float], memory: dict[str, Any]
) -> PendingVideo:
    # 3. Fetch and decode the input image.
    started = time.perf_counter()
    data = fetch_image(
        rt.store, request.image, rt.settings.max_image_bytes, allow_private_urls=rt.settings.allow_private_urls
    )
    image = fit(open_image(data, rt.settings.max_image_pixels), request.width, request.height)
    Stopwatch(timings).add("fetch", started)

    # 4. Denoise, then decode streamed into the encoder (worker.video).
    progress = Progress(rt.status, attempt, hand_back=rt.heartbeat.should_hand_back, events=rt.events)
    return start_video(
        rt.renderer,
        image,
        request,
        seed,
        rt.settings,
        timings=timings,
        memory=memory,
        progress=progress,
        checkpoint=progress.check,
    )


def _complete(
    rt: Runtime,
    attempt: Attempt,
    request: JobRequest,
    seed: int,
    pending: PendingVideo,
    timings: dict[str, float],
    memory: dict[str, Any],
) -> None:
    """Step 5, on the finisher's thread: the encoder's last frames, the upload, the final status."""
    job_id = attempt.job_id
    try:
        Progress(rt.status, attempt, events=rt.events)(Stage.UPLOAD, 0.95, force=True)
        video = pending.finish()
    except JobCanceled:
        log.info("job %s canceled before its upload", job_id)
        rt.heartbeat.release(job_id)
        _ended(rt, job_id)
        return
    except Exception as exc:
        _fail(rt, attempt, exc, timings=timings, memory=memory)
        return
    finally:
        pending.close()

    def succeed(stored: Stored) -> None:
        result = {
            "key": stored.key, "format": request.format, "url": rt.store.public_url(stored.key),
            "bytes": len(video.data), "frames": video.frames, "width": request.width, "height": request.height,
            "fps": request.fps, "seed": seed,
        }  # fmt: skip
        log.info("job %s succeeded: %s (%d bytes)", job_id, stored.key, len(video.data))
        _finish(rt, attempt, JobState.SUCCEEDED, result=result, timings=timings, memory=memory, stage=Stage.DONE,
                progress=1.0, error=None)  # fmt: skip

    name, content_type = result_name(job_id, request.format), video.format.content_type
    started = time.perf_counter()
    try:
        stored = rt.store.put(name, video.data, content_type)
    except StorageUnavailable as exc:
        # The render is done: keep it and upload it when storage is back, never render it again.
        _spool(rt, attempt, name, video.data, content_type, exc, succeed, timings, memory)
        return
    except Exception as exc:
        _fail(rt, attempt, exc, timings=timings, memory=memory)
        return
    Stopwatch(timings).add("upload", started)
    succeed(stored)


def _spool(
    rt: Runtime,
    attempt: Attempt,
    name: str,
    data: bytes,
    content_type: str,
    exc: StorageUnavailable,
    succeed: Callable[[Stored], None],
    timings: dict[str, float],
    memory: dict[str, Any],
) -> None:
    job_id = attempt.job_id

    def pending_error(tries: int) -> dict[str, str]:
        message = f"{exc}; the rendered video waits in the worker's upload spool ({tries} uploads tried)"
        return {"code": ErrorCode.STORAGE_UNAVAILABLE.value, "message": message}

    def still_wanted(tries: int) -> bool:
        return rt.status.update(job_id, fence=attempt.number, stage=Stage.UPLOAD_PENDING, error=pending_error(tries))

    try:
        rt.spool.add(job_id, name, data, content_type, still_wanted, succeed)
    except SpoolFull as full:
        _fail(rt, attempt, JobFailed(ErrorCode.SPOOL_FULL, f"storage unreachable ({exc}) and {full}"),
              timings=timings, memory=memory)  # fmt: skip
        return
    log.warning("job %s: storage unreachable (%s); the video waits in the upload spool", job_id, exc)
    with contextlib.suppress(redis.RedisError):
        rt.status.update(job_id, fence=attempt.number, stage=Stage.UPLOAD_PENDING, error=pending_error(1))


def _retry_delay(rt: Runtime, attempts: int) -> float | None:
    """Seconds to wait before the next attempt, or None when this was the last one allowed."""
    if attempts >= rt.settings.max_attempts:
        return None
    return backoff(attempts, rt.settings.retry_backoff, rt.settings.retry_backoff_max, random.random())


def _requeue(rt: Runtime, attempt: Attempt, exc: JobFailed, delay: float) -> dict[str, Any]:
    log.warning("job %s: %s; retrying in %.1fs", attempt.job_id, exc, delay)
    rt.heartbeat.release(attempt.job_id)
    try:
        rt.status.transition(attempt.job_id, JobState.QUEUED, fence=attempt.number, error=exc.as_error(),
                             stage=Stage.RETRYING, progress=0.0)  # fmt: skip
    except InvalidTransition:  # canceled meanwhile: no retry
        _ended(rt, attempt.job_id)
        return {"job_id": attempt.job_id, "state": JobState.CANCELED.value}
    rt.events.requeued(attempt.job_id, exc.as_error(), "retrying")
    return {"job_id": attempt.job_id, "state": JobState.QUEUED.value, "retry_in": round(delay, 3)}


def _hand_back(rt: Runtime, attempt: Attempt) -> dict[str, Any]:
    """The worker is stopping and its grace period is over: back to the queue, for another worker."""
    log.warning("job %s handed back to its queue: the worker is stopping", attempt.job_id)
    rt.heartbeat.release(attempt.job_id)
    try:
        rt.status.transition(attempt.job_id, JobState.QUEUED, fence=attempt.number, stage=Stage.HANDED_BACK,
                             progress=0.0)  # fmt: skip
    except InvalidTransition:
        _ended(rt, attempt.job_id)
        return {"job_id": attempt.job_id, "state": None}
    rt.events.requeued(attempt.job_id, None, "handed back: its worker is stopping")
    return {"job_id": attempt.job_id, "state": JobState.QUEUED.value, "retry_in": 0}


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


def _fail(rt: Runtime, attempt: Attempt, exc: BaseException, **fields: Any) -> dict[str, Any]:
    return _finish(rt, attempt, JobState.FAILED, error=_error_of(attempt.job_id, exc), **fields)


def _finish(rt: Runtime, attempt: Attempt, state: JobState, *, unleased: bool = False, **fields: Any) -> dict[str, Any]:
    job_id = attempt.job_id
    rt.heartbeat.release(job_id)
    fence = attempt.number if attempt.number else None
    try:
        rt.status.transition(job_id, state, fence=fence, unleased=unleased, **fields)
    except InvalidTransition as exc:  # canceled while it ran (the cancel stands), or taken over
        log.info("job %s: result dropped, %s", job_id, exc)
        return {"job_id": job_id, "state": exc.current.value if exc.current else None}
    _ended(rt, job_id)
    return {"job_id": job_id, "state": state.value}


def _notify(rt: Runtime, job_id: str) -> None:
    """A job canceled while queued: Flower and the webhook hear of it when its message comes up."""
    with contextlib.suppress(JobNotFound, MalformedRecord):
        record = rt.status.get(job_id)
        rt.events.ended(record)
        webhooks.notify_record(rt.webhooks, record)


def _ended(rt: Runtime, job_id: str) -> None:
    """The job has reached its final state (or was canceled or taken over): webhook, metrics, Flower."""
    record = rt.status.get(job_id)
    if record.state.is_terminal():  # not when another attempt took the job over: that one reports it
        rt.metrics.job_ended(record)
        rt.events.ended(record)
        webhooks.notify_record(rt.webhooks, record)
