"""How an attempt at a job ends: the types the job path passes around, and the one way each ending is written.

Every ending goes through `end_job` (a state the transition table allows, fenced by the attempt's number) and
is then announced once by `announce_end`: the webhook, the worker's metrics and Flower's task event.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import redis

from producer.contract import ErrorCode, JobRequest, JobState, Stage
from producer.status import InvalidTransition, JobNotFound, MalformedRecord
from worker import webhooks
from worker.decode import OutOfMemory
from worker.encode import EncodeTimeout
from worker.errors import JobFailed, timed_out

if TYPE_CHECKING:
    from worker.runtime import Runtime

log = logging.getLogger("worker.render")


def lease_holder(hostname: str, pid: int) -> str:
    """Who holds a running job's lease: one pool process of one worker (worker.timelimit finds a killed one's jobs
    by it)."""
    return f"{hostname}/{pid}"


@dataclass(frozen=True)
class Attempt:
    """One execution of a job: its number fences every write, `holder` names the lease's owner."""

    job_id: str
    number: int
    holder: str
    handbacks: int = 0  # earlier executions handed back by stopping workers: not counted against the cap
    deadline: float = math.inf  # time.monotonic() past which it fails `timeout` (SVDQ_JOB_TIMEOUT)

    @property
    def counted(self) -> int:
        """Executions that count against SVDQ_MAX_ATTEMPTS, this one included."""
        return self.number - self.handbacks


@dataclass
class Work:
    """An attempt and what it gathers on the way: the request it renders, the seed, per-stage seconds and the
    memory report that go into the record when it ends."""

    attempt: Attempt
    request: JobRequest
    seed: int
    timings: dict[str, float]
    memory: dict[str, Any]


@dataclass(frozen=True)
class Outcome:
    """What one delivery of a job's message came to: what Celery logs as the task's return value. (A job sent
    back to its queue waits in the retry schedule, svdq.keys.RETRY_DUE: no message is sent from here.)"""

    job_id: str | None
    state: JobState | None
    detail: str | None = None  # "finishing", "dropped: why", "running on HOLDER", "retry due in 2.0s"

    def as_dict(self) -> dict[str, Any]:
        shown = {"job_id": self.job_id, "state": self.state.value if self.state else None}
        return shown | ({"detail": self.detail} if self.detail is not None else {})


def error_of(job_id: str, exc: BaseException) -> dict[str, str]:
    """The record's `error` for an exception: known failures by their code, anything else as internal."""
    if isinstance(exc, JobFailed):
        log.warning("job %s failed: %s", job_id, exc)
        return exc.as_error()
    if isinstance(exc, EncodeTimeout):
        return error_of(job_id, timed_out(f"the encoder (ffmpeg) {exc}"))
    if isinstance(exc, OutOfMemory):
        log.warning("job %s ran out of device memory", job_id)
        message = "the GPU ran out of memory, even with forward chunking and a decode chunk of 1"
        return {"code": ErrorCode.OUT_OF_MEMORY.value, "message": message}
    log.error("job %s crashed", job_id, exc_info=exc)
    return {"code": ErrorCode.INTERNAL.value, "message": f"{type(exc).__name__}: {str(exc)[:500]}"}


def fail_job(rt: Runtime, attempt: Attempt, exc: BaseException, **fields: Any) -> Outcome:
    return end_job(rt, attempt, JobState.FAILED, error=error_of(attempt.job_id, exc), **fields)


def fail_work(rt: Runtime, work: Work, exc: BaseException) -> Outcome:
    """Fail the job with what its attempt measured so far (timings, memory) in the record."""
    return fail_job(rt, work.attempt, exc, timings=work.timings, memory=work.memory)


def end_job(rt: Runtime, attempt: Attempt, state: JobState, *, unleased: bool = False, **fields: Any) -> Outcome:
    job_id = attempt.job_id
    rt.heartbeat.release(job_id)
    fence = attempt.number if attempt.number else None
    try:
        rt.status.transition(job_id, state, fence=fence, unleased=unleased, **fields)
    except InvalidTransition as exc:  # canceled while it ran (the cancel stands), or taken over
        if exc.current is state and _written_by(rt, attempt):  # this write, repeated after its reply was lost
            announce_end(rt, job_id)
            return Outcome(job_id, state)
        log.info("job %s: result dropped, %s", job_id, exc)
        announce_if_canceled(rt, attempt)
        return Outcome(job_id, exc.current)
    announce_end(rt, job_id)
    return Outcome(job_id, state)


def _written_by(rt: Runtime, attempt: Attempt) -> bool:
    """Whether the job's final state is this attempt's: Redis ran the write, then its connection dropped before
    the reply, and the client's retry found the job ended (by itself)."""
    with contextlib.suppress(JobNotFound, MalformedRecord, redis.RedisError):
        record = rt.status.get(attempt.job_id)
        return record.attempts == attempt.number  # an attempt that took over would have counted one more
    return False


def announce_if_canceled(rt: Runtime, attempt: Attempt) -> None:
    """A result dropped because the job was canceled after its last check (during the upload, or while it
    waited in the spool): nobody else announces that end, so its latest attempt does."""
    with contextlib.suppress(JobNotFound, MalformedRecord, redis.RedisError):
        record = rt.status.get(attempt.job_id)
        if record.state is JobState.CANCELED and record.attempts == attempt.number:
            announce_end(rt, attempt.job_id)


def announce_canceled(rt: Runtime, job_id: str) -> None:
    """A job canceled while queued: Flower and the webhook hear of it when its message comes up, unless a
    revoke canceled it: the worker that took the revoke has said so already (worker.revoke)."""
    with contextlib.suppress(JobNotFound, MalformedRecord):
        record = rt.status.get(job_id)
        if record.stage == Stage.REVOKED:
            return
        rt.events.ended(record)
        webhooks.notify_record(rt.webhooks, record)


def announce_end(rt: Runtime, job_id: str) -> None:
    """The job has reached its final state (or was canceled or taken over): webhook, metrics, Flower."""
    record = rt.status.get(job_id)
    if record.state.is_terminal():  # not when another attempt took the job over: that one reports it
        rt.metrics.job_ended(record)
        rt.events.ended(record)
        webhooks.notify_record(rt.webhooks, record)
