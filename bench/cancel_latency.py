"""How soon a canceled render frees its worker: from `cancel` to the next queued job starting (issue 11).

1. Start a redis-server, a file:// store and a real worker (`python -m worker`, on the device it picks: CUDA on a
   GPU host), and render one small job so the model is loaded and warm.
2. Submit a long job (default: the operator caps' defaults, 64 frames of 1024x1024 and 100 steps) and a small
   one behind it. Time the long job's steps from its record; halfway through step `--after-steps` + 1, cancel.
3. The figure: from the cancel until the small job's record says `started` (the worker is free for it).

svdq checks the record before each layer of the UNet's blocks (at most every 0.25 s), so a render stops inside
a step. The comparison is stopping at the step's end, which is all a callback between steps can do (diffusers'
`callback_on_step_end`): from halfway through a step, half a step's time. Both in the same run, as a ratio.
One JSON line per figure.

    .venv/bin/python bench/cancel_latency.py [--model DIR] [--frames 64 --width 1024 --height 1024 --steps 100]
                                             [--repeat 3] [--compile]
No --model: the tiny random model, built here. On a GPU host, the SVD-XT folder that worker_e2e.sh saves
(/tmp/svdxt). SVDQ_COMPILE=0 unless --compile: a compiling worker runs a shape it did not compile at warm-up
(the caps' is one) eagerly too, with the same checkpoints, so the figure is the same; --compile adds the
warm-up's compile (minutes with a cold cache) to check just that.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from PIL import Image

from producer.client import Client, Job
from producer.contract import JobRecord, JobState
from producer.local_redis import LocalRedis, free_port

SMALL = {"width": 64, "height": 64, "num_frames": 4, "num_inference_steps": 2}


def emit(path: str, figure: str, value: Any, **extra: Any) -> None:
    line = {"bench": "cancel_latency", "machine": platform.node(), "path": path, "figure": figure, "value": value}
    print(json.dumps({**line, **extra}), flush=True)


def epoch(iso: str | None) -> float:
    assert iso is not None
    return datetime.fromisoformat(iso).timestamp()


def wait_for(job: Job, done: Any, timeout: float) -> JobRecord:
    deadline = time.monotonic() + timeout
    while not done(record := job.status()):
        if record.state.is_terminal() or time.monotonic() > deadline:
            raise RuntimeError(f"job {job.id} did not get there: {record.model_dump_json()}")
        time.sleep(0.01)
    return record


def step_times(job: Job, after_steps: int, timeout: float) -> tuple[float, float]:
    """Seconds a step takes (from the record's step counter) and when the last step seen began."""
    seen: list[tuple[int, float]] = []
    deadline = time.monotonic() + timeout
    while len(seen) < 2 or seen[-1][0] < after_steps:
        record = job.status()
        if record.state.is_terminal() or time.monotonic() > deadline:
            raise RuntimeError(f"job {job.id} ended or stalled before step {after_steps}: {record.state}")
        if record.step and (not seen or record.step > seen[-1][0]):
            seen.append((record.step, time.monotonic()))
        time.sleep(0.005)
    (first, t_first), (last, t_last) = seen[0], seen[-1]
    return (t_last - t_first) / (last - first), t_last


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="a model folder (default: the tiny random model, built here)")
    parser.add_argument("--frames", type=int, default=64)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--after-steps", type=int, default=2, help="steps done before the cancel (at least 2)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="leave SVDQ_COMPILE to the worker's default")
    parser.add_argument("--timeout", type=float, default=300, help="seconds any one wait may take")
    args = parser.parse_args()
    args.after_steps = max(args.after_steps, 2)

    with tempfile.TemporaryDirectory(prefix="svdq-cancel-") as tmp:
        work = Path(tmp)
        model = args.model
        if model is None:
            model = work / "tiny"
            subprocess.run([sys.executable, "-m", "worker.tiny_model", str(model)], check=True, capture_output=True)
        server = LocalRedis(work / "redis")
        queue = f"cancel-{uuid.uuid4().hex[:6]}"
        caps = {
            "max_frames": max(args.frames, 64),
            "max_pixels": max(args.width * args.height, 1024 * 1024),
            "max_steps": max(args.steps, 100),
        }
        env = {
            **os.environ,
            "SVDQ_REDIS_URL": server.start(),
            "SVDQ_STORAGE_URL": (work / "store").as_uri(),
            "SVDQ_MODEL": str(model),
            "SVDQ_QUEUE": queue,
            "SVDQ_METRICS_PORT": str(free_port()),
            **{f"SVDQ_{name.upper()}": str(value) for name, value in caps.items()},
            **({} if args.compile else {"SVDQ_COMPILE": "0"}),
        }
        log = (work / "worker.log").open("wb")
        worker = subprocess.Popen(
            [sys.executable, "-m", "worker"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            with Client.from_env(
                redis_url=env["SVDQ_REDIS_URL"], storage_url=env["SVDQ_STORAGE_URL"], queue=queue, **caps
            ) as client:
                run(client, args)
        except Exception:
            print((work / "worker.log").read_text(errors="replace")[-4000:], file=sys.stderr)
            raise
        finally:
            worker.terminate()
            try:
                worker.wait(timeout=60)
            except subprocess.TimeoutExpired:
                worker.kill()
            server.stop()


def run(client: Client, args: argparse.Namespace) -> None:
    image = Image.new("RGB", (args.width, args.height), (200, 120, 40))
    started = time.monotonic()
    client.submit(image, seed=1, **SMALL).wait(timeout=args.timeout)  # the model's load, and warm
    emit("svdq", "worker_warm_seconds", round(time.monotonic() - started, 2))
    long = {"width": args.width, "height": args.height, "num_frames": args.frames, "num_inference_steps": args.steps}
    freed, steps = [], []
    for repeat in range(args.repeat):
        job = client.submit(image, seed=10 + repeat, **long)
        behind = client.submit(image, seed=100 + repeat, **SMALL)
        wait_for(job, lambda r: r.state is JobState.STARTED, args.timeout)
        step, step_began = step_times(job, args.after_steps, args.timeout)
        time.sleep(max(0.0, step_began + step / 2 - time.monotonic()))
        canceled_at = time.time()
        assert job.cancel().state is JobState.CANCELED
        next_started = wait_for(behind, lambda r: r.started_at is not None, args.timeout)
        freed.append(epoch(next_started.started_at) - canceled_at)
        steps.append(step)
        final = job.status()
        assert final.state is JobState.CANCELED and final.result is None, final
        behind.wait(timeout=args.timeout)
        emit("svdq", "cancel_to_free_seconds", round(freed[-1], 3), repeat=repeat, step=final.step)
    step = statistics.mean(steps)
    emit("step_end", "step_seconds", round(step, 3), size=long)
    emit("step_end", "cancel_to_free_seconds", round(step / 2, 3), note="half a step: cancel halfway, stop at its end")
    emit("svdq", "cancel_to_free_seconds_max", round(max(freed), 3), repeats=len(freed))
    emit("svdq", "ratio_to_step_end", round(statistics.mean(freed) / (step / 2), 3))


if __name__ == "__main__":
    main()
