"""Transient failures retry with backoff and a cap; bad input never retries. S3 is cut by a real proxy."""

from __future__ import annotations

import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis
from standardwebhooks.webhooks import Webhook

from producer import keys
from producer.client import Client
from producer.contract import JobState
from producer.local_redis import LocalRedis
from tests.integration.conftest import BUCKET, PREFIX, SLOW, SMALL, wait_until
from tests.integration.faults import CuttableProxy
from tests.integration.test_webhooks import SECRET, Receiver
from worker.spool import OWNER

pytestmark = pytest.mark.integration


def spooled(spool: Path) -> list[Path]:
    """The videos waiting in a worker's spool (each process's folder also holds the lock it keeps)."""
    return [p for p in spool.rglob("*") if p.is_file() and p.name != OWNER]


@pytest.fixture
def s3_proxy(svdq_env: dict[str, str]) -> Iterator[CuttableProxy]:
    proxy = CuttableProxy(urlsplit(svdq_env["SVDQ_S3_ENDPOINT_URL"]).port or 0)
    yield proxy
    proxy.close()


@pytest.fixture
def worker_s3(svdq_env: dict[str, str], s3_proxy: CuttableProxy, monkeypatch: pytest.MonkeyPatch) -> CuttableProxy:
    """Workers started from here reach S3 through the proxy, and an input they cannot reach fails the attempt at
    once (the retry path, not the wait within an attempt)."""
    monkeypatch.setitem(svdq_env, "SVDQ_S3_ENDPOINT_URL", s3_proxy.url)
    monkeypatch.setitem(svdq_env, "SVDQ_FETCH_WAIT", "0")
    return s3_proxy


def uploaded_image(s3: Any, image_file: Path) -> str:
    key = f"{PREFIX}/uploads/{uuid.uuid4().hex}.png"
    s3.put_object(Bucket=BUCKET, Key=key, Body=image_file.read_bytes())
    return f"s3://{BUCKET}/{key}"


def test_a_storage_outage_is_retried_and_then_succeeds(
    svdq_env: dict[str, str],
    start_worker: Any,
    worker_s3: CuttableProxy,
    s3: Any,
    image_file: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(svdq_env, "SVDQ_RETRY_BACKOFF", "3")
    fresh = start_worker()
    image = uploaded_image(s3, image_file)
    with Client.from_env(queue=fresh.queue) as client:
        worker_s3.down()
        job = client.submit(image, **SMALL)
        deadline = time.monotonic() + 60
        while (record := job.status()).attempts < 1 or record.state is not JobState.QUEUED:
            assert time.monotonic() < deadline and not record.state.is_terminal(), record
            time.sleep(0.05)
        assert record.error is not None and record.error.code == "storage_unavailable"
        assert record.stage == "retrying"
        worker_s3.up()
        final = job.wait(timeout=120)
    assert final.state is JobState.SUCCEEDED, final.error
    assert final.attempts == 2 and final.worker == fresh.hostname


def test_a_retry_whose_message_the_broker_refuses_is_sent_once_it_takes_it(
    svdq_env: dict[str, str],
    start_worker: Any,
    worker_s3: CuttableProxy,
    s3: Any,
    image_file: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A retry waits in svdq's schedule, not in a message: Celery dropped the delivered message when it could not
    send the retry's (the record, already `queued`, then waited for ever), and an idle worker held a countdown
    message in memory, where a Redis restart could end the worker with it. Here Redis refuses the worker's LPUSH
    (an ACL: how a message is sent) once it is up, then takes it again. A Redis of its own: no other test's
    worker may send the job's message meanwhile."""
    server = LocalRedis(tmp_path / "redis")
    admin_url = server.start()
    admin = redis.Redis.from_url(admin_url)
    user, password = f"retry-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    admin.acl_setuser(user, enabled=True, passwords=[f"+{password}"], keys=["*"], channels=["*"], commands=["+@all"])
    parts = urlsplit(admin_url)
    refused = parts._replace(netloc=f"{user}:{password}@{parts.hostname}:{parts.port}").geturl()
    monkeypatch.setitem(svdq_env, "SVDQ_RETRY_BACKOFF", "0.2")
    fresh = start_worker(env={"SVDQ_REDIS_URL": refused})
    image = uploaded_image(s3, image_file)
    try:
        admin.acl_setuser(user, enabled=True, commands=["-lpush"])  # not before: its ping answers need LPUSH
        worker_s3.down()
        with Client.from_env(queue=fresh.queue, redis_url=admin_url) as client:
            job = client.submit(image, **SMALL)
            deadline = time.monotonic() + 60
            while "could not send its due retry" not in fresh.log_text():
                assert time.monotonic() < deadline and not job.status().state.is_terminal(), fresh.log_text()
                time.sleep(0.1)
            record = job.status()
            assert (record.state, record.stage) == (JobState.QUEUED, "retrying")
            assert admin.zscore(keys.RETRY_DUE, job.id) is not None  # still scheduled
            worker_s3.up()
            admin.acl_setuser(user, enabled=True, commands=["+lpush"])
            final = job.wait(timeout=60)
        assert admin.zscore(keys.RETRY_DUE, job.id) is None
    finally:
        fresh.proc.terminate()  # first: a worker whose Redis is gone spent 30 s failing to stop
        fresh.proc.wait(timeout=30)
        server.stop()
    assert final.state is JobState.SUCCEEDED, final.error
    assert final.attempts == 2 and final.worker == fresh.hostname  # the same worker, alive throughout


def test_retries_stop_at_max_attempts_with_the_last_error(
    svdq_env: dict[str, str],
    start_worker: Any,
    worker_s3: CuttableProxy,
    s3: Any,
    image_file: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Five: past Celery's own cap of three retries, which left the record `queued` with no message.
    monkeypatch.setitem(svdq_env, "SVDQ_MAX_ATTEMPTS", "5")
    monkeypatch.setitem(svdq_env, "SVDQ_RETRY_BACKOFF", "0.2")
    fresh = start_worker()
    image = uploaded_image(s3, image_file)
    worker_s3.down()
    with Client.from_env(queue=fresh.queue) as client:
        final = client.submit(image, **SMALL).wait(timeout=120)
    assert final.state is JobState.FAILED
    assert final.attempts == 5
    assert final.error is not None and final.error.code == "storage_unavailable"


def test_an_input_outage_is_waited_out_within_the_attempt_and_the_wait_can_be_canceled(
    start_worker: Any, s3_proxy: CuttableProxy, s3: Any, image_file: Path
) -> None:
    # One attempt allowed: without the wait the first unreachable read would fail the job.
    env = {"SVDQ_S3_ENDPOINT_URL": s3_proxy.url, "SVDQ_MAX_ATTEMPTS": "1", "SVDQ_FETCH_WAIT": "60"}
    fresh = start_worker(env=env)
    image = uploaded_image(s3, image_file)
    s3_proxy.down()
    with Client.from_env(queue=fresh.queue) as client:
        doomed = client.submit(image, **{**SMALL, "seed": 1})
        waiting = client.submit(image, **{**SMALL, "seed": 2})
        deadline = time.monotonic() + 60
        while fresh.log_text().count("(SVDQ_FETCH_WAIT)") < 2:  # the first job has waited twice
            assert time.monotonic() < deadline, fresh.log_text()[-3000:]
            time.sleep(0.1)
        record = doomed.status()
        assert (record.state, record.stage, record.attempts) == (JobState.STARTED, "fetch", 1)
        doomed.cancel()
        wait_until(waiting, lambda r: r.state is JobState.STARTED, timeout=30)  # the cancel ended the wait
        time.sleep(2)
        s3_proxy.up()
        final = waiting.wait(timeout=60)
    assert final.state is JobState.SUCCEEDED, final.error
    assert final.attempts == 1


def test_an_upload_outage_spools_the_video_and_uploads_it_when_storage_returns(
    svdq_env: dict[str, str],
    start_worker: Any,
    s3_proxy: CuttableProxy,
    s3: Any,
    image_file: Path,
    tmp_path: Path,
) -> None:
    spool = tmp_path / "spool"
    fresh = start_worker(
        env={"SVDQ_S3_ENDPOINT_URL": s3_proxy.url, "SVDQ_RETRY_BACKOFF": "1", "SVDQ_SPOOL_DIR": str(spool)}
    )
    image = uploaded_image(s3, image_file)
    with Client.from_env(queue=fresh.queue) as client:
        job = client.submit(image, **SLOW)
        wait_until(job, lambda r: r.stage == "denoise")  # the image is in: cut storage while the GPU works
        s3_proxy.down()
        pending = wait_until(job, lambda r: r.stage == "upload_pending")
        assert pending.state is JobState.STARTED and pending.attempts == 1
        assert pending.error is not None and pending.error.code == "storage_unavailable"
        assert "upload spool" in pending.error.message
        assert [p.suffix for p in spooled(spool)] == [".mp4"]
        time.sleep(3)  # a retry or two fail meanwhile
        assert job.status().state is JobState.STARTED
        s3_proxy.up()
        final = job.wait(timeout=120)
    assert final.state is JobState.SUCCEEDED and final.attempts == 1  # rendered once
    assert final.error is None and final.result is not None
    assert s3.head_object(Bucket=BUCKET, Key=final.result.key)["ContentLength"] == final.result.bytes
    assert not spooled(spool)
    assert f"job {job.id} succeeded" in fresh.log_text()


def stopping_with_a_spooled_video(
    start_worker: Any, s3_proxy: CuttableProxy, s3: Any, image_file: Path, tmp_path: Path, grace: int
) -> tuple[Any, Any, Client]:
    """A worker whose only job's video waits in its spool (storage cut), sent SIGTERM."""
    fresh = start_worker(
        env={
            "SVDQ_S3_ENDPOINT_URL": s3_proxy.url,
            "SVDQ_RETRY_BACKOFF": "1",
            "SVDQ_SPOOL_DIR": str(tmp_path / "spool"),
            "SVDQ_STOP_GRACE": str(grace),
            "SVDQ_LEASE_TTL": "2",
        }
    )
    client = Client.from_env(queue=fresh.queue)
    job = client.submit(uploaded_image(s3, image_file), **SMALL)
    wait_until(job, lambda r: r.stage == "denoise")
    s3_proxy.down()
    wait_until(job, lambda r: r.stage == "upload_pending")
    fresh.proc.terminate()
    return fresh, job, client


def test_a_stopping_worker_gives_its_spooled_video_time_to_upload(
    start_worker: Any, s3_proxy: CuttableProxy, s3: Any, image_file: Path, tmp_path: Path
) -> None:
    fresh, job, client = stopping_with_a_spooled_video(start_worker, s3_proxy, s3, image_file, tmp_path, grace=60)
    with client:
        time.sleep(3)
        assert fresh.proc.poll() is None  # still waiting on the spool
        s3_proxy.up()
        final = job.wait(timeout=60)
    assert fresh.proc.wait(timeout=60) == 0
    assert final.state is JobState.SUCCEEDED and final.attempts == 1  # rendered once, uploaded while stopping


def test_a_stopping_worker_leaves_a_video_storage_never_took_to_its_lease(
    start_worker: Any, s3_proxy: CuttableProxy, s3: Any, image_file: Path, tmp_path: Path
) -> None:
    fresh, job, client = stopping_with_a_spooled_video(start_worker, s3_proxy, s3, image_file, tmp_path, grace=3)
    stopped_at = time.monotonic()
    with client:
        assert fresh.proc.wait(timeout=60) == 0
        assert 2.5 < time.monotonic() - stopped_at < 30  # it waited for the grace (3 s), then went
        assert "spooled uploads dropped at shutdown" in fresh.log_text()
        left = job.status()
        assert (left.state, left.attempts) == (JobState.STARTED, 1)
        deadline = time.monotonic() + 10
        while client.redis.exists(keys.lease(job.id)):  # lapsed: the next sweep sends it back to its queue
            assert time.monotonic() < deadline
            time.sleep(0.2)


def test_a_job_canceled_while_its_video_waits_in_the_spool_is_dropped_and_its_end_announced(
    svdq_env: dict[str, str],
    start_worker: Any,
    s3_proxy: CuttableProxy,
    s3: Any,
    image_file: Path,
    tmp_path: Path,
) -> None:
    """Canceled after its last progress check: the worker drops the video and its lease, and says the job
    ended (webhook, Flower, metrics), as it does for a cancel while rendering."""
    spool, receiver = tmp_path / "spool", Receiver()
    fresh = start_worker(
        env={
            "SVDQ_S3_ENDPOINT_URL": s3_proxy.url,
            "SVDQ_RETRY_BACKOFF": "1",
            "SVDQ_SPOOL_DIR": str(spool),
            "SVDQ_WEBHOOK_SECRET": SECRET,
            "SVDQ_WEBHOOK_ALLOW_PRIVATE": "1",
        }
    )
    image = uploaded_image(s3, image_file)
    try:
        with Client.from_env(queue=fresh.queue, webhook_allow_private=True) as client:
            job = client.submit(image, webhook=receiver.url, **SLOW)
            wait_until(job, lambda r: r.stage == "denoise")
            s3_proxy.down()
            wait_until(job, lambda r: r.stage == "upload_pending")
            assert job.cancel().state is JobState.CANCELED
            calls = receiver.events(2, timeout=60)
        assert [Webhook(SECRET).verify(body, headers)["type"] for headers, body in calls] == [
            "job.started",
            "job.canceled",
        ]
        deadline = time.monotonic() + 30
        while spooled(spool):  # dropped at its next try
            assert time.monotonic() < deadline, "the canceled job's video is still spooled"
            time.sleep(0.2)
    finally:
        receiver.close()
        s3_proxy.up()


@pytest.mark.parametrize("trouble", ["full", "folder-removed", "video-removed"])
def test_a_spool_that_cannot_keep_the_video_fails_the_job_clearly(
    svdq_env: dict[str, str],
    start_worker: Any,
    s3_proxy: CuttableProxy,
    s3: Any,
    image_file: Path,
    tmp_path: Path,
    trouble: str,
) -> None:
    """Full, or its folder or the video removed under it (a /tmp cleaner): the job stayed `started` for ever,
    its lease renewed while the upload could never happen."""
    spool = tmp_path / "spool"
    env = {"SVDQ_S3_ENDPOINT_URL": s3_proxy.url, "SVDQ_SPOOL_DIR": str(spool), "SVDQ_RETRY_BACKOFF": "0.5"}
    if trouble == "full":
        env["SVDQ_SPOOL_MAX_BYTES"] = "100"
    fresh = start_worker(env=env)
    image = uploaded_image(s3, image_file)
    with Client.from_env(queue=fresh.queue) as client:
        job = client.submit(image, **SLOW)
        wait_until(job, lambda r: r.stage == "denoise")
        s3_proxy.down()
        if trouble == "folder-removed":
            shutil.rmtree(spool)
        elif trouble == "video-removed":
            wait_until(job, lambda r: r.stage == "upload_pending")
            for video in spooled(spool):
                video.unlink()
        final = job.wait(timeout=60)
    assert final.state is JobState.FAILED and final.attempts == 1
    assert final.error is not None and final.error.code == "spool_full"
    says = {
        "full": "SVDQ_SPOOL_MAX_BYTES=100",
        "folder-removed": "could not keep the video: [Errno 2] No such file or directory",
        "video-removed": "removed from the upload spool",
    }[trouble]
    assert says in final.error.message, final.error.message
