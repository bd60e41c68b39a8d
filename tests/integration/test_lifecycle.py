"""Following and steering jobs: events, progress, cancel, priority, idempotency, listing."""

from __future__ import annotations

import contextlib
import json
import subprocess
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from producer import keys
from producer.client import Client, KeyConflict, NotCancelable, Submission
from producer.contract import JobState
from tests.integration.conftest import LONG, SLOW, SMALL, SVDQ, WorkerProcess, wait_until

pytestmark = pytest.mark.integration


def test_progress_events_rise_step_by_step(client: Client, worker: WorkerProcess, image_file: Path) -> None:
    events: list[dict[str, Any]] = []
    pubsub = client.redis.pubsub(ignore_subscribe_messages=True)
    job_id_box: list[str] = []
    ready = threading.Event()

    def listen() -> None:
        pubsub.psubscribe(keys.events("*"))
        ready.set()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            message = pubsub.get_message(timeout=0.5)
            if message and job_id_box and json.loads(message["data"])["id"] == job_id_box[0]:
                events.append(json.loads(message["data"]))
                if events[-1]["state"] in ("succeeded", "failed"):
                    return

    listener = threading.Thread(target=listen)
    listener.start()
    ready.wait(5)
    job = client.submit(image_file, **LONG)
    job_id_box.append(job.id)
    record = job.wait(timeout=120)
    listener.join(10)
    pubsub.close()

    assert record.state is JobState.SUCCEEDED
    progress = [e["progress"] for e in events if "progress" in e]
    assert progress == sorted(progress) and progress[-1] == 1.0 and len(set(progress)) >= 5
    steps = [e["step"] for e in events if "step" in e]
    assert steps == sorted(steps) and len(steps) >= 3
    assert all(e.get("total_steps") == LONG["num_inference_steps"] for e in events if "step" in e)
    stages = [e["stage"] for e in events if "stage" in e]
    assert stages.index("denoise") < stages.index("decode") < stages.index("upload") < stages.index("done")
    assert [e["state"] for e in events][-1] == "succeeded"
    # The same events, for every job, in one capped stream.
    stream = [json.loads(fields[b"event"]) for _, fields in client.redis.xrevrange(keys.EVENTS_STREAM, count=500)]
    assert any(e["id"] == job.id and e["state"] == "succeeded" for e in stream)


def test_wait_is_woken_by_events_not_by_polling(client: Client, worker: WorkerProcess, image_file: Path) -> None:
    job = client.submit(image_file, **SMALL)
    started = time.monotonic()
    record = job.wait(timeout=120, reread_every=60)  # only an event can end this wait in time
    assert record.state is JobState.SUCCEEDED and time.monotonic() - started < 30


def test_cancel_a_running_job_frees_the_warm_worker(
    svdq_env: dict[str, str], start_worker: Any, image_file: Path
) -> None:
    fresh = start_worker(env={"SVDQ_MAX_STEPS": "200"})  # above the default cap, for a long job
    with Client.from_env(queue=fresh.queue, max_steps=200) as client:
        client.submit(image_file, **SMALL).wait(timeout=120)  # pays the first-job load
        running = client.submit(image_file, **{**LONG, "num_inference_steps": 200})
        wait_until(running, lambda r: (r.step or 0) >= 1)
        canceled = running.cancel()
        assert canceled.state is JobState.CANCELED
        canceled_at = time.monotonic()

        after = client.submit(image_file, **SMALL).wait(timeout=120)
        assert after.state is JobState.SUCCEEDED and after.worker == fresh.hostname
        assert after.timings["load"] == 0  # the same warm pipeline
        # 200 steps take about a minute here; the next job starting within 20 s means the render stopped.
        assert time.monotonic() - canceled_at < 20
        final = running.status()
        assert final.state is JobState.CANCELED and final.result is None and (final.step or 0) < 200


def test_cancel_a_queued_job_and_refuse_a_finished_one(
    svdq_env: dict[str, str], start_worker: Any, image_file: Path
) -> None:
    fresh = start_worker()
    with Client.from_env(queue=fresh.queue) as client:
        busy = client.submit(image_file, **LONG)
        wait_until(busy, lambda r: r.state is JobState.STARTED)
        queued = client.submit(image_file, **SMALL)
        assert queued.cancel().state is JobState.CANCELED
        assert busy.wait(timeout=120).state is JobState.SUCCEEDED
        follow = client.submit(image_file, **SMALL).wait(timeout=120)  # the worker has seen the canceled one
        assert follow.state is JobState.SUCCEEDED
        skipped = queued.status()
        assert skipped.state is JobState.CANCELED and skipped.started_at is None and skipped.attempts == 0

        with pytest.raises(NotCancelable, match="already succeeded"):
            busy.cancel()
    run = subprocess.run([SVDQ, "cancel", busy.id], env=svdq_env, capture_output=True, text=True)
    assert run.returncode == 6 and "already succeeded" in run.stderr


def test_priority_order_high_then_normal_then_low(
    svdq_env: dict[str, str], start_worker: Any, image_file: Path
) -> None:
    fresh = start_worker()
    with Client.from_env(queue=fresh.queue) as client:
        current = client.submit(image_file, **SLOW)
        wait_until(current, lambda r: r.state is JobState.STARTED)
        lows = [client.submit(image_file, **SMALL, priority="low") for _ in range(20)]
        normals = [client.submit(image_file, **SMALL) for _ in range(2)]
        high = client.submit(image_file, **SMALL, priority="high")
        first = current.wait(timeout=120)
        high_rec = high.wait(timeout=120)
        normal_recs = [job.wait(timeout=120) for job in normals]
        low_recs = [job.status() for job in lows]
        # Rendering the lows too would only take time: the worker is on the first of them at most.
        for job in lows:
            with contextlib.suppress(NotCancelable):
                job.cancel()
    assert all(r.state is JobState.SUCCEEDED for r in [first, high_rec, *normal_recs])
    starts = lambda records: [r.started_at or "" for r in records]  # noqa: E731
    # The high job, submitted last, starts as soon as the current one is off the GPU.
    assert high_rec.started_at >= first.started_at and high_rec.started_at < min(starts(normal_recs))
    # Every low was still waiting when the normals started, however long they had queued.
    assert sum(r.state is not JobState.QUEUED for r in low_recs) <= 1
    assert all(r.started_at is None or r.started_at > max(starts(normal_recs)) for r in low_recs)
    assert high_rec.priority == "high" and {r.priority for r in low_recs} == {"low"}


def test_one_idempotency_key_gives_one_job_under_concurrent_submits(svdq_env: dict[str, str], image_file: Path) -> None:
    queue = f"nobody-{uuid.uuid4().hex[:8]}"  # no worker reads it: the queue shows what was enqueued
    key = f"order-{uuid.uuid4().hex}"
    ids: list[str] = []
    barrier = threading.Barrier(20)

    def submit() -> None:
        with Client.from_env(queue=queue) as client:
            barrier.wait()
            ids.append(client.submit(image_file, **SMALL, idempotency_key=key).id)

    threads = [threading.Thread(target=submit) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    with Client.from_env(queue=queue) as client:
        assert len(ids) == 20 and len(set(ids)) == 1
        assert client.redis.llen(queue) == 1
        record = client.job(ids[0]).status()
        assert record.idempotency_key == key
        # As long as its job: no TTL while it waits, its record's once it ends (test_records.py).
        assert client.redis.ttl(keys.idempotency(key)) == client.redis.ttl(keys.job(ids[0])) == -1


def test_a_key_reused_for_another_render_is_refused_naming_what_differs(
    svdq_env: dict[str, str], image_file: Path, tmp_path: Path
) -> None:
    """A key names one request (as Stripe's and the IETF draft's Idempotency-Key do): a submit that reuses it for
    other parameters or another image would otherwise get the old job's video and never know."""
    queue = f"nobody-{uuid.uuid4().hex[:8]}"  # no worker reads it: the queue shows what was enqueued
    key = f"order-{uuid.uuid4().hex}"
    other = tmp_path / "other.png"
    Image.new("RGB", (64, 64), (9, 9, 9)).save(other)
    with Client.from_env(queue=queue) as client:
        first = client.submit(image_file, **SMALL, idempotency_key=key)
        # The same render at another priority is the same job: a priority decides when, not what.
        assert client.submit(image_file, **SMALL, idempotency_key=key, priority="high").id == first.id
        with pytest.raises(KeyConflict) as other_params:
            client.submit(image_file, **{**SMALL, "num_frames": 5, "seed": 7}, idempotency_key=key)
        with pytest.raises(KeyConflict) as other_image:
            client.submit(other, **SMALL, idempotency_key=key)
        many = list(
            client.submit_many([Submission(image_file, SMALL, key), Submission(image_file, {**SMALL, "fps": 3}, key)])
        )
        # A fresh key twice in one batch: the row that finds it taken by the row before it is compared too.
        fresh = f"order-{uuid.uuid4().hex}"
        in_batch = list(
            client.submit_many(
                [Submission(image_file, SMALL, fresh), Submission(image_file, {**SMALL, "fps": 3}, fresh)]
            )
        )
        assert client.redis.llen(queue) == 2 and client.redis.llen(f"{queue}.high") == 0  # one job per key
    with Client.from_env(queue=queue, max_frames=2) as stricter:  # caps lowered since: an existing job stands
        (again,) = stricter.submit_many([Submission(image_file, SMALL, key)])
    assert again.existed and again.job is not None and again.job.id == first.id
    assert other_params.value.param == "idempotency_key" and other_params.value.job_id == first.id
    assert other_params.value.differ == ["num_frames", "seed"] and other_image.value.differ == ["image"]
    assert many[0].existed and many[0].job is not None and many[0].job.id == first.id
    assert many[1].job is None and isinstance(many[1].error, KeyConflict) and many[1].error.differ == ["fps"]
    assert in_batch[0].job is not None and not in_batch[0].existed
    assert (
        in_batch[1].job is None and isinstance(in_batch[1].error, KeyConflict) and in_batch[1].error.differ == ["fps"]
    )
    run = subprocess.run(
        [SVDQ, "submit", str(image_file), "--key", key, "--frames", "6", "--width", "64", "--height", "64"],
        env={**svdq_env, "SVDQ_QUEUE": queue},
        capture_output=True,
        text=True,
    )
    assert run.returncode == 2 and f"--key: already names job {first.id}" in run.stderr
    assert "--frames" in run.stderr and "use a new key" in run.stderr and "Traceback" not in run.stderr


def test_list_by_state_from_the_indexes(
    svdq_env: dict[str, str], client: Client, worker: WorkerProcess, image_file: Path
) -> None:
    done = client.submit(image_file, **SMALL).wait(timeout=120)
    listed = client.list("succeeded", limit=5)
    assert listed and listed[0].id == done.id and all(r.state is JobState.SUCCEEDED for r in listed)
    run = subprocess.run(
        [SVDQ, "list", "--state", "succeeded", "--limit", "3", "--json"], env=svdq_env, capture_output=True, text=True
    )
    assert run.returncode == 0
    rows = json.loads(run.stdout)
    assert 1 <= len(rows) <= 3 and rows[0]["id"] == done.id
    assert client.redis.zscore(keys.state_index("succeeded"), done.id) is not None
    assert client.redis.zscore(keys.state_index("started"), done.id) is None
