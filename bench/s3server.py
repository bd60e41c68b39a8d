"""An S3-compatible server for the benchmarks: moto's server mode on a free loopback port, reached over HTTP
through boto3 exactly as MinIO or AWS would be."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from producer.local_redis import free_port


class S3Server:
    def __init__(self, workdir: Path):
        self.port = free_port()
        with (workdir / "moto.log").open("wb") as log:  # the server keeps its own copy of the descriptor
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={k: v for k, v in os.environ.items() if k != "COVERAGE_PROCESS_CONFIG"},  # not svdq's code
            )
        self.endpoint = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(self.endpoint + "/moto-api/", timeout=1).close()
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.proc.kill()
                    raise RuntimeError(f"the S3 server did not start (see {workdir / 'moto.log'})") from None
                time.sleep(0.1)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)
