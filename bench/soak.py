"""A chaos soak: real workers, a real redis-server and a real S3 server, with faults that overlap.

1. Start a redis-server with its append-only file on, an S3 server (moto) behind a proxy that can cut it
   off (tests/integration/faults.py), and `--workers` real `svdq worker` processes with the tiny model.
2. Submit `--jobs` jobs through the client over the first 70% of `--minutes`: mixed sizes and priorities,
   every one with an idempotency key (a submit that fails during an outage is retried with it, as a web
   backend would); a share submitted again with the same key, a share canceled while queued or running, a
   share whose image the worker finds unreadable (by reference, so only the worker sees it).
3. Meanwhile, at seeded random times (each kind at least once): SIGKILL a whole worker and restart it;
   SIGKILL a pool process; SIGTERM a worker (SVDQ_STOP_GRACE=3) and restart it; restart redis-server; cut
   storage for 10-30 s. The faults overlap: a storage cut runs on while the others happen.
4. Wait for every job to end, then check what a user would see (records, the event stream, the bucket) and
   what must not be left behind (leases, spool files, queue messages). Prints one JSON line per check
   (`"ok"`) and per figure; exits 1 when a check fails.

Recovery time, per fault: from the fault until every job that was running where it struck (on that worker;
anywhere, for Redis and storage) has ended or started a new attempt. A wasted render is GPU time spent on an
attempt that did not give its job's result (a kill, a hand-back, a retry): a figure, not a failure. A job
whose render completed twice is a failure unless a worker fault struck that job during the attempt that
rendered first.

    .venv/bin/python bench/soak.py [--jobs 300] [--workers 3] [--minutes 20] [--seed 1]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import boto3
import imageio_ffmpeg
import redis
from kombu.exceptions import OperationalError
from PIL import Image

from bench.s3server import S3Server
from producer import keys
from producer.client import Client, NotCancelable
from producer.contract import JobState, priority_queues
from producer.local_redis import LocalRedis
from producer.storage import StorageUnavailable
from tests.integration.faults import CuttableProxy
from tests.odd_images import corpus

SVDQ = str(Path(sys.executable).with_name("svdq"))
QUEUE = "soak"
BUCKET, PREFIX = "soak", "renders"
SIZES = [  # 64x64 renders from under a second to several on a CPU: some are struck mid-render
    {"num_frames": 4, "num_inference_steps": 2},
    {"num_frames": 4, "num_inference_steps": 6},
    {"num_frames": 6, "num_inference_steps": 10},
    {"num_frames": 8, "num_inference_steps": 16},
]
FAULTS = ("kill_worker", "kill_pool", "term_worker", "restart_redis", "cut_storage")
WORKER_FAULTS = {"kill_worker", "kill_pool", "term_worker"}
LEASE_TTL, VISIBILITY_TIMEOUT, STOP_GRACE = 2, 8, 3
FINAL = ("succeeded", "failed", "canceled")


def emit(kind: str, name: str, value: Any, **extra: Any) -> None:
    line = {"bench": "soak", "machine": platform.node(), kind: name, "value": value, **extra}
    print(json.dumps(line), flush=True)


def epoch(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 2)


@dataclass
class Fault:
    kind: str
    at: float  # seconds into the run it is due
    target: str | None = None
    started: float = 0.0
    ended: float = 0.0
    victims: list[str] = field(default_factory=list)


@dataclass
class Planned:
    key: str
    image: bytes | str  # bytes, or an s3:// reference to an image only the worker reads
    params: dict[str, Any]
    priority: str
    bad: bool = False
    resubmit: bool = False
    cancel: str | None = None  # "queued" or "running"


class Fleet:
    """The services and workers under test, with the handles the faults need."""

    def __init__(self, workdir: Path, model: Path, workers: int, max_attempts: int):
        self.workdir = workdir
        self.redis = LocalRedis(workdir / "redis", appendonly=True)
        redis_url = self.redis.start()
        self.moto = S3Server(workdir)
        self.direct_s3 = self.moto.endpoint
        self.proxy = CuttableProxy(self.moto.port)
        self.env = {
            **os.environ,
            "SVDQ_REDIS_URL": redis_url,
            "SVDQ_STORAGE_URL": f"s3://{BUCKET}/{PREFIX}",
            "SVDQ_S3_ENDPOINT_URL": self.proxy.url,
            "SVDQ_MODEL": str(model),
            "SVDQ_QUEUE": QUEUE,
            "SVDQ_COMPILE": "0",
            "SVDQ_LEASE_TTL": str(LEASE_TTL),
            "SVDQ_VISIBILITY_TIMEOUT": str(VISIBILITY_TIMEOUT),
            "SVDQ_STOP_GRACE": str(STOP_GRACE),
            "SVDQ_MAX_ATTEMPTS": str(max_attempts),
            # One thread each (on a CPU): K workers on a small machine otherwise fight over its cores.
            **({} if "OMP_NUM_THREADS" in os.environ else {"OMP_NUM_THREADS": "1"}),
            "AWS_ACCESS_KEY_ID": "soak-key",
            "AWS_SECRET_ACCESS_KEY": "soak-secret",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        os.environ.update(self.env)  # this process's client uses the same settings as the workers
        self.s3 = boto3.client("s3", endpoint_url=self.direct_s3)
        self.s3.create_bucket(Bucket=BUCKET)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.names = [f"soak{i}@soak" for i in range(workers)]
        for name in self.names:
            self.start_worker(name)

    def spool(self, name: str) -> Path:
        return self.workdir / "spool" / name.split("@")[0]

    def start_worker(self, name: str) -> None:
        """Start (or restart, as a supervisor would) the worker `name`, with its own spool kept across starts."""
        env = {**self.env, "SVDQ_SPOOL_DIR": str(self.spool(name))}
        log = (self.workdir / f"{name.split('@')[0]}.log").open("ab")
        self.procs[name] = subprocess.Popen(
            [SVDQ, "worker", f"--hostname={name}"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def pool_processes(self, name: str) -> list[int]:
        pid = self.procs[name].pid
        with contextlib.suppress(OSError):
            return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
        return []

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(timeout=STOP_GRACE + 30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def close(self) -> None:
        self.stop()
        self.proxy.close()
        self.moto.stop()
        self.redis.stop()


class Events:
    """Every job event from the stream, read as it grows (the stream is capped; reading keeps up with it)."""

    def __init__(self, redis_url: str):
        self.redis = redis.Redis.from_url(redis_url, socket_timeout=5)
        self.by_job: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self._last = "0"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                answer = self.redis.xread({keys.EVENTS_STREAM: self._last}, count=1000, block=300)
            except redis.RedisError:
                time.sleep(0.3)  # Redis is restarting: the stream is in its append-only file
                continue
            for _, entries in answer or []:
                for entry_id, fields in entries:
                    self._last = entry_id.decode()
                    event = json.loads(fields[b"event"])
                    event["t"] = epoch(event["at"])
                    self.by_job[event["id"]].append(event)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


class Soak:
    def __init__(self, args: argparse.Namespace, fleet: Fleet):
        self.args, self.fleet = args, fleet
        self.random = random.Random(args.seed)
        self.client = Client.from_env()
        self.events = Events(fleet.env["SVDQ_REDIS_URL"])
        self.jobs: dict[str, Planned] = {}  # job id -> what was asked for
        self.canceled: set[str] = set()  # ids whose cancel was accepted
        self.faults: list[Fault] = []
        self.submit_retries = 0
        self.resubmit_mismatches: list[str] = []
        self.fault_locks = {name: threading.Lock() for name in fleet.names}
        self.t0 = time.time()

    # -- the work ----------------------------------------------------------------------------------------

    def plan(self) -> list[Planned]:
        bad_images = [data for data, renders in corpus().values() if not renders and len(data) < 100_000]
        planned = []
        for i in range(self.args.jobs):
            r = self.random
            params = {"width": 64, "height": 64, "fps": 8, "seed": i, **r.choice(SIZES)}
            job = Planned(f"soak-{self.args.seed}-{i}", b"", params, r.choice(["high", "normal", "normal", "low"]))
            roll = r.random()
            if roll < 0.1:
                job.bad = True
                key = f"{PREFIX}/inputs/bad-{i}"
                self.fleet.s3.put_object(Bucket=BUCKET, Key=key, Body=r.choice(bad_images))
                job.image = f"s3://{BUCKET}/{key}"
            else:
                job.image = self._image(r)
                job.resubmit = roll > 0.85
                job.cancel = "queued" if 0.1 <= roll < 0.15 else "running" if 0.15 <= roll < 0.22 else None
            planned.append(job)
        return planned

    @staticmethod
    def _image(r: random.Random) -> bytes:
        img = Image.new("RGB", (80, 64), tuple(r.randrange(256) for _ in range(3)))
        for _ in range(20):
            x, y = r.randrange(80), r.randrange(64)
            img.putpixel((x, y), tuple(r.randrange(256) for _ in range(3)))
        buffer = io.BytesIO()
        img.save(buffer, format="PNG")
        return buffer.getvalue()

    def submit(self, job: Planned) -> str:
        """Submit until the queue takes it: an outage costs retries, never a job (the key makes them safe)."""
        while True:
            try:
                return self.client.submit(job.image, priority=job.priority, idempotency_key=job.key, **job.params).id
            except (redis.RedisError, StorageUnavailable, OperationalError, OSError):
                self.submit_retries += 1
                time.sleep(1.0)

    def producer(self, planned: list[Planned]) -> None:
        window = self.args.minutes * 60 * 0.7
        for i, job in enumerate(planned):
            self._sleep_until(window * i / max(1, len(planned)))
            job_id = self.submit(job)
            self.jobs[job_id] = job
            if job.resubmit and (again := self.submit(job)) != job_id:
                self.resubmit_mismatches.append(f"{job.key}: {job_id} then {again}")
            if job.cancel == "queued":
                self._cancel(job_id)
            elif job.cancel == "running":
                threading.Thread(target=self._cancel_when_running, args=(job_id,), daemon=True).start()

    def _cancel(self, job_id: str) -> None:
        for _ in range(30):
            try:
                self.client.job(job_id).cancel()
                self.canceled.add(job_id)
                return
            except NotCancelable:
                return
            except redis.RedisError:
                time.sleep(1.0)

    def _cancel_when_running(self, job_id: str) -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            with contextlib.suppress(redis.RedisError):
                record = self.client.job(job_id).status()
                if record.state.is_terminal():
                    return
                if record.state is JobState.STARTED and (record.step or 0) >= 1:
                    return self._cancel(job_id)
            time.sleep(0.2)

    # -- the faults ---------------------------------------------------------------------------------------

    def schedule(self) -> list[Fault]:
        window = self.args.minutes * 60
        count = max(len(FAULTS), round(self.args.minutes * 2))
        kinds = list(FAULTS) + [self.random.choice(FAULTS) for _ in range(count - len(FAULTS))]
        self.random.shuffle(kinds)
        times = sorted(self.random.uniform(0.1 * window, 0.8 * window) for _ in kinds)
        return [Fault(kind, at) for kind, at in zip(kinds, times, strict=True)]

    def chaos(self, schedule: list[Fault]) -> None:
        threads = []
        for fault in schedule:
            self._sleep_until(fault.at)
            thread = threading.Thread(target=self._strike, args=(fault,), daemon=True)
            thread.start()
            threads.append(thread)
        for thread in threads:
            thread.join()

    def _running(self) -> dict[str, str]:
        """Job id -> worker, for the jobs running now (none known while Redis is away)."""
        try:
            records = self.client.records.get_many(list(self.jobs))
        except redis.RedisError:
            return {}
        return {i: r.worker or "" for i, r in records.items() if r and r.state is JobState.STARTED}

    def _strike(self, fault: Fault) -> None:
        fleet = self.fleet
        if fault.kind in WORKER_FAULTS:
            self._strike_worker(fault)
        else:
            fault.victims = list(self._running())
            fault.started = time.time()
            if fault.kind == "restart_redis":
                fleet.redis.stop()  # SIGTERM: Redis writes its append-only file and exits
                time.sleep(1.0)
                fleet.redis.start(port=fleet.redis.port)
            else:
                fleet.proxy.down()
                time.sleep(self.random.uniform(10, 30))
                fleet.proxy.up()
            fault.ended = time.time()
        if fault.started:
            self.faults.append(fault)

    def _strike_worker(self, fault: Fault) -> None:
        """On a worker that is rendering if one is, else any; one fault at a time per worker (waiting up to a
        minute for one to be free: a fault that never struck fails `each_fault_struck`)."""
        deadline = time.monotonic() + 60
        aim_until = time.monotonic() + 20  # for up to 20 s, only a worker with a job: a fault on an idle one
        while True:  # measures no recovery
            names = [n for n in self.fleet.names if not self.fault_locks[n].locked()]
            busy = [n for n in names if n in self._running().values()]
            pool = busy or (names if time.monotonic() > aim_until else [])
            if pool and self.fault_locks[target := self.random.choice(pool)].acquire(blocking=False):
                break
            if time.monotonic() > deadline:
                return
            time.sleep(0.5)
        try:
            fault.target = target
            while fault.kind == "kill_pool" and not self.fleet.pool_processes(target) and time.monotonic() < deadline:
                time.sleep(0.5)  # restarted moments ago: its pool process is on its way
            fault.victims = [i for i, w in self._running().items() if w == target]  # as it strikes
            fault.started = time.time()
            self._worker_fault(fault)
            fault.ended = time.time()
        finally:
            self.fault_locks[target].release()

    def _worker_fault(self, fault: Fault) -> None:
        fleet, name = self.fleet, fault.target or ""
        proc = fleet.procs[name]
        if fault.kind == "kill_pool":
            children = fleet.pool_processes(name)
            if children:
                os.kill(children[0], signal.SIGKILL)
            else:
                fault.kind = "kill_worker"  # still starting: no pool yet, so the whole worker goes
        if fault.kind == "kill_worker":
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            fleet.start_worker(name)
        elif fault.kind == "term_worker":
            proc.terminate()
            try:
                proc.wait(timeout=STOP_GRACE + 60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            fleet.start_worker(name)

    def _sleep_until(self, offset: float) -> None:
        time.sleep(max(0.0, self.t0 + offset - time.time()))

    # -- the end -------------------------------------------------------------------------------------------

    def wait_for_the_end(self, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(redis.RedisError):
                records = self.client.records.get_many(list(self.jobs))
                if all(r is not None and r.state.is_terminal() for r in records.values()):
                    return records
                if time.monotonic() > deadline:
                    return records
            time.sleep(1.0)

    def wait_for_quiet(self, timeout: float) -> tuple[int, int]:
        """Queued and unacknowledged messages, once both are 0 or `timeout` passes: a killed worker's message
        comes back after the visibility timeout and is then dropped by whichever worker gets it."""
        deadline = time.monotonic() + timeout
        r = self.client.redis
        while True:
            queued = sum(r.llen(q) for q in priority_queues(QUEUE))
            unacked = r.hlen("unacked")
            if (queued == 0 and unacked == 0) or time.monotonic() > deadline:
                return queued, unacked
            time.sleep(1.0)


def attempts_of(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A job's attempts from its events: each starts at `started`/fetch and ends at the next queued or
    terminal event; `rendered` is when its video was complete (stage upload or upload_pending)."""
    attempts: list[dict[str, Any]] = []
    for event in events:
        if event["state"] == "started" and event.get("stage") == "fetch":
            attempts.append({"start": event["t"], "rendered": None, "end": None, "how": None})
        elif attempts and attempts[-1]["end"] is None:
            current = attempts[-1]
            if event["state"] == "started" and event.get("stage") in ("upload", "upload_pending"):
                current["rendered"] = current["rendered"] or event["t"]
            elif event["state"] != "started":
                current["end"], current["how"] = event["t"], event.get("stage") or event["state"]
    return attempts


def check(name: str, failures: list[str], **figures: Any) -> bool:
    emit("check", name, len(failures), ok=not failures, examples=failures[:5], **figures)
    return not failures


def videos(soak: Soak, records: dict[str, Any]) -> list[str]:
    """Each success has exactly one object under its id, the record's, decoding to the frames asked for."""
    s3, wrong = soak.fleet.s3, []
    for job_id, record in records.items():
        if record is None or record.state is not JobState.SUCCEEDED:
            continue
        listed = [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix=f"{PREFIX}/{job_id}/").get("Contents", [])]
        if record.result is None or listed != [record.result.key]:
            wrong.append(f"{job_id}: {listed}")
            continue
        path = soak.fleet.workdir / "probe.mp4"
        path.write_bytes(s3.get_object(Bucket=BUCKET, Key=listed[0])["Body"].read())
        frames, _ = imageio_ffmpeg.count_frames_and_secs(str(path))
        if frames != (asked := soak.jobs[job_id].params["num_frames"]):
            wrong.append(f"{job_id}: {frames} frames, asked for {asked}")
    return wrong


def bad_images(soak: Soak, records: dict[str, Any]) -> list[str]:
    """`invalid_input`, on the first attempt that read the image (an earlier one a fault ended is no fault of it)."""
    wrong = []
    for job_id, planned in soak.jobs.items():
        record = records[job_id]
        if not planned.bad or record is None:
            continue
        earlier = attempts_of(soak.events.by_job[job_id])[:-1]
        if record.state is not JobState.FAILED or not record.error or record.error.code != "invalid_input":
            wrong.append(f"{job_id}: {record.state.value} {record.error}")
        elif record.attempts != 1 + len(earlier) or any(a["how"] == "failed" for a in earlier):
            wrong.append(f"{job_id}: attempts {record.attempts}, earlier {earlier}")
    return wrong


def renders(soak: Soak, records: dict[str, Any]) -> tuple[list[str], float, float]:
    """Jobs whose render completed twice with no worker fault to force it, and the wasted and total render
    seconds (an attempt's render: from its start to its video complete, or to its end if it never was)."""
    worker_faults = [f for f in soak.faults if f.kind in WORKER_FAULTS]  # each with the jobs it struck
    twice, waste, total = [], 0.0, 0.0
    for job_id, record in records.items():
        attempts = attempts_of(soak.events.by_job[job_id])
        for n, attempt in enumerate(attempts):
            seconds = max(0.0, (attempt["rendered"] or attempt["end"] or attempt["start"]) - attempt["start"])
            total += seconds
            gave_the_result = n == len(attempts) - 1 and record is not None and record.state is JobState.SUCCEEDED
            if not gave_the_result and attempt["how"] != "canceled":
                waste += seconds
        rendered = [a for a in attempts if a["rendered"]]
        for first in rendered[:-1]:
            struck = [f for f in worker_faults if job_id in f.victims]
            # Excused when a worker fault struck this job during that attempt (a SIGTERM mid-render can end it
            # after the render: its video spooled in a storage cut and dropped when the grace ran out).
            if not any(first["start"] <= f.started <= (first["end"] or f.started) for f in struck):
                twice.append(f"{job_id}: rendered at {first['rendered']:.1f}, that attempt ended {first['how']}")
    return twice, waste, total


def judge(soak: Soak, records: dict[str, Any], quiet: tuple[int, int], leases: list[str], elapsed: float) -> bool:
    """The checks (each a JSON line, all must hold) and the figures."""
    fleet, args, events = soak.fleet, soak.args, soak.events.by_job
    ok = check("every_job_ends", [i for i, r in records.items() if r is None or not r.state.is_terminal()])
    states = Counter(r.state.value for r in records.values() if r)
    codes = Counter(r.error.code for r in records.values() if r and r.error and r.state is JobState.FAILED)
    emit("figure", "final_states", dict(states), error_codes=dict(codes))
    ok &= check("one_decodable_video_per_success", videos(soak, records), succeeded=states.get("succeeded", 0))
    over = [f"{i}: {r.attempts}" for i, r in records.items() if r and r.attempts > args.max_attempts]
    ok &= check("attempts_within_max", over, max_attempts=args.max_attempts)
    ok &= check("bad_images_fail_invalid_input", bad_images(soak, records), bad=sum(p.bad for p in soak.jobs.values()))
    succeeded = [i for i in soak.canceled if records[i] and records[i].state is JobState.SUCCEEDED]
    ok &= check("canceled_never_succeed", succeeded, canceled=len(soak.canceled))
    resubmitted = sum(p.resubmit for p in soak.jobs.values())
    ok &= check("same_key_same_job", soak.resubmit_mismatches, resubmitted=resubmitted)
    twice, waste, total = renders(soak, records)
    ok &= check("no_render_completed_twice_unforced", twice)
    ok &= check("no_lease_left", leases)
    ok &= check("no_spool_file_left", [str(p) for p in (fleet.workdir / "spool").rglob("*") if p.is_file()])
    ok &= check("no_queue_message_left", [f"queued {quiet[0]}, unacknowledged {quiet[1]}"] if any(quiet) else [])
    ok &= check("each_fault_struck", [k for k in FAULTS if not any(f.kind == k for f in soak.faults)])

    ended = [r for r in records.values() if r and r.finished_at]
    emit("figure", "jobs_per_minute", round(len(ended) / (elapsed / 60), 2), jobs=len(ended), seconds=round(elapsed))
    waits = []
    for job_id, record in records.items():
        starts = [e["t"] for e in events[job_id] if e["state"] == "started" and e.get("stage") == "fetch"]
        if record and record.created_at and starts:
            waits.append(starts[0] - epoch(record.created_at))
    emit("figure", "queue_wait_p50_s", percentile(waits, 0.5), p95=percentile(waits, 0.95), jobs=len(waits))
    emit("figure", "wasted_render_share", round(waste / total, 4) if total else 0.0, render_seconds=round(total, 1))
    emit("figure", "submit_retries", soak.submit_retries)
    for kind in FAULTS:
        struck = [f for f in soak.faults if f.kind == kind]
        answers = [recovery(f, events) for f in struck]
        times = [t for t, _ in answers if t is not None]
        p50, p95, never = percentile(times, 0.5), percentile(times, 0.95), sum(n for _, n in answers)
        emit("figure", f"recovery_{kind}_p50_s", p50, p95=p95, faults=len(struck), with_victims=len(times), never=never)
    return ok


def recovery(fault: Fault, events: dict[str, list[dict[str, Any]]]) -> tuple[float | None, int]:
    """Seconds from the fault until every job running where it struck has ended or started again (None: it
    struck none), and how many of them never did."""
    latest, never = None, 0
    for job_id in fault.victims:
        if any(e["t"] < fault.started and e["state"] in FINAL for e in events[job_id]):
            continue  # it ended as the fault was being aimed: not struck
        back = [e["t"] for e in events[job_id] if e["t"] >= fault.started and is_back(e)]
        if back:
            latest = max(latest or fault.started, back[0])
        else:
            never += 1
    return (None if latest is None else round(latest - fault.started, 2)), never


def is_back(event: dict[str, Any]) -> bool:
    return event["state"] in FINAL or (event["state"] == "started" and event.get("stage") == "fetch")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=300)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--minutes", type=float, default=20.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--drain-minutes", type=float, default=10.0, help="how long jobs may take to end after")
    parser.add_argument("--max-attempts", type=int, default=3, help="SVDQ_MAX_ATTEMPTS for the workers")
    parser.add_argument("--model", type=Path, help="an SVD model directory (default: the tiny one, built here)")
    parser.add_argument("--workdir", type=Path, help="keep services' data and worker logs here")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a timeout's SIGTERM still stops what it started

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="svdq-soak-"))
    workdir.mkdir(parents=True, exist_ok=True)
    model = args.model
    if model is None:
        model = workdir / "model"
        if not model.exists():
            subprocess.run([SVDQ, "make-tiny-model", str(model)], check=True, capture_output=True)
    fleet = Fleet(workdir, model, args.workers, args.max_attempts)
    try:
        soak = Soak(args, fleet)
        planned = soak.plan()
        schedule = soak.schedule()
        chaos = threading.Thread(target=soak.chaos, args=(schedule,), daemon=True)
        chaos.start()
        soak.producer(planned)
        chaos.join()
        records = soak.wait_for_the_end(timeout=args.drain_minutes * 60)
        elapsed = time.time() - soak.t0
        quiet = soak.wait_for_quiet(timeout=VISIBILITY_TIMEOUT * 3 + 20)
        leases = [k.decode() for k in soak.client.redis.scan_iter(keys.lease("*"))]  # while workers would renew them
        fleet.stop()  # warm shutdowns: nothing running, so nothing is handed back and spools are empty
        soak.events.close()
        for fault in soak.faults:
            emit(
                "fault",
                fault.kind,
                round(fault.ended - fault.started, 2),
                at=round(fault.started - soak.t0, 1),
                target=fault.target,
                victims=len(fault.victims),
            )
        ok = judge(soak, records, quiet, leases, elapsed)
        soak.client.close()
    finally:
        fleet.close()
    emit("figure", "workdir", str(workdir))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
