"""Real services for integration tests: a redis-server and an S3 server (moto, over HTTP) on free
ports, the tiny model built once through the CLI, and real `svdq worker` processes."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import imageio_ffmpeg
import pytest
import torch
from celery import Celery
from PIL import Image

from bench.s3server import S3Server
from producer.client import Client, Job, producer_celery
from producer.contract import DEFAULT_QUEUE, JobRecord, priority_queues
from producer.local_redis import LocalRedis, free_port
from producer.settings import Settings

BUCKET = "svdq-test"
PREFIX = "renders"
# Small enough to render in about a second on two CPU cores with the tiny model.
SMALL = {"width": 64, "height": 64, "num_frames": 4, "num_inference_steps": 2, "fps": 8}
# Jobs that denoise for several seconds, to act on while they run.
LONG = {**SMALL, "num_frames": 8, "num_inference_steps": 25}
SLOW = {**SMALL, "num_inference_steps": 30}
# Far longer than a test waits for it (about 22 s on two CPU cores); larger on a GPU host, whose tiny model is fast.
ENDLESS = {**SMALL, "num_frames": 8, "num_inference_steps": 100}
if torch.cuda.is_available():
    ENDLESS |= {"width": 512, "height": 512, "num_frames": 32}
SVDQ = str(Path(sys.executable).with_name("svdq"))


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server = LocalRedis(tmp_path_factory.mktemp("redis"))
    yield server.start()
    server.stop()


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server = S3Server(tmp_path_factory.mktemp("moto"))  # not traced by coverage: not svdq's code
    yield server.endpoint
    server.stop()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("model") / "tiny"
    subprocess.run([SVDQ, "make-tiny-model", str(directory)], check=True, capture_output=True)
    return directory


@pytest.fixture(scope="session")
def svdq_env(redis_url: str, s3_endpoint: str, tiny_model: Path) -> Iterator[dict[str, str]]:
    """The environment every svdq process in the tests shares; also applied to this process."""
    env = {
        "SVDQ_REDIS_URL": redis_url,
        "SVDQ_STORAGE_URL": f"s3://{BUCKET}/{PREFIX}",
        "SVDQ_S3_ENDPOINT_URL": s3_endpoint,
        "SVDQ_MODEL": str(tiny_model),
        "AWS_ACCESS_KEY_ID": "svdq-test-key",
        "AWS_SECRET_ACCESS_KEY": "svdq-test-secret",
        "AWS_DEFAULT_REGION": "us-east-1",
        # On a GPU host every test worker would compile the UNet at start (auto = on CUDA): minutes each.
        # The compiled path has its own tests (tests/unit/test_tuning.py); set SVDQ_COMPILE to run these with it.
        "SVDQ_COMPILE": os.environ.get("SVDQ_COMPILE", "0"),
    }
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=BUCKET)
    yield {**os.environ, **env}
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture
def s3(svdq_env: dict[str, str]) -> object:
    return boto3.client("s3", endpoint_url=svdq_env["SVDQ_S3_ENDPOINT_URL"])


@pytest.fixture
def client(svdq_env: dict[str, str]) -> Iterator[Client]:
    with Client.from_env() as c:
        yield c


@pytest.fixture(scope="session")
def celery_control(svdq_env: dict[str, str]) -> Iterator[Celery]:
    app = producer_celery(Settings())
    yield app
    app.close()


def wait_until(job: Job, predicate: Callable[[JobRecord], bool], timeout: float = 90) -> JobRecord:
    """Poll the job's record until `predicate` holds; fails if it ends (or time runs out) first."""
    deadline = time.monotonic() + timeout
    while not predicate(record := job.status()):
        assert time.monotonic() < deadline and not record.state.is_terminal(), record
        time.sleep(0.05)
    return record


@dataclass
class WorkerProcess:
    hostname: str
    queue: str
    proc: subprocess.Popen[bytes]
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def _start_worker(
    env: dict[str, str], logdir: Path, control: Celery, queue: str, *extra: str, own_queues: bool = False
) -> WorkerProcess:
    """A worker on `queue` (and its priorities); with `own_queues`, on the queues it picks from SVDQ_QUEUE
    and its model."""
    hostname = f"w{uuid.uuid4().hex[:6]}@test"
    log = logdir / f"{hostname}.log"
    queues = [] if own_queues else [f"--queues={','.join(priority_queues(queue))}"]
    with log.open("wb") as fh:
        proc = subprocess.Popen(
            [SVDQ, "worker", f"--hostname={hostname}", *queues, *extra],
            env=env,
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    worker = WorkerProcess(hostname, queue, proc, log)
    deadline = time.monotonic() + 90
    while not control.control.ping(destination=[hostname], timeout=0.5):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"worker did not come up:\n{worker.log_text()[-4000:]}")
    return worker


def _stop_worker(worker: WorkerProcess) -> None:
    if worker.proc.poll() is None:
        worker.proc.terminate()  # the main process only: Celery's warm shutdown stops its pool itself
        try:
            worker.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(worker.proc.pid, signal.SIGKILL)
            worker.proc.wait()
    print(f"--- log of {worker.hostname} ---\n{worker.log_text()[-3000:]}")


@pytest.fixture(scope="session")
def worker(
    svdq_env: dict[str, str], celery_control: Celery, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[WorkerProcess]:
    """One warm worker shared by the session's tests."""
    w = _start_worker(svdq_env, tmp_path_factory.mktemp("worker"), celery_control, DEFAULT_QUEUE)
    yield w
    _stop_worker(w)


@pytest.fixture
def start_worker(
    svdq_env: dict[str, str], celery_control: Celery, tmp_path: Path
) -> Iterator[Callable[..., WorkerProcess]]:
    """A factory for fresh workers, each on a queue of its own unless given one, stopped when the test ends.

    `env` adds to the session's environment (for this worker only)."""
    started: list[WorkerProcess] = []

    controls: list[Celery] = []

    def start(
        *extra: str, queue: str | None = None, env: dict[str, str] | None = None, own_queues: bool = False
    ) -> WorkerProcess:
        queue = queue or f"test-{uuid.uuid4().hex[:8]}"
        full_env = {**svdq_env, **(env or {})}
        control = celery_control
        if full_env["SVDQ_REDIS_URL"] != svdq_env["SVDQ_REDIS_URL"]:  # a worker on a Redis of the test's own
            control = producer_celery(Settings(redis_url=full_env["SVDQ_REDIS_URL"]))
            controls.append(control)
        started.append(_start_worker(full_env, tmp_path, control, queue, *extra, own_queues=own_queues))
        return started[-1]

    yield start
    for w in started:
        _stop_worker(w)
    for control in controls:
        control.close()


@pytest.fixture(scope="session")
def image_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("images") / "input.png"
    img = Image.new("RGB", (96, 80))
    for x in range(96):
        for y in range(80):
            img.putpixel((x, y), (x * 2, y * 3, 128))
    img.save(path)
    return path


FLOWER_AUTH = "ops:flower-test-pw"


def get(url: str, auth: str | None = None, method: str = "GET") -> Any:
    """JSON from Flower (or any HTTP API), with basic auth."""
    request = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


@pytest.fixture
def flower(svdq_env: dict[str, str], tmp_path: Path) -> Iterator[str]:
    with start_flower(svdq_env, tmp_path) as url:
        yield url


@contextlib.contextmanager
def start_flower(env: dict[str, str], tmp_path: Path) -> Iterator[str]:
    """`svdq flower` with FLOWER_AUTH, answering on the URL it yields."""
    port = free_port()
    env = {**env, "SVDQ_FLOWER_BASIC_AUTH": FLOWER_AUTH}
    with (tmp_path / "flower.log").open("wb") as log:
        proc = subprocess.Popen([SVDQ, "flower", f"--port={port}"], env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            get(url + "/api/workers", FLOWER_AUTH)
            break
        except (OSError, urllib.error.HTTPError):
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "flower.log").read_text()
            time.sleep(0.2)
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def probe(data: bytes, tmp_path: Path) -> tuple[int, dict[str, Any]]:
    """Decode every frame with the ffmpeg that imageio-ffmpeg ships; return the count and stream facts."""
    path = tmp_path / f"{uuid.uuid4().hex}.mp4"
    path.write_bytes(data)
    command = [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-i", str(path), "-map", "0:v:0"]
    run = subprocess.run(
        [*command, "-f", "rawvideo", "-pix_fmt", "rgb24", "-"], capture_output=True, check=True, timeout=60
    )
    stream = re.search(rb"Video: (\w+).*?, (yuv\w+).*?, (\d+)x(\d+).*?, ([\d.]+) fps", run.stderr)
    assert stream is not None, run.stderr.decode(errors="replace")
    codec, pix_fmt, width, height, fps = stream.groups()
    size = (int(width), int(height))
    frames, rest = divmod(len(run.stdout), size[0] * size[1] * 3)
    assert rest == 0
    return frames, {"codec": codec.decode(), "pix_fmt": pix_fmt.decode(), "size": size, "fps": float(fps)}


def not_measured(env: Mapping[str, str]) -> dict[str, str]:
    """`env` for a Python process that is not svdq's (the S3 server, pip): coverage (`make test`) measures every
    Python child it can, and tracing those only costs time."""
    return {name: value for name, value in env.items() if name != "COVERAGE_PROCESS_CONFIG"}
