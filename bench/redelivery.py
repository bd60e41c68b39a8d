"""How long a killed worker's unacknowledged message takes to come back, kombu's defaults vs svdq's tuning.

Two real Celery workers on a real redis-server, with a task that only sleeps (no model: this measures the
broker): worker A takes the message and is killed with SIGKILL; worker B, idle on the same queue, gets the
message when kombu's Redis transport restores it. Prints one JSON line per configuration and their ratio.

    .venv/bin/python bench/redelivery.py [--visibility-timeout 10]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis
from celery import Celery

from producer.local_redis import LocalRedis
from worker.app import broker_options
from worker.settings import WorkerSettings

QUEUE = "redelivery"


def make_app(url: str, options: dict[str, object]) -> Celery:
    app = Celery("redelivery", broker=url)
    app.conf.update(
        task_acks_late=True,
        worker_prefetch_multiplier=1,
        broker_transport_options=options,
        task_default_queue=QUEUE,
        worker_hijack_root_logger=False,
    )

    @app.task(name="bench.hold")
    def hold(seconds: float) -> None:
        client = redis.Redis.from_url(url)
        client.rpush("bench:received", f"{os.getpid()} {time.time()}")
        time.sleep(seconds)

    return app


def worker(url: str, options: dict[str, object], name: str) -> subprocess.Popen[bytes]:
    code = (
        "import json, sys; sys.path.insert(0, sys.argv[1]); from bench.redelivery import make_app; "
        "make_app(sys.argv[2], json.loads(sys.argv[3])).worker_main(['worker', '--pool=solo', '--loglevel=WARNING', "
        f"'--hostname={name}@bench', '--queues={QUEUE}'])"
    )
    root = str(Path(__file__).resolve().parents[1])
    return subprocess.Popen(
        [sys.executable, "-c", code, root, url, json.dumps(options)],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def measure(options: dict[str, object], label: str, workdir: Path) -> dict[str, object]:
    server = LocalRedis(workdir / label)
    url = server.start()
    client = redis.Redis.from_url(url)
    try:
        first = worker(url, options, "a")
        time.sleep(4)
        make_app(url, options).send_task("bench.hold", args=[600], queue=QUEUE)
        while client.llen("bench:received") < 1:
            time.sleep(0.05)
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
        killed = time.time()
        second = worker(url, options, "b")
        while client.llen("bench:received") < 2:
            time.sleep(0.2)
        back = float(client.lindex("bench:received", 1).split()[1])
        os.killpg(second.pid, signal.SIGKILL)
        second.wait()
    finally:
        server.stop()
    return {
        "figure": "redelivery_after_kill_s",
        "config": label,
        "seconds": round(back - killed, 1),
        "visibility_timeout": options["visibility_timeout"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--visibility-timeout", type=int, default=10)
    args = parser.parse_args()
    vt = args.visibility_timeout
    svdq = {k: v for k, v in broker_options(WorkerSettings(visibility_timeout=vt)).items() if k != "master_name"}
    with tempfile.TemporaryDirectory() as tmp:
        stock = measure({"visibility_timeout": vt}, "kombu_defaults", Path(tmp))
        print(json.dumps(stock), flush=True)
        ours = measure(svdq, "svdq", Path(tmp))
        print(json.dumps(ours), flush=True)
    ratio = round(float(stock["seconds"]) / max(float(ours["seconds"]), 0.1), 2)
    print(json.dumps({"figure": "redelivery_speedup", "ratio": ratio, "visibility_timeout": vt}))


if __name__ == "__main__":
    main()
