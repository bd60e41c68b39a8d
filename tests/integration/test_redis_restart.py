"""Redis restarts (append-only file on): queued jobs and records survive, workers and producers reconnect."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import redis

from producer.client import Client, producer_celery
from producer.contract import JobRecord, JobState
from producer.fleet import FleetStore
from producer.local_redis import LocalRedis, free_port
from tests.integration.conftest import ENDLESS, SLOW, SMALL, SVDQ, wait_until
from worker.node import Node
from worker.settings import WorkerSettings

pytestmark = pytest.mark.integration


def denoising(record: JobRecord) -> bool:
    return record.state is JobState.STARTED and bool(record.step)


@pytest.fixture
def durable_redis(tmp_path: Path) -> Iterator[LocalRedis]:
    server = LocalRedis(tmp_path / "redis", appendonly=True)
    server.start()
    yield server
    server.stop()


def test_jobs_and_records_survive_a_redis_restart(
    durable_redis: LocalRedis, start_worker: Any, image_file: Path
) -> None:
    worker = start_worker(env={"SVDQ_REDIS_URL": durable_redis.url})
    with Client.from_env(redis_url=durable_redis.url, queue=worker.queue) as client:
        running = client.submit(image_file, **SLOW)
        wait_until(running, denoising, timeout=60)
        queued = [client.submit(image_file, **SMALL) for _ in range(2)]

        durable_redis.stop()  # SIGTERM: Redis writes its append-only file and exits
        time.sleep(1)
        durable_redis.start(port=durable_redis.port)

        assert [j.status().state for j in queued] == [JobState.QUEUED, JobState.QUEUED]
        after = client.submit(image_file, **SMALL)  # the same client, reconnected on its own
        finals = [j.wait(timeout=180) for j in (running, *queued, after)]
    assert [f.state for f in finals] == [JobState.SUCCEEDED] * 4, [f.error for f in finals]
    assert [f.attempts for f in finals] == [1, 1, 1, 1]
    assert worker.proc.poll() is None


def test_producers_raise_once_their_retries_run_out(
    durable_redis: LocalRedis, svdq_env: dict[str, str], image_file: Path, tmp_path: Path
) -> None:
    """Redis stays away: the client retries for a few seconds, then raises redis.ConnectionError with nothing
    half-made; the CLI says so in one line and exits 5 (unavailable)."""
    store = (tmp_path / "store").as_uri()
    with Client.from_env(redis_url=durable_redis.url, storage_url=store, queue="nobody") as client:
        client.redis.ping()
        durable_redis.stop()
        started = time.monotonic()
        with pytest.raises(redis.ConnectionError):
            client.submit(image_file, **SMALL)
        waited = time.monotonic() - started
    assert 2.0 < waited < 30.0, waited  # it retried, and it did not hang
    env = {**svdq_env, "SVDQ_REDIS_URL": durable_redis.url, "SVDQ_STORAGE_URL": store}
    cli = subprocess.run([SVDQ, "submit", str(image_file)], env=env, capture_output=True, text=True, timeout=60)
    assert cli.returncode == 5, cli.stderr
    assert cli.stderr.startswith("svdq: ") and cli.stderr.count("\n") == 1 and "Traceback" not in cli.stderr


def test_a_node_ready_while_redis_is_away_starts_its_duties_when_redis_returns(tmp_path: Path) -> None:
    """Celery's worker_ready came while Redis was unreachable: the node's recovery sweep, presence and revoke
    start once Redis answers, instead of an error logged in the signal and a node without them for good."""
    port = free_port()
    settings = WorkerSettings(redis_url=f"redis://127.0.0.1:{port}/0", lease_ttl=2.0)
    node, app = Node(settings, redis_retry_for=0.5), producer_celery(settings)
    node.start(SimpleNamespace(hostname="late@test", app=app))  # returns at once: nothing answers yet
    time.sleep(2)  # several failed tries
    server = LocalRedis(tmp_path / "redis")
    server.start(port=port)
    try:
        fleet = FleetStore(redis.Redis(port=port))
        deadline = time.monotonic() + 30
        while "late@test" not in fleet.nodes():
            assert time.monotonic() < deadline, "the node never started"
            time.sleep(0.2)
        assert node.sweeper is not None
    finally:
        node.stop()
        app.close()
        server.stop()


def test_a_busy_worker_takes_no_second_job_when_it_reconnects(
    durable_redis: LocalRedis, start_worker: Any, image_file: Path
) -> None:
    """After a reconnect Celery's prefetch count starts afresh, and a worker whose GPU was busy took the next
    message too: that job then waited behind the render, out of every idle worker's reach."""
    worker = start_worker(env={"SVDQ_REDIS_URL": durable_redis.url})
    with Client.from_env(redis_url=durable_redis.url, queue=worker.queue) as client:
        busy = client.submit(image_file, **ENDLESS)
        wait_until(busy, denoising, timeout=60)
        deadline = time.monotonic() + 60
        durable_redis.stop()
        time.sleep(1)
        durable_redis.start(port=durable_redis.port)
        while worker.log_text().count("Connected to redis") < 2:  # the worker's consumer, back
            assert time.monotonic() < deadline, worker.log_text()[-3000:]
            time.sleep(0.1)
        waiting = client.submit(image_file, **SMALL)
        time.sleep(3)  # a consumer that may take a message takes it within milliseconds
        assert busy.status().state is JobState.STARTED
        assert client.redis.llen(worker.queue) == 1 and waiting.status().state is JobState.QUEUED
        busy.cancel()
        final = waiting.wait(timeout=60)
    assert final.state is JobState.SUCCEEDED, final.error
