"""What Flower shows of a job: svdq's record, told as Celery task events.

Celery says SUCCESS when a task's function returns. An svdq task returns when its GPU work ends (the
finisher encodes the last frames and uploads after it), and a job that failed or was canceled returns
normally too, so Celery's own events would call every job a success. The task therefore runs with `Request`
below, which keeps Celery's `task-received` (a worker took the message) and drops the events that claim a
state; svdq sends those itself, from the record:

    claimed           -> task-started   (again at each stage: `result` says "denoise 40%")
    succeeded         -> task-succeeded (`result`: the video's key, frames and bytes)
    failed            -> task-failed    (`exception`: "code: message")
    canceled          -> task-revoked
    back in the queue -> task-retried   (a retry, a hand-back at shutdown, a dead worker's job recovered)

Flower merges a task's events by precedence (SUCCESS > FAILURE > REVOKED > STARTED > RECEIVED; RETRY always
applies), so exactly one outcome per job keeps its dashboard's counts equal to `svdq list`'s. Telling Flower
is best effort: a job never fails, nor waits long, because an event could not be sent.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

from celery import Celery
from celery.worker.request import Request as CeleryRequest

from producer.contract import JobRecord, JobState, Stage
from worker import timelimit
from worker.outcome import lease_holder

log = logging.getLogger(__name__)

# Sent by svdq from the record; Celery's own would report the function's return, not the job.
SVDQ_SENDS = frozenset({"task-started", "task-succeeded", "task-failed", "task-retried"})
# A few quick tries: an event must not hold a render up while Redis restarts.
RETRY_POLICY = {"max_retries": 2, "interval_start": 0, "interval_step": 0.25, "interval_max": 0.5}


class Request(CeleryRequest):
    """Celery's request, minus the task events that svdq sends itself (see the module's docstring)."""

    def send_event(self, type: str, **fields: Any) -> None:
        if type not in SVDQ_SENDS:
            super().send_event(type, **fields)

    # A message's `timelimit` header is its sender's to write: one of 1 s had Celery kill the pool process (and
    # the model reload with it) at will, one of hours lifted the limit. The worker's own (SVDQ_JOB_TIMEOUT,
    # Celery's task_time_limit) is the only one: Celery falls back to it where a request has none.
    @property
    def time_limits(self) -> tuple[None, None]:
        return (None, None)

    @time_limits.setter
    def time_limits(self, _from_the_message: Any) -> None:
        pass

    def on_timeout(self, soft: bool, timeout: float) -> None:
        """Celery's hard time limit: the pool process is killed next; its job's record says so (worker.timelimit)."""
        try:
            super().on_timeout(soft, timeout)
        finally:  # whatever Celery's part raised (its caller would swallow it), the job's record is told
            if not soft:
                job_id = self.args[0] if self.args else (self.kwargs or {}).get("job_id")
                holder = lease_holder(self.hostname, self.worker_pid)
                timelimit.HARD.exceeded(job_id, holder, timeout, self.worker_pid)


def _seconds_between(start: str | None, end: str | None) -> float | None:
    if not start or not end:
        return None
    return round((datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds(), 3)


class TaskEvents:
    """Sends one worker's task events on a connection of its own (thread-safe: the render and the finisher
    both send). Unbound (`app` None) it sends nothing, as in tests of the render without a Celery worker."""

    def __init__(
        self,
        app: Celery | None = None,
        hostname: str = "",
        *,
        every: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.app, self.hostname, self.every, self.clock = app, hostname, every, clock
        self._lock = threading.Lock()
        self._dispatcher: Any = None
        self._connection: Any = None
        self._task_ids: dict[str, str] = {}  # job id -> the Celery task id Flower lists it under
        self._started: dict[str, float] = {}  # job id -> epoch seconds of its claim
        self._last: dict[str, tuple[str, float]] = {}  # job id -> (stage, monotonic time) last told

    @property
    def bound(self) -> bool:
        return self.app is not None

    def bind(self, app: Celery, hostname: str) -> None:
        with self._lock:
            self.app, self.hostname = app, hostname

    def track(self, job_id: str, task_id: str | None) -> None:
        """The Celery task id of the message running `job_id`: svdq sends the job id, a plain client may not."""
        if task_id and task_id != job_id:
            self._task_ids[job_id] = task_id

    # -- what the record says -------------------------------------------------------------------------

    def started(self, job_id: str) -> None:
        self._started[job_id] = time.time()
        self._last[job_id] = (Stage.FETCH, self.clock())
        self.send("task-started", job_id, result=f"{Stage.FETCH} 0%")

    def progress(self, job_id: str, stage: str, fraction: float, *, force: bool = False) -> None:
        """At each new stage, and every `every` seconds within one; `started` keeps the claim's time."""
        now = self.clock()
        last_stage, last_at = self._last.get(job_id, ("", float("-inf")))
        if not force and stage == last_stage and now - last_at < self.every:
            return
        self._last[job_id] = (stage, now)
        fields: dict[str, Any] = {"result": f"{stage} {round(fraction * 100)}%"}
        if job_id in self._started:
            fields["started"] = self._started[job_id]
        self.send("task-started", job_id, **fields)

    def requeued(self, job_id: str, error: dict[str, Any] | None, why: str) -> None:
        reason = f"{error['code']}: {error['message']}" if error else why
        self.send("task-retried", job_id, exception=reason, traceback=None)
        self._forget(job_id)

    def ended(self, record: JobRecord) -> None:
        """The job's one outcome, once its record is terminal."""
        runtime = _seconds_between(record.started_at, record.finished_at)
        if record.state is JobState.SUCCEEDED and record.result is not None:
            shown = {"key": record.result.key, "frames": record.result.frames, "bytes": record.result.bytes}
            self.send("task-succeeded", record.id, result=json.dumps(shown), runtime=runtime or 0.0)
        elif record.state is JobState.FAILED:
            error = record.error
            reason = f"{error.code}: {error.message}" if error else "failed"
            self.send("task-failed", record.id, exception=reason, traceback=None, runtime=runtime)
        elif record.state is JobState.CANCELED:
            self.send("task-revoked", record.id, terminated=False, signum=None, expired=False, result="canceled")
        self._forget(record.id)

    # -- sending --------------------------------------------------------------------------------------

    def send(self, type_: str, job_id: str, **fields: Any) -> None:
        if self.app is None:
            return
        uuid = self._task_ids.get(job_id, job_id)
        with self._lock:
            try:
                if self._dispatcher is None:
                    self._connection = self.app.connection_for_write()
                    # No buffering while Redis is away: a failed send raises here, is logged and is dropped.
                    self._dispatcher = self.app.events.Dispatcher(
                        self._connection, hostname=self.hostname, buffer_while_offline=False
                    )
                self._dispatcher.send(type_, uuid=uuid, retry=True, retry_policy=RETRY_POLICY, **fields)
            except Exception as exc:  # Redis away: Flower misses this one, the job goes on
                log.warning("Flower not told %s of job %s: %s", type_, job_id, exc)
                self._close()

    def _forget(self, job_id: str) -> None:
        for held in (self._task_ids, self._started, self._last):
            held.pop(job_id, None)

    def _close(self) -> None:
        dispatcher, connection, self._dispatcher, self._connection = self._dispatcher, self._connection, None, None
        for part in (dispatcher, connection):
            if part is not None:
                try:
                    part.close()
                except Exception as exc:  # already broken: nothing left to release
                    log.debug("closing the event connection: %s", exc)

    def close(self) -> None:
        with self._lock:
            self._close()
