"""Raw Celery messages and records as an attacker (or a buggy backend) could write them: a bad job id never
becomes a record, a key or a log line of its own; a message cannot take over a job that has a record; one
malformed record never stops a sweep, a listing or a status call."""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

from producer import keys, wire
from producer.client import Client
from producer.contract import TASK_NAME, InvalidParameter, JobState
from producer.settings import Settings
from producer.status import JobNotFound, StatusStore
from tests.integration.conftest import BUCKET, PREFIX, SMALL, SVDQ, WorkerProcess
from worker.recovery import Recovery

pytestmark = pytest.mark.integration

BAD_IDS: list[Any] = [
    12345,
    1.5,
    None,
    True,
    [1],
    {"a": 1},
    "",
    "a/../b",
    "../../x",
    "x\nFAKE LOG LINE",
    "a" * 65,
    "nul\x00byte",
    "space id",
]


def queued_job(image_file: Path) -> tuple[Client, Any]:
    """A job on a queue no worker reads: it stays queued, with its record and its stored image."""
    client = Client.from_env(queue=f"nobody-{uuid.uuid4().hex[:8]}")
    return client, client.submit(image_file, **SMALL)


def test_bad_job_ids_are_dropped_and_the_worker_goes_on(
    start_worker: Callable[..., WorkerProcess], celery_control: Celery, image_file: Path
) -> None:
    worker = start_worker()
    idle_client, idle = queued_job(image_file)
    request = idle.status().request
    before = set(idle_client.redis.scan_iter(match=keys.JOB_PATTERN, count=1000))

    for bad in BAD_IDS:
        celery_control.send_task(TASK_NAME, kwargs={"job_id": bad, "request": request}, queue=worker.queue)
    with Client.from_env(queue=worker.queue) as client:
        record = client.submit(image_file, **SMALL).wait(timeout=120)  # behind them on the same queue
        assert record.state is JobState.SUCCEEDED, record

        after = set(client.redis.scan_iter(match=keys.JOB_PATTERN, count=1000))
    assert after - before == {keys.job(record.id).encode()}  # no record for any bad id
    log = worker.log_text()
    assert log.count("dropped a message with an invalid job id") == len(BAD_IDS)
    assert "\nFAKE LOG LINE" not in log and "'x\\nFAKE LOG LINE'" in log  # escaped, never a line of its own
    idle.cancel()
    idle_client.close()


def raw_message(job_id: str, request: dict[str, Any], queue: str, **edits: Any) -> str:
    """The message svdq's producers send, with a sender's edits: `task`, `timelimit`, `routing_key`."""
    data = json.loads(wire.message(job_id, request, queue))
    data["headers"]["task"] = edits.get("task", TASK_NAME)
    data["headers"]["timelimit"] = edits.get("timelimit", [None, None])
    data["properties"]["delivery_info"]["routing_key"] = edits.get("routing_key", queue)
    return json.dumps(data)


def test_a_message_sets_no_time_limit_runs_no_celery_builtin_and_names_no_queue_of_its_own(
    start_worker: Callable[..., WorkerProcess], image_file: Path
) -> None:
    """What a message's sender writes is not the worker's to obey: a `timelimit` header of 1 s had Celery kill the
    pool process mid-job (and reload the model); a routing key became the job's queue, where recovery would send
    it (any Redis key); `celery.group` and the other built-in tasks ran, pushing messages where their arguments
    said."""
    worker = start_worker()
    idle_client, idle = queued_job(image_file)
    request = {**idle.status().request, "num_frames": 8, "num_inference_steps": 6}  # a few seconds on a CPU
    timed, routed, group, huge = (uuid.uuid4().hex for _ in range(4))
    pushed = [
        raw_message(huge, {**request, "image": "inputs/" + "x" * 2_000_000}, worker.queue),
        raw_message(group, request, worker.queue, task="celery.group"),
        raw_message(timed, request, worker.queue, timelimit=[1, 1]),
        raw_message(routed, request, worker.queue, routing_key="attacker:chosen:list"),
    ]
    for message in pushed:
        idle_client.redis.lpush(worker.queue, message)
    store = StatusStore(idle_client.redis, result_ttl=60)

    def ended(job_id: str) -> bool:
        try:
            return store.get(job_id).state.is_terminal()
        except JobNotFound:
            return False

    deadline = time.monotonic() + 120
    while not (ended(timed) and ended(routed)):
        assert time.monotonic() < deadline, worker.log_text()[-3000:]
        time.sleep(0.2)
    records = {job_id: store.get(job_id) for job_id in (timed, routed)}
    assert [r.state for r in records.values()] == [JobState.SUCCEEDED] * 2, records
    log = worker.log_text()
    assert "Hard time limit" not in log and "SIGKILL" not in log
    assert records[routed].queue is None and not idle_client.redis.exists("attacker:chosen:list")
    assert "unregistered task of type 'celery.group'" in log and not idle_client.redis.exists(keys.job(group))
    # A sender's megabytes are neither kept in the record for days nor written to the log.
    refused = store.get(huge)
    assert refused.state is JobState.FAILED and refused.error is not None and len(refused.error.message) < 400
    assert list(refused.request) == ["omitted"] and refused.request["omitted"].startswith("a request of 2000")
    assert len(log) < 100_000
    idle.cancel()
    idle_client.close()


def test_a_message_cannot_take_over_a_job_that_has_a_record(
    start_worker: Callable[..., WorkerProcess], celery_control: Celery, image_file: Path
) -> None:
    worker = start_worker()
    idle_client, victim = queued_job(image_file)
    original = victim.status().request
    other = {**original, "seed": 7, "num_frames": 6}
    broken = {**original, "num_frames": 0}
    for request in (other, broken):  # sent by hand with the victim's id, to a queue a worker reads
        celery_control.send_task(TASK_NAME, kwargs={"job_id": victim.id, "request": request}, queue=worker.queue)
    with Client.from_env(queue=worker.queue) as client:
        assert client.submit(image_file, **SMALL).wait(timeout=120).state is JobState.SUCCEEDED

    record = victim.status()
    assert record.state is JobState.QUEUED and record.request == original and record.attempts == 0
    log = worker.log_text()
    assert f"job {victim.id}: message dropped: its request differs from the job's record" in log
    assert f"job {victim.id}: dropped a message with an invalid request" in log
    victim.cancel()
    idle_client.close()


def test_a_job_from_a_newer_producer_fails_saying_so_and_the_worker_goes_on(
    start_worker: Callable[..., WorkerProcess], celery_control: Celery, image_file: Path
) -> None:
    """A rolling deploy that upgrades producers first: the old worker reads neither the message nor the record
    (a parameter it does not know). The job stayed `queued` for ever, its message dropped."""
    worker = start_worker()
    with Client.from_env(queue=worker.queue) as client:
        stored = client.submit(image_file, **SMALL).wait(timeout=120)  # for a request this worker reads
        newer = {**stored.request, "seed": 5, "future_parameter": 1}
        job_id = uuid.uuid4().hex
        client.records.create(job_id, newer, queue=worker.queue)
        celery_control.send_task(TASK_NAME, kwargs={"job_id": job_id, "request": newer}, queue=worker.queue)
        final = client.job(job_id).wait(timeout=60)
        assert client.submit(image_file, **SMALL).wait(timeout=120).state is JobState.SUCCEEDED  # it goes on
    assert final.state is JobState.FAILED and final.error is not None and final.error.code == "invalid_input"
    assert "future_parameter" in final.error.message and "Upgrade workers before producers" in final.error.message


def test_a_malformed_record_never_stops_a_sweep_a_listing_or_a_status(svdq_env: dict[str, str]) -> None:
    settings = Settings()
    with Client.from_env() as client:
        status = StatusStore(client.redis, result_ttl=60)
        r = client.redis
        # A record as a raw message with a numeric id used to leave it: unreadable, `started`, no lease.
        bad = f"bad{uuid.uuid4().hex[:8]}"
        r.hset(keys.job(bad), mapping={"state": "started", "id": "12345", "attempts": "1", "request": "{not json"})
        r.zadd(keys.state_index("started"), {bad: time.time() - 3600})
        # Behind it, a real job whose worker died: started, lease lapsed.
        good = uuid.uuid4().hex
        status.create(good, {**SMALL, "image": "inputs/x.png"}, queue=f"gone-{good[:6]}")
        status.claim(good, "dead-worker/1", lease_seconds=0.05, worker="dead-worker")
        time.sleep(0.3)

        sent: list[tuple[str, str]] = []
        recovery = Recovery(
            status,
            lambda job_id, request, queue: sent.append((job_id, queue)),
            lease_ttl=0.1,
            max_attempts=3,
            default_queue=settings.queue,
        )
        done = recovery.sweep()
        assert (good, "requeued") in done and sent == [(good, f"gone-{good[:6]}")]
        assert status.get(good).state is JobState.QUEUED

        listed = client.list(limit=200)
        assert good in {rec.id for rec in listed} and bad not in {rec.id for rec in listed}

        shown = subprocess.run([SVDQ, "status", bad], env=svdq_env, capture_output=True, text=True, timeout=60)
        assert shown.returncode == 3 and "malformed" in shown.stderr and "Traceback" not in shown.stderr
        refused = subprocess.run([SVDQ, "status", "../x"], env=svdq_env, capture_output=True, text=True, timeout=60)
        assert refused.returncode == 2 and "job_id" in refused.stderr
        r.delete(keys.job(bad))
        r.zrem(keys.state_index("started"), bad)
        status.transition(good, JobState.CANCELED)


def test_svdq_top_without_redis_says_so(svdq_env: dict[str, str]) -> None:
    env = {**svdq_env, "SVDQ_REDIS_URL": "redis://127.0.0.1:1/0"}
    out = subprocess.run([SVDQ, "top", "--once"], env=env, capture_output=True, text=True, timeout=90)
    assert out.returncode == 5 and "cannot reach Redis" in out.stderr and "Traceback" not in out.stderr


def test_reads_of_missing_buckets_and_bad_names_are_input_errors(svdq_env: dict[str, str]) -> None:
    """Through boto3 against the S3 server: no retry can fix these, so they are `invalid_input`."""
    from producer.contract import ErrorCode
    from producer.storage import open_store
    from worker.errors import JobFailed
    from worker.inputs import fetch_image

    store = open_store(Settings())
    for ref in ("s3://no-such-bucket-svdq/x.png", "s3://Bad_Bucket!/x.png", "inputs/missing.png"):
        with pytest.raises(JobFailed) as failed:
            fetch_image(store, ref, max_bytes=1000)
        assert failed.value.code is ErrorCode.INVALID_INPUT, (ref, failed.value)


def test_operator_caps_refuse_at_submit_and_in_the_worker(
    svdq_env: dict[str, str], start_worker: Callable[..., WorkerProcess], celery_control: Celery, image_file: Path
) -> None:
    queue = f"caps-{uuid.uuid4().hex[:8]}"
    refused = subprocess.run(
        [SVDQ, "submit", str(image_file), "--frames", "6", "--width", "64", "--height", "64"],
        env={**svdq_env, "SVDQ_QUEUE": queue, "SVDQ_MAX_FRAMES": "4"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 2 and refused.stderr == "svdq: --frames: 6 is over this service's SVDQ_MAX_FRAMES=4\n"
    with Client.from_env(queue=queue) as client:
        assert client.redis.llen(queue) == 0  # nothing enqueued

    # A producer with laxer caps (or a raw message): the worker's own caps decide, and the worker goes on.
    worker = start_worker(env={"SVDQ_MAX_FRAMES": "4"})
    with Client.from_env(queue=worker.queue) as client:
        over = client.submit(image_file, **{**SMALL, "num_frames": 6}).wait(timeout=120)
        assert over.state is JobState.FAILED and over.error is not None
        assert over.error.code == "invalid_input" and "SVDQ_MAX_FRAMES=4" in over.error.message
        assert client.submit(image_file, **SMALL).wait(timeout=120).state is JobState.SUCCEEDED


def test_images_are_read_only_from_the_store_or_allowed_places(
    svdq_env: dict[str, str],
    s3: Any,
    start_worker: Callable[..., WorkerProcess],
    celery_control: Celery,
    image_file: Path,
    tmp_path: Path,
) -> None:
    other = f"private-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=other)
    s3.put_object(Bucket=other, Key="hr/scan.png", Body=image_file.read_bytes())
    s3.put_object(Bucket=other, Key="public/ok.png", Body=image_file.read_bytes())
    secret = tmp_path / "backend-secret.png"
    secret.write_bytes(image_file.read_bytes())
    worker = start_worker(env={"SVDQ_INPUT_ALLOW": f"s3://{other}/public"})
    with Client.from_env(queue=worker.queue) as client:
        answers = set()
        for ref in (
            f"s3://{other}/hr/scan.png",
            f"s3://{other}/hr/missing.png",
            f"s3://{BUCKET}/elsewhere/x.png",
            f"s3://{BUCKET}/{PREFIX}/../elsewhere/x.png",
            secret.as_uri(),
        ):
            with pytest.raises(InvalidParameter) as refused:
                client.submit(ref, **SMALL)
            assert refused.value.param == "image"
            answers.add(refused.value.message.replace(ref, "REF"))
        assert answers == {"no image at REF that this service may read"}  # exists or not: the same answer
        with pytest.raises(InvalidParameter, match=r"pathlib\.Path"):
            client.submit(str(secret), **SMALL)  # a str is never a local path of the producer
        assert client.submit(secret, **SMALL).wait(timeout=120).state is JobState.SUCCEEDED  # a Path is

        # A raw message for another bucket: refused by the worker without reading it, as if it did not exist.
        job_id = uuid.uuid4().hex
        request = {**SMALL, "image": f"s3://{other}/hr/scan.png"}
        celery_control.send_task(TASK_NAME, kwargs={"job_id": job_id, "request": request}, queue=worker.queue)
        deadline = time.monotonic() + 120
        while not client.redis.exists(keys.job(job_id)):  # the worker writes the record when it takes the message
            assert time.monotonic() < deadline
            time.sleep(0.1)
        record = client.job(job_id).wait(timeout=120)
        assert record.state is JobState.FAILED and record.error is not None and record.error.code == "invalid_input"
        assert "that this service may read" in record.error.message

    # SVDQ_INPUT_ALLOW opens a place to producer and worker alike.
    with Client.from_env(queue=worker.queue, input_allow=f"s3://{other}/public") as client:
        ok = client.submit(f"s3://{other}/public/ok.png", **SMALL).wait(timeout=120)
        assert ok.state is JobState.SUCCEEDED, ok
