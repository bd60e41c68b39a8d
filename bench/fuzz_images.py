"""A longer fuzz of the image checks than the suite's, and a sample of it through a real worker.

1. `--cases` mutants of valid PNG, JPEG, GIF, WebP, TIFF and BMP files (tests/odd_images.py: byte flips,
   truncations, splices, header fields at 0/huge/negative, PNG chunks dropped, repeated, reordered, forged)
   through the submit-side check (`producer.images.inspect`) and the worker's decode (`worker.inputs.open_image`)
   in this process. Anything but an image or a refusal is an escape; escapes are written to `--workdir`.
2. `--worker-sample` of them, half refused at submit and half accepted, put straight into a file:// store and
   submitted by reference (so the worker meets the refused ones too), through a real `svdq worker` with the tiny
   model on a redis-server started here. Every job must end `succeeded` or `failed`/`invalid_input` with one
   attempt, and the worker and its pool process must live through all of them.

Prints one JSON line per figure.

    .venv/bin/python bench/fuzz_images.py [--cases 200000] [--seed 7] [--worker-sample 40]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from producer import images
from producer.client import Client
from producer.contract import JobState
from producer.demo import TINY_PARAMS, wait_for_worker
from producer.local_redis import LocalRedis
from tests.odd_images import mutants
from worker.errors import JobFailed
from worker.inputs import open_image

LIMIT = 40_000_000  # SVDQ_MAX_IMAGE_PIXELS's default


def figure(name: str, value: float, **extra: object) -> None:
    print(
        json.dumps({"bench": "fuzz_images", "machine": platform.node(), "figure": name, "value": value, **extra}),
        flush=True,
    )


def in_process(cases: int, seed: int, workdir: Path) -> tuple[list[bytes], list[bytes]]:
    """Both checks over every mutant; returns samples of refused and accepted mutants for the worker."""
    tally: Counter[str] = Counter()
    refused: list[bytes] = []
    accepted: list[bytes] = []
    started = time.perf_counter()
    for i, (name, data) in enumerate(mutants(seed, cases)):
        for side, check in (("submit", _submit_check), ("worker", _worker_check)):
            try:
                answer = check(data)
            except Exception as exc:  # an escape: exactly what this bench looks for
                tally[f"{side}_escaped"] += 1
                (workdir / f"escape-{side}-{i}-{name}.bin").write_bytes(data)
                print(f"escape ({side}, case {i}, from {name}): {type(exc).__name__}: {exc}", file=sys.stderr)
                continue
            tally[f"{side}_{answer}"] += 1
            kept = accepted if answer == "accepted" else refused
            if side == "submit" and len(kept) < 1_000:  # enough to sample from, without holding every case
                kept.append(data)
    seconds = time.perf_counter() - started
    figure("cases_per_second", round(cases / seconds), cases=cases, seed=seed)
    for side in ("submit", "worker"):
        figure(f"{side}_escapes", tally[f"{side}_escaped"], cases=cases, seed=seed)
        figure(f"{side}_refused", tally[f"{side}_refused"], accepted=tally[f"{side}_accepted"], cases=cases, seed=seed)
    return refused, accepted


def _submit_check(data: bytes) -> str:
    try:
        images.inspect(data, LIMIT)
    except images.BadImage:
        return "refused"
    return "accepted"


def _worker_check(data: bytes) -> str:
    try:
        open_image(data, LIMIT)
    except JobFailed as exc:
        if exc.code.value != "invalid_input":
            raise
        return "refused"
    return "accepted"


def through_worker(refused: list[bytes], accepted: list[bytes], sample: int, workdir: Path) -> None:
    half = sample // 2
    chosen = refused[:: max(1, len(refused) // half)][:half] + accepted[:: max(1, len(accepted) // half)][:half]
    server = LocalRedis(workdir / "redis")
    url = server.start()
    store = (workdir / "store").as_uri()
    model = workdir / "tiny-model"
    subprocess.run([sys.executable, "-m", "worker.tiny_model", str(model)], check=True, stdout=subprocess.DEVNULL)
    env = {"SVDQ_REDIS_URL": url, "SVDQ_STORAGE_URL": store, "SVDQ_MODEL": str(model), "SVDQ_QUEUE": "fuzz"}
    log_path = workdir / "worker.log"
    worker = None
    try:
        with log_path.open("wb") as log:
            worker = subprocess.Popen(
                [sys.executable, "-m", "worker", "--hostname=fuzz@%h"],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**_base_env(), **env},
            )
        with Client.from_env(redis_url=url, storage_url=store, queue="fuzz") as client:
            wait_for_worker(client, worker, log_path)
            started = time.perf_counter()
            jobs = []
            for i, data in enumerate(chosen):
                ref = client.store.put(f"fuzz/{i}.img", data, "application/octet-stream").ref
                jobs.append(client.submit(ref, **TINY_PARAMS))
            ends: Counter[str] = Counter()
            bad_attempts = 0
            for job in jobs:
                record = job.wait(timeout=600)
                code = record.error.code if record.error else ""
                ends[f"{record.state.value}{'_' + code if code else ''}"] += 1
                bad_attempts += record.state is JobState.FAILED and record.attempts != 1
        text = log_path.read_text(errors="replace")
        expected = ends["succeeded"] + ends["failed_invalid_input"]
        figure("worker_jobs", len(jobs), seconds=round(time.perf_counter() - started, 1), **dict(sorted(ends.items())))
        figure("worker_jobs_ending_otherwise", len(jobs) - expected)  # internal, retried, lost...
        figure("worker_failures_after_more_than_one_attempt", bad_attempts)
        figure("worker_alive", int(worker.poll() is None))
        figure("pool_process_exits", text.count("exited with"))
    finally:
        if worker is not None and worker.poll() is None:
            worker.terminate()
            worker.wait(timeout=60)
        server.stop()


def _base_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("SVDQ_")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=200_000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--worker-sample", type=int, default=40, help="0 skips the worker")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="svdq-fuzz-"))
    workdir.mkdir(parents=True, exist_ok=True)
    warnings.filterwarnings("ignore", module="PIL")  # as in production: Pillow's warnings are not refusals
    refused, accepted = in_process(args.cases, args.seed, workdir)
    if args.worker_sample:
        through_worker(refused, accepted, args.worker_sample, workdir)


if __name__ == "__main__":
    main()
