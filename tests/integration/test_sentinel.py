"""Redis Sentinel URLs, for the broker and the records alike: a real sentinel watching a real master."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from producer import keys
from producer.client import Client
from producer.contract import JobState
from producer.local_redis import LocalRedis, find_redis_server, free_port
from tests.integration.conftest import FLOWER_AUTH, SMALL, get, start_flower

pytestmark = pytest.mark.integration


@pytest.fixture
def sentinel_url(tmp_path: Path) -> Iterator[tuple[str, int]]:
    master = LocalRedis(tmp_path / "master")
    master.start()
    port = free_port()
    conf = tmp_path / "sentinel.conf"  # the sentinel rewrites its own config: a file of its own
    conf.write_text(
        f"port {port}\nbind 127.0.0.1\ndir {tmp_path}\n"
        f"sentinel monitor mymaster 127.0.0.1 {master.port} 1\n"
        "sentinel down-after-milliseconds mymaster 5000\n"
    )
    with (tmp_path / "sentinel.log").open("wb") as log:
        proc = subprocess.Popen([str(find_redis_server()), str(conf), "--sentinel"], stdout=log, stderr=log)
    deadline = time.monotonic() + 15
    while True:
        try:
            if redis.Redis(port=port).sentinel_get_master_addr_by_name("mymaster"):
                break
        except redis.ConnectionError:
            pass
        assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "sentinel.log").read_text()
        time.sleep(0.1)
    yield f"sentinel://127.0.0.1:{port}/0", master.port
    proc.terminate()
    proc.wait(timeout=10)
    master.stop()


def test_a_job_through_a_sentinel_url_and_flower_on_it(
    sentinel_url: tuple[str, int], start_worker: Any, image_file: Path, svdq_env: dict[str, str], tmp_path: Path
) -> None:
    url, master_port = sentinel_url
    worker = start_worker(env={"SVDQ_REDIS_URL": url})
    with Client.from_env(redis_url=url, queue=worker.queue) as client:
        final = client.submit(image_file, **SMALL).wait(timeout=120)
    assert final.state is JobState.SUCCEEDED, final.error
    assert redis.Redis(port=master_port).exists(keys.job(final.id))  # the record is on the master it found
    # Flower ran on Celery's default app, which had no master name: "'master_name' transport option must be
    # specified", and it saw no worker.
    with start_flower({**svdq_env, "SVDQ_REDIS_URL": url}, tmp_path) as flower:
        assert worker.hostname in get(flower + "/api/workers?refresh=true", FLOWER_AUTH)
