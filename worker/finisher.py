"""A job's tail: the encoder's last frames, the upload (or the spool) and the final status, on a thread of its own.

While job N is finished here, the task that rendered it has returned, so Celery hands job N+1 to the
GPU at once. The hand-off is bounded to one: the next job to reach it waits for the previous tail first,
so at most one finished video is held in memory and a crash loses at most the job being finished.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import redis

from producer.contract import ErrorCode, JobState, Stage, result_name
from producer.storage import StorageUnavailable, Stored
from worker.errors import JobCanceled, JobFailed
from worker.outcome import Work, announce_end, announce_if_canceled, end_job, fail_work
from worker.progress import Progress
from worker.spool import SpoolFull
from worker.video import PendingVideo, Stopwatch

if TYPE_CHECKING:
    from worker.runtime import Runtime

log = logging.getLogger("worker.render")  # the job's story reads as one log


class Finisher:
    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def submit(self, name: str, work: Callable[[], None]) -> None:
        """Start `work` once the previous one is done. `work` records its own failures."""
        with self._lock:
            self.drain()
            self._thread = threading.Thread(target=self._run, args=(name, work), name=f"svdq-finish-{name}")
            self._thread.start()

    @staticmethod
    def _run(name: str, work: Callable[[], None]) -> None:
        try:
            work()
        except Exception:  # work records failures itself; this is the last line of defence
            log.exception("finishing %s failed", name)

    def busy(self) -> bool:
        thread = self._thread
        return thread is not None and thread.is_alive()

    def drain(self) -> None:
        """Wait for the job being finished, if any (before the next hand-off, and at shutdown)."""
        thread = self._thread
        if thread is not None:
            thread.join()


def complete(rt: Runtime, work: Work, pending: PendingVideo) -> None:
    """Step 5, on the finisher's thread: the encoder's last frames, the upload, the final status."""
    attempt, request, job_id = work.attempt, work.request, work.attempt.job_id
    try:
        Progress(rt.status, attempt, events=rt.events)(Stage.UPLOAD, 0.95, force=True)
        video = pending.finish()
    except JobCanceled:
        log.info("job %s canceled before its upload", job_id)
        rt.heartbeat.release(job_id)
        announce_end(rt, job_id)
        return
    except Exception as exc:
        fail_work(rt, work, exc)
        return
    finally:
        pending.close()

    def succeed(stored: Stored) -> None:
        result = {
            "key": stored.key,
            "format": request.format,
            "url": rt.store.public_url(stored.key),
            "bytes": len(video.data),
            "frames": video.frames,
            "width": request.width,
            "height": request.height,
            "fps": request.fps,
            "seed": work.seed,
        }
        log.info("job %s succeeded: %s (%d bytes)", job_id, stored.key, len(video.data))
        end_job(
            rt,
            attempt,
            JobState.SUCCEEDED,
            result=result,
            timings=work.timings,
            memory=work.memory,
            stage=Stage.DONE,
            progress=1.0,
            error=None,
        )

    name, content_type = result_name(job_id, request.format), video.format.content_type
    started = time.perf_counter()
    try:
        stored = rt.store.put(name, video.data, content_type)
    except StorageUnavailable as exc:
        # The render is done: keep it and upload it when storage is back, never render it again.
        spool_video(rt, work, name, video.data, content_type, exc, succeed)
        return
    except Exception as exc:
        fail_work(rt, work, exc)
        return
    Stopwatch(work.timings).add("upload", started)
    succeed(stored)


def spool_video(
    rt: Runtime,
    work: Work,
    name: str,
    data: bytes,
    content_type: str,
    exc: StorageUnavailable,
    succeed: Callable[[Stored], None],
) -> None:
    attempt = work.attempt
    job_id = attempt.job_id

    def pending_error(tries: int) -> dict[str, str]:
        message = f"{exc}; the rendered video waits in the worker's upload spool ({tries} uploads tried)"
        return {"code": ErrorCode.STORAGE_UNAVAILABLE.value, "message": message}

    def still_wanted(tries: int) -> bool:
        if rt.status.update(job_id, fence=attempt.number, stage=Stage.UPLOAD_PENDING, error=pending_error(tries)):
            return True
        rt.heartbeat.release(job_id)  # canceled or taken over: the video is dropped, and its lease
        announce_if_canceled(rt, attempt)
        return False

    def lost(why: str) -> None:
        fail_work(rt, work, JobFailed(ErrorCode.SPOOL_FULL, f"storage unreachable ({exc}) and {why}"))

    try:
        rt.spool.add(job_id, name, data, content_type, still_wanted, succeed, lost)
    except SpoolFull as full:  # or the disk would not take it
        lost(str(full))
        return
    log.warning("job %s: storage unreachable (%s); the video waits in the upload spool", job_id, exc)
    with contextlib.suppress(redis.RedisError):
        rt.status.update(job_id, fence=attempt.number, stage=Stage.UPLOAD_PENDING, error=pending_error(1))
