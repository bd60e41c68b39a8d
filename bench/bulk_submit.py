"""Submitting many jobs: `Client.submit_many` (pipelined) against a loop of `Client.submit`, same run.

A real redis-server (started here on a free port) and a store holding the input image already, so the figure is
the submission path itself: checks, records, messages. No worker: the jobs stay queued. `--store s3` (the
default: what a fleet uses) is an S3 server (moto, over HTTP); `--store file` the one-machine file:// store,
whose reference check also resolves the path on disk (symlinks).
`--manifest-rows N` also runs `svdq bulk` on an N-row JSONL manifest (`--no-wait`) in a child process and
reports its peak RSS. `--redis-rtt-ms X` puts the redis-server X ms of round trip away (bench/latency_proxy.py),
as a Redis on another host is: each submit of the loop waits for it, a batch of submit_many once.

    .venv/bin/python bench/bulk_submit.py [--jobs 10000] [--store s3|file] [--manifest-rows 100000] [--redis-rtt-ms 1]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import boto3
from PIL import Image

from bench.latency_proxy import LatencyProxy
from bench.s3server import S3Server
from producer.client import Client, Submission
from producer.local_redis import LocalRedis

PARAMS = {"num_frames": 14, "num_inference_steps": 25}


def figure(name: str, value: float, **extra: object) -> None:
    print(
        json.dumps(
            {"bench": "bulk_submit", "machine": platform.node(), "figure": name, "value": round(value, 3), **extra}
        ),
        flush=True,
    )


def loop(client: Client, image: str, jobs: int) -> float:
    started = time.perf_counter()
    for n in range(jobs):
        client.submit(image, idempotency_key=f"loop-{n}", **PARAMS)
    return jobs / (time.perf_counter() - started)


def pipelined(client: Client, image: str, jobs: int) -> float:
    started = time.perf_counter()
    submissions = (Submission(image, {"seed": n}, f"many-{n}") for n in range(jobs))
    done = sum(1 for s in client.submit_many(submissions, **PARAMS) if s.job is not None and not s.existed)
    assert done == jobs, done
    return jobs / (time.perf_counter() - started)


def manifest_rss(workdir: Path, env: dict[str, str], rows: int) -> None:
    manifest = workdir / "rows.jsonl"
    with manifest.open("w") as f:
        for n in range(rows):
            f.write(json.dumps({"image": "in.png", "seed": n, "output": f"v/{n}"}) + "\n")
    Image.new("RGB", (64, 64), (10, 20, 30)).save(workdir / "in.png")
    started = time.perf_counter()
    run = subprocess.run(
        [
            str(Path(sys.executable).with_name("svdq")),
            "bulk",
            str(manifest),
            "--out",
            str(workdir / "out"),
            "--no-wait",
            "--json",
            *map(str, ["--frames", 14]),
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    seconds = time.perf_counter() - started
    assert run.returncode == 0, run.stderr[-2000:]
    summary = json.loads(run.stdout)
    assert summary["jobs_submitted"] == rows, summary
    peak_bytes = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # Linux reports KiB
    figure("manifest_rows", rows)
    figure("manifest_seconds", seconds)
    figure("manifest_peak_rss_mb", peak_bytes / 1e6, goal="<= 300")
    figure("manifest_peak_rss_mib", peak_bytes / 2**20)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--manifest-rows", type=int, default=0)
    parser.add_argument("--store", choices=("s3", "file"), default="s3")
    parser.add_argument("--redis-rtt-ms", type=float, default=0.0, help="Redis this far away (default: loopback)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        server = LocalRedis(workdir / "redis")
        server.start()
        s3 = S3Server(workdir) if args.store == "s3" else None
        proxy = LatencyProxy(server.port, args.redis_rtt_ms / 1000) if args.redis_rtt_ms else None
        redis_url = f"redis://127.0.0.1:{proxy.port}/0" if proxy else server.url
        where = {"store": args.store, "redis_rtt_ms": args.redis_rtt_ms}
        try:
            env = {**os.environ, "SVDQ_REDIS_URL": redis_url, **store_env(workdir, s3)}
            image = stored_image(workdir, env, s3)
            with Client.from_env(redis_url=redis_url, storage_url=env["SVDQ_STORAGE_URL"]) as client:
                client.submit(image, idempotency_key="warm-up", **PARAMS)
                loop_rate = loop(client, image, args.jobs)
                many_rate = pipelined(client, image, args.jobs)
            figure("jobs", args.jobs, **where)
            figure("loop_jobs_per_second", loop_rate, **where)
            figure("submit_many_jobs_per_second", many_rate, **where)
            figure("speedup", many_rate / loop_rate, **where, goal=">= 10")
            if args.manifest_rows:
                manifest_rss(workdir, env, args.manifest_rows)
        finally:
            if proxy is not None:
                proxy.close()
            if s3 is not None:
                s3.stop()
            server.stop()


def store_env(workdir: Path, s3: S3Server | None) -> dict[str, str]:
    if s3 is None:
        (workdir / "store").mkdir()
        return {"SVDQ_STORAGE_URL": f"file://{workdir / 'store'}"}
    keys = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}
    return {"SVDQ_STORAGE_URL": "s3://bench/svdq", "SVDQ_S3_ENDPOINT_URL": s3.endpoint, **keys}


def stored_image(workdir: Path, env: dict[str, str], s3: S3Server | None) -> str:
    """The input image, put in the store: its reference."""
    data = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 20, 30)).save(data, format="PNG")
    if s3 is None:
        (workdir / "store" / "in.png").write_bytes(data.getvalue())
        return f"file://{workdir / 'store'}/in.png"
    os.environ.update(env)  # this process's client reads the keys and the endpoint from the environment
    boto3.client("s3", endpoint_url=s3.endpoint).create_bucket(Bucket="bench")
    boto3.client("s3", endpoint_url=s3.endpoint).put_object(Bucket="bench", Key="svdq/in.png", Body=data.getvalue())
    return "s3://bench/svdq/in.png"


if __name__ == "__main__":
    main()
