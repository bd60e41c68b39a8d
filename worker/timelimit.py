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

from producer.contract import InvalidParameter, JobState, Stage, check_job_id, shown
from producer.status import InvalidTransition, JobNotFound, MalformedRecord, StatusStore
from worker.errors import timed_out

log = logging.getLogger(__name__)


class HardLimit:
    """Fails the jobs whose process Celery's hard time limit kills; `attach` gives it its Redis at start."""

    def __init__(self) -> None:
        self.status: StatusStore | None = None
        self.notify: Callable[[str], None] = lambda job_id: None
        self.requeued: Callable[[str], None] = lambda job_id: None
        # Pool processes this limit is killing: until one is gone and its replacement has loaded the model, the
        # worker takes no message (worker.gate), or that job would wait out the load here.
        self.killed: set[int] = set()

    def attach(
        self, status: StatusStore, notify: Callable[[str], None], requeued: Callable[[str], None] = lambda job_id: None
    ) -> None:
        """`notify`: a job failed here has ended (Flower, its webhook); `requeued`: one went back to its queue."""
        self.status, self.notify, self.requeued = status, notify, requeued

    def exceeded(self, job_id: object, holder: str, seconds: float, pid: int | None = None) -> threading.Thread | None:
        """Called in the main process as Celery kills the process `pid` that ran `job_id` (lease `holder`). The
        write goes on a thread: this runs in the worker's event loop, which must not wait for Redis."""
        if pid is not None:
            self.killed.add(pid)
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
        """Fail the job if `holder` (the killed process) still runs it; hand back the others it held."""
        status = self.status
        if status is None:
            log.error("job %s: past the hard time limit before this worker was ready; left to its lease", job_id)
            return False
        failed = self._fail(status, job_id, holder, seconds)
        try:
            self._hand_back_others(status, holder)
        except redis.RedisError as exc:
            log.error("the jobs %s held were not handed back (Redis: %s); left to their leases", holder, exc)
        return failed

    def _fail(self, status: StatusStore, job_id: str, holder: str, seconds: float) -> bool:
        try:
            record = status.get(job_id)
            # Its render had ended: it waited for an upload (its own, as the limit struck its returning task, or
            # the previous job's). An upload is not a stuck render: handed back with the others, not failed.
            if record.stage in (Stage.UPLOAD, Stage.UPLOAD_PENDING):
                return False
            killed = f"its worker process was still stuck {seconds:g}s after the job started, and was killed"
            # One script: only while `started` under the killed process's lease (not over a takeover, a retry it
            # queued as it died, or a cancel).
            status.transition(job_id, JobState.FAILED, leased_by=holder, error=timed_out(killed).as_error())
        except (InvalidTransition, JobNotFound, MalformedRecord):
            return False
        except redis.RedisError as exc:
            log.error("job %s: past the hard time limit, not failed (Redis: %s); left to its lease", shown(job_id), exc)
            return False
        log.error("job %s failed: timeout (%s killed after %gs)", job_id, holder, seconds)
        try:
            self.notify(job_id)
        except redis.RedisError as exc:
            log.warning("job %s failed, but Flower and its webhook were not told (Redis: %s)", job_id, exc)
        return True

    def _hand_back_others(self, status: StatusStore, holder: str) -> None:
        """The killed process was also finishing the previous job (its upload, or its video in the spool): that
        job goes back to its queue now, its attempt not counted, rather than wait for its lease to lapse."""
        others = status.held_by(holder)
        now = status.server_time() if others else 0.0  # due at once: a sweeper sends it within a second
        for other in others:
            try:
                status.transition(
                    other,
                    JobState.QUEUED,
                    leased_by=holder,
                    handback=True,
                    stage=Stage.HANDED_BACK,
                    progress=0.0,
                    due=now,
                )
            except InvalidTransition:
                continue
            log.warning("job %s handed back to its queue: its worker process was killed (time limit)", other)
            self.requeued(other)


HARD = HardLimit()
