"""Flower tells svdq's truth: each job's outcome, its progress, counts that match `svdq list`, and Revoke or
Terminate as a cancel. Read through Flower's REST API and, as a user sees it, in a headless Chromium."""

from __future__ import annotations

import datetime
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

from producer.client import Client, Job
from producer.contract import TASK_NAME, JobState
from producer.storage import content_name
from tests.integration.conftest import BUCKET, FLOWER_AUTH, PREFIX, SLOW, SMALL, WorkerProcess, get, wait_until

pytestmark = pytest.mark.integration


def flower_task(flower: str, task_id: str, state: str, timeout: float = 20) -> dict[str, Any]:
    """Flower's view of a task once it reaches `state` (events arrive asynchronously)."""
    deadline = time.monotonic() + timeout
    while True:
        task = get(f"{flower}/api/tasks", FLOWER_AUTH).get(task_id)
        if task is not None and task["state"] == state:
            return task
        assert time.monotonic() < deadline, f"Flower shows {task}, not {state}"
        time.sleep(0.3)


def rendering(job: Job) -> None:
    wait_until(job, lambda r: r.state is JobState.STARTED and (r.step or 0) >= 2)


def test_flower_shows_outcomes_progress_and_counts_and_revoke_is_a_cancel(
    flower: str, start_worker: Callable[..., WorkerProcess], image_file: Path, s3: Any, celery_control: Celery
) -> None:
    """And a message Celery discards as revoked (expired) cancels its job: no revoke strands a job."""
    worker = start_worker()
    with Client.from_env(queue=worker.queue) as client:
        good = client.submit(image_file, **SMALL)
        key = f"{PREFIX}/uploads/{uuid.uuid4().hex}.png"  # truncated: the worker fails it, after the task began
        s3.put_object(Bucket=BUCKET, Key=key, Body=image_file.read_bytes()[:200])
        bad = client.submit(f"s3://{BUCKET}/{key}", **SMALL)
        assert good.wait(timeout=120).state is JobState.SUCCEEDED
        assert bad.wait(timeout=120).state is JobState.FAILED

        # Progress shows on the running task; svdq's own cancel ends it REVOKED.
        canceled = client.submit(image_file, **SLOW)
        rendering(canceled)
        running = flower_task(flower, canceled.id, "STARTED")
        assert running["result"].startswith(("denoise ", "fetch ")), running
        deadline = time.monotonic() + 20
        while not get(f"{flower}/api/tasks", FLOWER_AUTH)[canceled.id]["result"].startswith("denoise "):
            assert time.monotonic() < deadline
            time.sleep(0.3)
        canceled.cancel()

        # Flower's Terminate on a running job and Revoke on a queued one: both are cancels, and the worker
        # process (with its warm model) lives on.
        terminated = client.submit(image_file, **SLOW)
        behind = client.submit(image_file, **SLOW)
        rendering(terminated)
        get(f"{flower}/api/task/revoke/{terminated.id}?terminate=true", FLOWER_AUTH, method="POST")
        get(f"{flower}/api/task/revoke/{behind.id}", FLOWER_AUTH, method="POST")
        assert terminated.wait(timeout=60).state is JobState.CANCELED
        assert behind.wait(timeout=60).state is JobState.CANCELED
        # `celery control terminate SIGKILL ID` is a command of its own, which called Celery's revoke directly.
        killed = client.submit(image_file, **SLOW)
        rendering(killed)
        arguments = {"signal": "SIGKILL", "task_id": [killed.id]}
        celery_control.control.broadcast("terminate", arguments=arguments, destination=[worker.hostname])
        assert killed.wait(timeout=60).state is JobState.CANCELED
        after = client.submit(image_file, **SMALL).wait(timeout=120)
        assert after.state is JobState.SUCCEEDED and after.timings["load"] == 0, after  # the same warm process
        assert "Terminating" not in worker.log_text()

        ended = {j.id: j.status() for j in (good, bad, canceled, terminated, behind)}

    assert flower_task(flower, good.id, "SUCCESS")["worker"] == worker.hostname
    failure = flower_task(flower, bad.id, "FAILURE")
    assert failure["exception"].startswith("invalid_input: "), failure
    assert ended[bad.id].error is not None and ended[bad.id].error.message in failure["exception"]
    for job_id in (canceled.id, terminated.id, behind.id):
        flower_task(flower, job_id, "REVOKED")

    # The dashboard's counts are svdq's: two succeeded (good, after), one failed.
    deadline = time.monotonic() + 20
    while True:
        rows = {row["hostname"]: row for row in get(f"{flower}/workers?json=1", FLOWER_AUTH)["data"]}
        row = rows.get(worker.hostname, {})
        if row.get("task-succeeded") == 2 and row.get("task-failed") == 1:
            break
        assert time.monotonic() < deadline, row
        time.sleep(0.5)
    with Client.from_env() as client:
        mine = [r for state in JobState for r in client.list(state, limit=500) if r.worker == worker.hostname]
    assert sum(r.state is JobState.SUCCEEDED for r in mine) == row["task-succeeded"]
    assert sum(r.state is JobState.FAILED for r in mine) == row["task-failed"]

    a_message_celery_discards_as_revoked_cancels_its_job(worker, celery_control, image_file)
    browse_flower(flower, good.id, bad.id, canceled.id, ended[bad.id].error.code)


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def dump_dom(url: str) -> str:
    """The page after its scripts ran, as a headless Chromium renders it (credentials in the URL)."""
    browser = chromium()
    assert browser is not None
    argv = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=8000", "--dump-dom", url]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=90)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def browse_flower(flower: str, good: str, bad: str, canceled: str, code: str) -> None:
    if chromium() is None:
        if os.environ.get("CI"):
            pytest.fail("CI must install chromium (.ci/run) for the Flower browser check")
        pytest.skip("no chromium here: `apt-get install chromium` for the browser half of this test")
    user, password = FLOWER_AUTH.split(":")
    base = flower.replace("http://", f"http://{user}:{password}@")
    page = dump_dom(f"{base}/task/{bad}")
    assert "FAILURE" in page and f"{code}: " in page, page[-3000:]
    assert "REVOKED" in dump_dom(f"{base}/task/{canceled}")
    listing = dump_dom(f"{base}/tasks")
    for task_id, state in ((good, "SUCCESS"), (bad, "FAILURE"), (canceled, "REVOKED")):
        row = listing[listing.index(task_id) :][:4000] if task_id in listing else ""
        assert state in row, (task_id, state, listing[-3000:])


def a_message_celery_discards_as_revoked_cancels_its_job(worker: WorkerProcess, control: Celery, image: Path) -> None:
    """Celery discards an expired message as revoked without running it: its job must not stay queued."""
    job_id = uuid.uuid4().hex
    with Client.from_env(queue=worker.queue) as client:
        data = image.read_bytes()
        request = {"image": client.store.put(content_name(data, ".png"), data, "image/png").ref, **SMALL}
        client.records.create(job_id, request, queue=worker.queue)
        expired = datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=1)
        control.send_task(
            TASK_NAME,
            kwargs={"job_id": job_id, "request": request},
            task_id=job_id,
            queue=worker.queue,
            expires=expired,
        )
        record = client.job(job_id).wait(timeout=60)
        assert record.state is JobState.CANCELED, record
        # A sender who sets a victim's id as the task id of an expired message for another job cancels nothing.
        victim = uuid.uuid4().hex
        client.records.create(victim, request, queue="nobody-reads-this")
        control.send_task(
            TASK_NAME,
            kwargs={"job_id": uuid.uuid4().hex, "request": request},
            task_id=victim,
            queue=worker.queue,
            expires=expired,
        )
        deadline = time.monotonic() + 30
        while f"{victim}" not in worker.log_text():  # Celery logs the discarded message's id
            assert time.monotonic() < deadline, "the worker never discarded the expired message"
            time.sleep(0.3)
        time.sleep(1)
        assert client.job(victim).status().state is JobState.QUEUED
