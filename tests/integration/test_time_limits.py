"""SVDQ_JOB_TIMEOUT: a job past its time limit fails `timeout`, whether its render can stop itself or its process
is stuck, and the worker goes on with the next job. A real worker, a real pool process frozen with SIGSTOP."""

from __future__ import annotations

import contextlib
import os
import signal
import time
import uuid
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import redis

from producer import keys
from producer.client import Client
from producer.contract import JobState
from producer.status import InvalidTransition, StatusStore
from tests.integration.conftest import ENDLESS, SMALL, wait_until
from tests.integration.test_recovery import pool_children, rendering
from worker.timelimit import HardLimit

pytestmark = pytest.mark.integration

LIMIT = 3.0  # seconds: SMALL renders in well under it, the long job below in well over
HARD = LIMIT + 10  # Celery's hard time limit: WorkerSettings.time_limit()
TOO_LONG = ENDLESS


def new_child(worker: Any, old: int, timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    while (children := pool_children(worker)) in ([], [old]):
        assert time.monotonic() < deadline, worker.log_text()[-3000:]
        time.sleep(0.01)
    (child,) = children
    return child


def test_a_job_past_its_time_limit_fails_timeout_and_the_worker_takes_the_next(
    start_worker: Any, image_file: Path
) -> None:
    worker = start_worker(env={"SVDQ_JOB_TIMEOUT": str(LIMIT)})
    with Client.from_env(queue=worker.queue) as client:
        (child,) = pool_children(worker)

        # The render stops itself at its next check: failed, not retried, the process and its model kept.
        long = client.submit(image_file, **TOO_LONG)
        final = long.wait(timeout=60)
        assert final.state is JobState.FAILED and final.attempts == 1, final
        assert final.error is not None and final.error.code == "timeout", final.error
        assert "stopped at the render's next check" in final.error.message
        assert "SVDQ_JOB_TIMEOUT" in final.error.message
        assert final.finished_at and final.started_at
        ran = (datetime.fromisoformat(final.finished_at) - datetime.fromisoformat(final.started_at)).total_seconds()
        assert LIMIT <= ran < LIMIT + 5, ran
        quick = client.submit(image_file, **SMALL).wait(timeout=60)
        assert quick.state is JobState.SUCCEEDED, quick.error
        assert pool_children(worker) == [child]

        # A process stuck where no check runs (SIGSTOP: a hung device call, as far as anyone can tell; its lease,
        # SVDQ_LEASE_TTL=30, outlives the hard limit): Celery kills it and the main process fails the job.
        stuck = client.submit(image_file, **TOO_LONG)
        wait_until(stuck, rendering(1))
        os.kill(child, signal.SIGSTOP)
        final = stuck.wait(timeout=HARD + 30)
        assert final.state is JobState.FAILED and final.attempts == 1, final
        assert final.error is not None and final.error.code == "timeout", final.error
        assert "was killed" in final.error.message
        assert client.redis.exists(keys.lease(stuck.id)) == 0
        # Its replacement loads the model (frozen here: as long as a real checkpoint's load): no job is taken
        # meanwhile, where an idle worker could run it.
        replacement = new_child(worker, child)
        os.kill(replacement, signal.SIGSTOP)
        try:
            after = client.submit(image_file, **SMALL)
            time.sleep(3)  # a consumer that may take a message takes it within milliseconds
            assert client.redis.llen(worker.queue) == 1 and after.status().state is JobState.QUEUED
        finally:
            os.kill(replacement, signal.SIGCONT)
        final = after.wait(timeout=90)
        assert final.state is JobState.SUCCEEDED, final.error
        assert pool_children(worker) == [replacement]
    assert worker.proc.poll() is None
    assert "Hard time limit" in worker.log_text()


def test_the_main_process_fails_only_the_killed_process_s_attempt_and_hands_back_its_other_job(
    redis_url: str,
) -> None:
    status = StatusStore(redis.Redis.from_url(redis_url), result_ttl=60)
    hard = HardLimit()

    created: list[str] = []

    def job(holder: str, **fields: object) -> str:
        job_id = uuid.uuid4().hex
        created.append(job_id)
        status.create(job_id, {"image": "x"}, queue="q-test")
        status.claim(job_id, holder, lease_seconds=30, **fields)
        return job_id

    try:
        check_the_hard_limit(status, hard, job)
    finally:  # nothing left `started` or scheduled for the sweepers of this Redis's later tests
        for job_id in created:
            with contextlib.suppress(InvalidTransition):
                status.transition(job_id, JobState.CANCELED)
        status.redis.zrem(keys.RETRY_DUE, *created)


def check_the_hard_limit(status: StatusStore, hard: HardLimit, job: Callable[..., str]) -> None:
    killed, other = f"w@test/{uuid.uuid4().hex[:6]}", f"w@test/{uuid.uuid4().hex[:6]}"
    stuck = job(killed, stage="denoise")
    assert hard.fail(stuck, killed, 13) is False  # not attached yet: left to its lease
    ended: list[str] = []
    requeued: list[str] = []
    hard.attach(status, notify=ended.append, requeued=requeued.append)
    uploading = job(killed, stage="upload")  # the previous job, in the killed process's finisher
    running_elsewhere = job(other, stage="denoise")

    assert hard.fail(stuck, killed, 13) is True
    record = status.get(stuck)
    assert record.state is JobState.FAILED and record.error is not None and record.error.code == "timeout"
    assert "was killed" in record.error.message and status.holder(stuck) is None and ended == [stuck]
    # The killed process's other job goes back to its queue at once, its attempt not counted.
    back = status.get(uploading)
    assert back.state is JobState.QUEUED and back.stage == "handed_back" and back.handbacks == 1
    assert status.redis.zscore(keys.RETRY_DUE, uploading) is not None and requeued == [uploading]
    assert status.state(running_elsewhere) is JobState.STARTED  # another process's: left alone
    assert hard.fail(stuck, killed, 13) is False and ended == [stuck]  # once

    # Queued again by its own process as it died (a retry): not failed over.
    retried = job(killed, stage="fetch")
    status.transition(retried, JobState.QUEUED, fence=1, stage="retrying")
    assert hard.fail(retried, killed, 13) is False and status.state(retried) is JobState.QUEUED
    # Taken over after its lease lapsed: the new attempt is not failed.
    taken = job(killed, stage="denoise")
    status.redis.delete(keys.lease(taken))
    status.claim(taken, other, lease_seconds=30)
    assert hard.fail(taken, killed, 13) is False and status.state(taken) is JobState.STARTED
    assert hard.exceeded("../not-an-id", killed, 13) is None
