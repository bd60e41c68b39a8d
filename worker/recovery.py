"""Puts a dead worker's jobs back on their queues, and sends the messages of jobs whose retry is due. Runs in
every worker's main process.

A job whose worker died (SIGKILL, the OOM killer, a lost host) is left `started` with a lapsed lease.
Its message may be gone already (Celery acknowledges a late-ack task whose pool process died; svdq
acknowledges when the GPU work ends, before the upload), so the record, which holds the whole request,
is the source of truth: the first sweeper to see it sends a new message to the job's queue and marks it
`queued` again, or fails it with `worker_lost` once it has used SVDQ_MAX_ATTEMPTS. The claim in
worker.render drops any duplicate message, so sweepers on many hosts need no coordination beyond a
short Redis lock that keeps them from sending one message each, and a turn that keeps a fleet to one sweep
per interval (each sweep reads every running job's lease).
"""

from __future__ import annotations

import contextlib
import logging
import random
import threading
import time
from collections.abc import Callable
from typing import Any

import redis

from producer import wire
from producer.contract import ErrorCode, JobState, Stage, queue_for, shown
from producer.fleet import FleetStore
from producer.status import InvalidTransition, JobNotFound, StatusStore

log = logging.getLogger(__name__)

Send = Callable[[str, dict[str, Any], str], None]  # (job id, request, queue)


class Recovery:
    def __init__(
        self,
        status: StatusStore,
        send: Send,
        *,
        lease_ttl: float,
        max_attempts: int,
        default_queue: str,
        notify: Callable[[str], None] = lambda job_id: None,
        requeued: Callable[[str, dict[str, str]], None] = lambda job_id, error: None,
    ):
        self.status, self.send, self.notify, self.requeued = status, send, notify, requeued
        self.fleet = FleetStore(status.redis)
        self.lease_ttl, self.max_attempts, self.default_queue = lease_ttl, max_attempts, default_queue
        self.unsent = 0  # jobs the last sweep could not send back: another sweeper should try them next

    def release_due(self) -> int:
        """Send the message of every job whose retry is due (worker.render schedules them: svdq.keys.RETRY_DUE);
        returns how many were sent. Any worker may: each is sent once."""
        now = self.status.server_time()  # one clock for the whole schedule: Redis's
        due = self.status.due(now)
        if not due:
            return 0
        records = self.status.get_many(due)
        sent = 0
        for job_id in due:
            record = records.get(job_id)
            try:
                if record is None or record.state is not JobState.QUEUED:  # canceled meanwhile, or gone
                    self.status.release(job_id, "", "", now)
                    continue
                queue = record.queue or queue_for(self.default_queue, record.priority)
                if self.status.release(job_id, queue, wire.message(job_id, record.request, queue), now):
                    log.info("job %s: retry due, sent to %s", job_id, queue)
                    sent += 1
            except (redis.ConnectionError, redis.TimeoutError):
                raise  # Redis away: the next tick
            except Exception as exc:  # one job's trouble (a refused push, say) must not hold the others up
                log.error("job %s: could not send its due retry: %s: %s", shown(job_id), type(exc).__name__, exc)
        return sent

    def sweep(self) -> list[tuple[str, str]]:
        """Recover every abandoned job once; returns (job id, what was done) for each."""
        done = []
        self.unsent = 0
        for job_id in self.status.abandoned(older_than=self.lease_ttl):
            try:
                outcome = self.recover(job_id)
            except (redis.RedisError, OSError):
                raise  # Redis away: the whole sweep waits for the next round
            except Exception as exc:  # one bad record (or a bug on one) must not strand the jobs behind it
                log.error("recovery skips job %s: %s: %s", shown(job_id), type(exc).__name__, exc)
                continue
            if outcome:
                done.append((job_id, outcome))
        return done

    def recover(self, job_id: str) -> str | None:
        # One sweeper per job at a time, across hosts; the lock outlives the sweep, not the job.
        if not self.fleet.lock_recovery(job_id, self.lease_ttl):
            return None
        try:
            record = self.status.get(job_id)
        except JobNotFound:  # deleted by hand, or never there: only its index entry is left
            self.status.unindex(job_id, JobState.STARTED)
            return None
        if record.state is not JobState.STARTED:
            return None
        lost = f"worker {record.worker} stopped responding during attempt {record.attempts}"
        counted = record.attempts - record.handbacks  # executions handed back by stopping workers do not count
        try:
            if counted >= self.max_attempts:
                message = f"{lost}; it has used its {counted} attempts (SVDQ_MAX_ATTEMPTS)"
                error = {"code": ErrorCode.WORKER_LOST.value, "message": message}
                self.status.transition(
                    job_id, JobState.FAILED, fence=record.attempts, unleased=True, error=error, stage=Stage.LOST
                )
                log.error("job %s failed: %s", job_id, error["message"])
                self.notify(job_id)
                return "failed"
            # The message first: if the record cannot be written after it, the claim takes the job over anyway.
            queue = record.queue or queue_for(self.default_queue, record.priority)
            try:
                self.send(job_id, record.request, queue)
            except Exception:
                self.unsent += 1
                raise
            error = {"code": ErrorCode.WORKER_LOST.value, "message": f"{lost}; requeued"}
            self.status.transition(
                job_id,
                JobState.QUEUED,
                fence=record.attempts,
                unleased=True,
                error=error,
                stage=Stage.RECOVERED,
                progress=0.0,
            )
        except InvalidTransition as exc:  # claimed, canceled or renewed meanwhile
            log.info("job %s: recovery not needed (%s)", job_id, exc)
            return None
        log.warning("job %s: %s; requeued on %s", job_id, lost, queue)
        self.requeued(job_id, error)
        return "requeued"


class Sweeper:
    """Until stopped: sends due retries every second (`Recovery.release_due`), runs `also` (e.g. the worker's
    presence) every `interval` seconds, and `Recovery.sweep` when it is this sweeper's turn: one sweep per
    interval across all the workers on the Redis, whichever asks first."""

    def __init__(self, recovery: Recovery, interval: float, also: Callable[[], None] = lambda: None):
        self.recovery, self.interval, self.also = recovery, interval, also
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="svdq-recovery", daemon=True)

    def start(self) -> Sweeper:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        fleet, lease_ttl = self.recovery.fleet, self.recovery.lease_ttl
        # Due retries are sent within a second (or the interval, if shorter); sweeps come every interval, with
        # jitter, so that the turn moves around the fleet rather than staying with whoever took it first.
        tick = min(1.0, self.interval)
        next_sweep = time.monotonic() + self.interval * random.uniform(0.9, 1.1)
        while not self._stop.wait(tick):
            try:
                self.recovery.release_due()
            except Exception as exc:  # Redis away, or refusing: the schedule keeps them for the next tick
                log.warning("sending due retries: %s", exc)
            if time.monotonic() < next_sweep:
                continue
            next_sweep = time.monotonic() + self.interval * random.uniform(0.9, 1.1)
            turn = done = False
            try:
                self.also()
                # A little under the interval, so that the sweeper that took the last turn may take the next.
                if turn := fleet.take_sweep_turn(lease_ttl, self.interval * 0.8):
                    self.recovery.sweep()
                    done = self.recovery.unsent == 0
            except (redis.RedisError, OSError) as exc:  # Redis restarting: sweep again next time
                log.warning("recovery sweep: %s", exc)
            except Exception:
                log.exception("recovery sweep")
            if turn and not done:  # it could not do its turn's work (its broker connection, say): another may
                with contextlib.suppress(Exception):
                    fleet.give_back_sweep_turn(lease_ttl)
