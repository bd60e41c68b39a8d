"""A job past its time limit (SVDQ_JOB_TIMEOUT) ends `failed` with `timeout`, even when its process is stuck.

The render stops itself at its next check (worker.progress: each UNet block, decode chunk and fetch wait) and the
encoder waits for ffmpeg no longer than the deadline: the job fails and the process takes the next one, its model
still warm. A process stuck where no check runs (a hung device call, a deadlock) cannot stop itself, and its
heartbeat thread may well keep its lease alive: the job would stay `started` for ever. Celery's hard time limit
(`task_time_limit`, WorkerSettings.time_limit) kills that process, and the pool starts another (the model loads
again). Celery tells the main process first (worker.events.Request.on_timeout), and this fails the job there,
fenced by the killed process's lease: a job another worker took over meanwhile, or that ended, is left alone.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import redis

from producer.contract import InvalidParameter, JobState, check_job_id, shown
from producer.status import InvalidTransition, JobNotFound, MalformedRecord, StatusStore
from worker.errors import timed_out

log = logging.getLogger(__name__)


class HardLimit:
    """Fails the jobs whose process Celery's hard time limit kills; `attach` gives it its Redis at start."""

    def __init__(self) -> None:
        self.status: StatusStore | None = None
        self.notify: Callable[[str], None] = lambda job_id: None

    def attach(self, status: StatusStore, notify: Callable[[str], None]) -> None:
        self.status, self.notify = status, notify

    def exceeded(self, job_id: object, holder: str, seconds: float) -> threading.Thread | None:
        """Called in the main process as Celery kills the process that ran `job_id` (lease `holder`). The write
        goes on a thread: this runs in the worker's event loop, which must not wait for Redis."""
        try:
            checked = check_job_id(job_id)
        except InvalidParameter:
            return None  # a message the render dropped: no record of its own
        thread = threading.Thread(
            target=self.fail, args=(checked, holder, seconds), name="svdq-time-limit", daemon=True
        )
        thread.start()
        return thread

    def fail(self, job_id: str, holder: str, seconds: float) -> bool:
        status = self.status
        if status is None:
            log.error("job %s: past the hard time limit before this worker was ready; left to its lease", job_id)
            return False
        try:
            if status.holder(job_id) != holder:  # ended, or its lease lapsed and another attempt took it
                return False
            record = status.get(job_id)
            killed = f"its worker process was still stuck {seconds:g}s after it started, and was killed"
            # The lease check and this write are two steps; the fence closes the gap (a takeover counts an attempt).
            status.transition(job_id, JobState.FAILED, fence=record.attempts, error=timed_out(killed).as_error())
        except (InvalidTransition, JobNotFound, MalformedRecord):
            return False
        except redis.RedisError as exc:
            log.error("job %s: past the hard time limit, not failed (Redis: %s); left to its lease", shown(job_id), exc)
            return False
        log.error("job %s failed: timeout (%s killed after %gs)", job_id, holder, seconds)
        self.notify(job_id)
        return True


HARD = HardLimit()
