"""`svdq gateway` under load: POST /v1/jobs latency and rate, and many open event streams on one process.

A real redis-server and one `svdq gateway` process (uvicorn, one worker) started here, a file:// store (or with
`--store s3`, moto's S3 server over HTTP, on the same cores), no worker (the jobs stay queued). `--clients`
threads post a small base64 PNG over keep-alive connections; then `--streams` event streams are opened on one
process and held while its memory is read. The clients run on the same 2 cores as the gateway and Redis, so the
figures are a floor.

    .venv/bin/python bench/gateway.py [--posts 3000] [--clients 16] [--streams 1000] [--store file|s3] [--distinct]
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import boto3
from PIL import Image

from bench.s3server import S3Server
from producer.local_redis import LocalRedis, free_port

KEY = "bench-key-0123456789"


def figure(name: str, value: float, **extra: object) -> None:
    print(
        json.dumps({"bench": "gateway", "machine": platform.node(), "figure": name, "value": round(value, 3), **extra}),
        flush=True,
    )


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def post_many(port: int, bodies: list[bytes], latencies: list[float], errors: list[int]) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    for body in bodies:
        started = time.perf_counter()
        connection.request("POST", "/v1/jobs", body=body, headers=headers)
        response = connection.getresponse()
        response.read()
        latencies.append(time.perf_counter() - started)
        if response.status != 201:
            errors.append(response.status)
    connection.close()


def open_stream(port: int, job_id: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(f"GET /v1/jobs/{job_id}/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n\r\n".encode())
    return sock


def post_body(n: int) -> bytes:
    """A POST's JSON: a 64x64 PNG, different for each `n`."""
    buf = io.BytesIO()
    image = Image.new("RGB", (64, 64), (20, 120, 220))
    image.putpixel((n % 64, n // 64 % 64), (n % 256, n // 256 % 256, n // 65536 % 256))
    image.save(buf, format="PNG")
    return json.dumps({"image": base64.b64encode(buf.getvalue()).decode(), "num_frames": 14}).encode()


def wait_for(gateway: subprocess.Popen[bytes], port: int) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            http.client.HTTPConnection("127.0.0.1", port, timeout=2).request("GET", "/healthz")
            return
        except OSError:
            assert time.monotonic() < deadline and gateway.poll() is None, "the gateway did not start"
            time.sleep(0.2)


def s3_store(s3: S3Server) -> dict[str, str]:
    """The gateway's settings for a bucket on `s3`, created here."""
    keys = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}
    boto3.client(
        "s3",
        endpoint_url=s3.endpoint,
        aws_access_key_id="bench",
        aws_secret_access_key="bench",
        region_name="us-east-1",
    ).create_bucket(Bucket="bench")
    return {"SVDQ_STORAGE_URL": "s3://bench/svdq", "SVDQ_S3_ENDPOINT_URL": s3.endpoint, **keys}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--posts", type=int, default=3000)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--store", choices=("file", "s3"), default="file")
    parser.add_argument("--distinct", action="store_true", help="a different image in every POST")
    args = parser.parse_args()
    body = post_body(0)
    # --distinct: every POST a new image (stored, where the same image is only looked for), as real traffic is
    each = args.posts // args.clients
    bodies = [
        [post_body(1 + c * each + n) if args.distinct else body for n in range(each)] for c in range(args.clients)
    ]
    with tempfile.TemporaryDirectory() as tmp:
        server = LocalRedis(Path(tmp) / "redis")
        server.start()
        s3 = S3Server(Path(tmp)) if args.store == "s3" else None
        port = free_port()
        env = {
            **os.environ,
            "SVDQ_REDIS_URL": server.url,
            "SVDQ_STORAGE_URL": f"file://{tmp}/store",
            "SVDQ_API_KEYS": f"bench:{KEY}",
        }
        if s3 is not None:
            env |= s3_store(s3)
        gateway = subprocess.Popen(
            [str(Path(sys.executable).with_name("svdq")), "gateway", "--port", str(port)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_for(gateway, port)
            post_many(port, [body] * 50, [], [])  # warm: the image stored, connections opened
            latencies: list[float] = []
            errors: list[int] = []
            threads = [threading.Thread(target=post_many, args=(port, mine, latencies, errors)) for mine in bodies]
            started = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            seconds = time.perf_counter() - started
            assert not errors, errors[:5]
            cuts = statistics.quantiles(latencies, n=100)
            figure("posts", len(latencies), clients=args.clients, store=args.store, distinct=args.distinct)
            figure("posts_per_second", len(latencies) / seconds, store=args.store, goal=">= 1000")
            figure("post_p50_ms", cuts[49] * 1000)
            figure("post_p99_ms", cuts[98] * 1000, store=args.store, goal="<= 50")

            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            connection.request("POST", "/v1/jobs", body=body, headers={"Authorization": f"Bearer {KEY}"})
            job_id = json.loads(connection.getresponse().read())["id"]
            idle_rss = rss_mib(gateway.pid)
            streams: list[socket.socket] = []
            try:
                for _ in range(args.streams):
                    streams.append(open_stream(port, job_id))
                for sock in streams:  # each has its first event: the stream is open and subscribed
                    seen = b""
                    while b"event: queued" not in seen:
                        chunk = sock.recv(65536)
                        assert chunk, f"stream {len(streams)} closed early after {seen[:300]!r}"
                        seen += chunk
                time.sleep(2)
                figure("open_streams", len(streams))
                figure("rss_idle_mib", idle_rss)
                figure("rss_with_streams_mib", rss_mib(gateway.pid))
            finally:
                for sock in streams:
                    sock.close()
        finally:
            gateway.terminate()
            try:
                gateway.wait(timeout=30)
            except subprocess.TimeoutExpired:
                gateway.kill()
            if s3 is not None:
                s3.stop()
            server.stop()


if __name__ == "__main__":
    main()
