"""`svdq demo`: one render end to end on this machine, starting and stopping what it needs.

Uses SVDQ_REDIS_URL, SVDQ_STORAGE_URL and SVDQ_MODEL when they are set; otherwise starts a
redis-server on a free port, stores under the work folder and builds the tiny model there.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import redis
from PIL import Image, ImageDraw

from producer.client import Client
from producer.local_redis import LocalRedis
from producer.settings import redact_url
from producer.terminal import wait_and_report

# Small enough for a laptop CPU with the tiny model; a real checkpoint gets SVD-XT's defaults.
TINY_PARAMS = {"width": 64, "height": 64, "num_frames": 8, "num_inference_steps": 4, "fps": 7, "seed": 7}


def example_image(path: Path) -> Path:
    """A picture made here (so no licence question): a sunset over water."""
    img = Image.new("RGB", (256, 256))
    draw = ImageDraw.Draw(img)
    for y in range(256):
        sky = y < 160
        shade = (255, 120 + y // 3, 60 + y // 4) if sky else (30, 60 + (y - 160), 120 + (y - 160))
        draw.line([(0, y), (255, y)], fill=shade)
    draw.ellipse([98, 100, 158, 160], fill=(255, 220, 90))
    img.save(path)
    return path


def say(message: str) -> None:
    print(f"svdq demo: {message}", file=sys.stderr, flush=True)


def wait_for_worker(client: Client, worker: subprocess.Popen[bytes], log_path: Path, timeout: float = 300) -> None:
    """Until the worker answers a ping; a worker that dies on start-up ends the demo with its log."""
    deadline = time.monotonic() + timeout
    while not client.celery.control.ping(timeout=1.0):
        if worker.poll() is not None or time.monotonic() > deadline:
            tail = log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"the worker did not come up; the end of {log_path}:\n{tail}")
    say("worker is up")


def run_demo(workdir: Path, output: Path) -> int:
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    started: list[LocalRedis] = []
    worker: subprocess.Popen[bytes] | None = None
    try:
        # 1. A Redis: the configured one, or our own on a free port.
        if "SVDQ_REDIS_URL" not in env:
            local = LocalRedis(workdir / "redis")
            started.append(local)
            env["SVDQ_REDIS_URL"] = local.start()
            say(f"started redis-server at {local.url}")
        redis.Redis.from_url(env["SVDQ_REDIS_URL"], socket_connect_timeout=5).ping()

        # 2. Storage and model.
        env.setdefault("SVDQ_STORAGE_URL", (workdir / "store").as_uri())
        tiny = "SVDQ_MODEL" not in env
        if tiny:
            model_dir = workdir / "tiny-model"
            if not (model_dir / "model_index.json").is_file():
                say(f"building the tiny random-weights model in {model_dir}")
                subprocess.run(
                    [sys.executable, "-m", "worker.tiny_model", str(model_dir)],
                    check=True,
                    env=env,
                    stdout=subprocess.DEVNULL,
                )
            env["SVDQ_MODEL"] = str(model_dir)

        # 3. A worker, logging to a file so the progress bar stays readable.
        log_path = workdir / "worker.log"
        say(f"starting a worker for {env['SVDQ_MODEL']} (log: {log_path})")
        with log_path.open("wb") as log:
            worker = subprocess.Popen(
                [sys.executable, "-m", "worker", "--hostname=demo@%h"],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

        # 4. Submit the example and follow it.
        redis_url = env["SVDQ_REDIS_URL"]

        with Client.from_env(redis_url=redis_url, storage_url=env["SVDQ_STORAGE_URL"]) as client:
            wait_for_worker(client, worker, log_path)
            image = example_image(workdir / "example.png")
            job = client.submit(image, **(TINY_PARAMS if tiny else {}))
            say(f"submitted job {job.id} (redis {redact_url(redis_url)})")
            code = wait_and_report(job, timeout=900, output=output.resolve(), as_json=False, quiet=False, notice=False)
        if code == 0:
            say(f"done: the video is at {output.resolve()}")
        else:
            say(f"the job did not succeed; see {log_path}")
        return code
    finally:
        if worker is not None and worker.poll() is None:
            worker.terminate()
            try:
                worker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                worker.kill()
        for local in started:
            local.stop()
