"""Workers that die, are killed or are stopped: every job still ends once, with one result object.

Real worker processes, killed with real signals. Leases are short here (SVDQ_LEASE_TTL=2) so a dead
worker's job comes back within seconds, and the visibility timeout short so the broker redelivers the
dead worker's own message during the test too: the claim must drop that copy.
"""

from __future__ import annotations

import json
import os
import signal
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from producer import keys
from producer.client import Client
from producer.contract import JobState
from tests.integration.conftest import BUCKET, PREFIX, SLOW, WorkerProcess, wait_until

pytestmark = pytest.mark.integration

FAST_RECOVERY = {"SVDQ_LEASE_TTL": "2", "SVDQ_VISIBILITY_TIMEOUT": "8"}


def rendering(attempt: int) -> Any:
    return lambda r: r.state is JobState.STARTED and r.attempts == attempt and (r.step or 0) >= 1


def kill_all(worker: WorkerProcess) -> None:
    """SIGKILL the worker's main process and its pool: a host lost, as far as Redis can tell."""
    os.killpg(worker.proc.pid, signal.SIGKILL)
    worker.proc.wait(timeout=10)


def pool_children(worker: WorkerProcess) -> list[int]:
    pid = worker.proc.pid
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def started_events(client: Client, job_id: str) -> int:
    stream = client.redis.xrange(keys.EVENTS_STREAM)
    events = [json.loads(fields[b"event"]) for _, fields in stream]
    return sum(1 for e in events if e["id"] == job_id and e["state"] == "started" and e.get("stage") == "fetch")


def stages(client: Client, job_id: str) -> list[str]:
    stream = client.redis.xrange(keys.EVENTS_STREAM)
    events = [json.loads(fields[b"event"]) for _, fields in stream]
    return [e.get("stage") for e in events if e["id"] == job_id]


def result_objects(s3: Any, job_id: str) -> list[str]:
    listed = s3.list_objects_v2(Bucket=BUCKET, Prefix=f"{PREFIX}/{job_id}/")
    return [o["Key"] for o in listed.get("Contents", [])]


def test_a_killed_worker_s_job_completes_on_another_worker_once(start_worker: Any, image_file: Path, s3: Any) -> None:
    queue = f"test-{uuid.uuid4().hex[:8]}"
    doomed = start_worker(queue=queue, env=FAST_RECOVERY)
    with Client.from_env(queue=queue) as client:
        job = client.submit(image_file, **SLOW)
        wait_until(job, rendering(1))
        kill_all(doomed)
        rescuer = start_worker(queue=queue, env=FAST_RECOVERY)
        final = job.wait(timeout=120)
        assert final.state is JobState.SUCCEEDED, final.error
        assert final.attempts == 2 and final.worker == rescuer.hostname
        assert result_objects(s3, job.id) == [final.result.key if final.result else ""]
        # Two messages for one job: the sweep's (once the lease lapsed) and the dead worker's own, back after the
        # visibility timeout. Whichever comes second must not run it again. (When the dead worker's own came back
        # before any sweep, it ran the job, and the sweep had nothing to send.)
        if "recovered" in stages(client, job.id):
            deadline = time.monotonic() + 30
            while f"job {job.id} not run" not in rescuer.log_text():
                assert time.monotonic() < deadline, "the abandoned message was never redelivered"
                time.sleep(0.5)
        assert job.status().attempts == 2
        assert started_events(client, job.id) == 2


def test_a_killed_pool_process_s_job_is_recovered_by_its_own_worker(start_worker: Any, image_file: Path) -> None:
    # What the kernel's OOM killer does: the pool process dies, Celery's main process starts another.
    worker = start_worker(env=FAST_RECOVERY)
    with Client.from_env(queue=worker.queue) as client:
        job = client.submit(image_file, **SLOW)
        wait_until(job, rendering(1))
        (child,) = pool_children(worker)
        os.kill(child, signal.SIGKILL)
        final = job.wait(timeout=120)
    assert final.state is JobState.SUCCEEDED, final.error
    assert final.attempts == 2 and final.worker == worker.hostname
    assert worker.proc.poll() is None


def test_a_job_that_keeps_killing_its_workers_fails_worker_lost(start_worker: Any, image_file: Path) -> None:
    queue = f"test-{uuid.uuid4().hex[:8]}"
    env = {**FAST_RECOVERY, "SVDQ_MAX_ATTEMPTS": "2"}
    with Client.from_env(queue=queue) as client:
        job = client.submit(image_file, **SLOW)
        for attempt in (1, 2):
            victim = start_worker(queue=queue, env=env)
            wait_until(job, rendering(attempt))
            kill_all(victim)
        survivor = start_worker(queue=queue, env=env)
        final = job.wait(timeout=60)
    assert final.state is JobState.FAILED and final.attempts == 2
    assert final.error is not None and final.error.code == "worker_lost", final.error
    assert "2 attempts" in final.error.message
    assert survivor.proc.poll() is None


def test_sigterm_lets_the_running_job_finish(start_worker: Any, image_file: Path) -> None:
    worker = start_worker(env={"SVDQ_STOP_GRACE": "120"})
    with Client.from_env(queue=worker.queue) as client:
        job = client.submit(image_file, **SLOW)
        wait_until(job, rendering(1))
        worker.proc.terminate()
        final = job.wait(timeout=120)
        assert worker.proc.wait(timeout=60) == 0
    assert final.state is JobState.SUCCEEDED and final.attempts == 1


def test_sigterm_past_the_grace_period_hands_the_job_back_without_using_an_attempt(
    start_worker: Any, image_file: Path
) -> None:
    """A deploy's stop is not the job's fault: with SVDQ_MAX_ATTEMPTS=2, a job handed back once and then lost
    with its worker still has an attempt left (a handed-back execution used one, and the job failed here)."""
    queue = f"test-{uuid.uuid4().hex[:8]}"
    env = {**FAST_RECOVERY, "SVDQ_MAX_ATTEMPTS": "2"}
    stopping = start_worker(queue=queue, env={**env, "SVDQ_STOP_GRACE": "1"})
    with Client.from_env(queue=queue) as client:
        job = client.submit(image_file, **SLOW)
        wait_until(job, rendering(1))
        stopped_at = time.monotonic()
        stopping.proc.terminate()
        assert stopping.proc.wait(timeout=60) == 0
        handed_back = job.status()
        assert (handed_back.state, handed_back.stage, handed_back.handbacks) == (JobState.QUEUED, "handed_back", 1)
        assert time.monotonic() - stopped_at < 30
        lost = start_worker(queue=queue, env=env)
        wait_until(job, rendering(2))
        kill_all(lost)
        taker = start_worker(queue=queue, env=env)
        final = job.wait(timeout=120)
    assert final.state is JobState.SUCCEEDED, final.error
    assert (final.attempts, final.handbacks, final.worker) == (3, 1, taker.hostname)


def test_sigquit_is_a_cold_shutdown_that_leaves_the_running_job_to_its_lease(
    start_worker: Any, image_file: Path
) -> None:
    queue = f"test-{uuid.uuid4().hex[:8]}"
    cold = start_worker(queue=queue, env={**FAST_RECOVERY, "SVDQ_STOP_GRACE": "120"})
    with Client.from_env(queue=queue) as client:
        job = client.submit(image_file, **SLOW)
        wait_until(job, rendering(1))
        stopped_at = time.monotonic()
        cold.proc.send_signal(signal.SIGQUIT)
        assert cold.proc.wait(timeout=60) == 1  # Celery's code for it: a restart policy on failure restarts it
        assert time.monotonic() - stopped_at < 30  # not the 120 s a warm shutdown would grant
        left = job.status()
        assert (left.state, left.attempts) == (JobState.STARTED, 1), left  # not handed back: left to its lease
        taker = start_worker(queue=queue, env=FAST_RECOVERY)
        final = job.wait(timeout=120)
    assert final.state is JobState.SUCCEEDED, final.error
    assert final.attempts == 2 and final.worker == taker.hostname


def test_a_frozen_worker_s_writes_are_fenced_out_after_its_job_is_taken_over(
    start_worker: Any, image_file: Path, s3: Any
) -> None:
    """SIGSTOP (a VM paused, a process stalled in swap): its lease lapses, another worker takes the job and
    finishes it; thawed, the old attempt stops and changes nothing."""
    queue = f"test-{uuid.uuid4().hex[:8]}"
    frozen = start_worker(queue=queue, env=FAST_RECOVERY)
    with Client.from_env(queue=queue) as client:
        job = client.submit(image_file, **SLOW)
        wait_until(job, rendering(1))
        os.killpg(frozen.proc.pid, signal.SIGSTOP)  # main process, heartbeat and pool alike
        try:
            rescuer = start_worker(queue=queue, env=FAST_RECOVERY)
            final = job.wait(timeout=120)
        finally:
            os.killpg(frozen.proc.pid, signal.SIGCONT)
        assert final.state is JobState.SUCCEEDED and final.attempts == 2 and final.worker == rescuer.hostname
        deadline = time.monotonic() + 30
        while "taken over) while rendering" not in frozen.log_text():
            assert time.monotonic() < deadline, frozen.log_text()[-3000:]
            time.sleep(0.2)
        after = job.status()
    assert after.model_dump() == final.model_dump()
    assert result_objects(s3, job.id) == [final.result.key if final.result else ""]
    assert frozen.proc.poll() is None  # and it lives on, for the next job
