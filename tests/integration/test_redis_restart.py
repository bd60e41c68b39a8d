"""Redis restarts (append-only file on): queued jobs and records survive, workers and producers reconnect."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from producer.client import Client
from producer.contract import JobState
from producer.local_redis import LocalRedis
from tests.integration.conftest import SLOW, SMALL

pytestmark = pytest.mark.integration


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
        deadline = time.monotonic() + 60
        while (record := running.status()).state is not JobState.STARTED or not record.step:
            assert time.monotonic() < deadline, record
            time.sleep(0.05)
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
