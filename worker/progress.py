"""A job's progress in its record, and the checks that stop a render: canceled, taken over, or handed back."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import redis

from producer.contract import JobState
from producer.status import StatusStore
from worker.errors import HandBack, JobCanceled, timed_out
from worker.events import TaskEvents
from worker.outcome import Attempt

log = logging.getLogger("worker.render")


class Progress:
    """Writes stage and progress to the record, at most every `interval` seconds unless forced, and
    raises JobCanceled as soon as the record is no longer this attempt's `started` (checked on every call),
    HandBack once `hand_back()` says the worker's stop grace period is over, or JobFailed (`timeout`) once the
    attempt's deadline has passed."""

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
        self._ended = False  # a read found the record no longer ours: every later check says so at once

    def check(self) -> None:
        """Between the UNet's blocks, inside a step (a step at the caps takes seconds on a GPU): the same stop
        conditions as a step's, with the record read at most every `interval` seconds."""
        self._stop_if_due()
        if self._ended:
            raise JobCanceled(self.attempt.job_id)
        now = self.clock()
        if now - self._last_check < self.interval:
            return
        self._last_check = now
        try:
            self._ended = self.status.state(self.attempt.job_id) is not JobState.STARTED
        except redis.RedisError:  # Redis restarting: the next step's write will tell
            return
        if self._ended:
            raise JobCanceled(self.attempt.job_id)

    def _stop_if_due(self) -> None:
        if self.hand_back():
            raise HandBack(self.attempt.job_id)
        if self.clock() >= self.attempt.deadline:
            raise timed_out("stopped at the render's next check")

    def __call__(self, stage: str, progress: float, *, force: bool = False, **extra: Any) -> None:
        self._stop_if_due()
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
