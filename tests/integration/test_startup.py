"""A worker whose model cannot load exits non-zero within seconds with the real error last, `svdq top` shows why,
and a job submitted meanwhile stays queued until a healthy worker takes it at once. A worker still loading its
model answers no ping and holds no job."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
import redis
from celery import Celery

from producer.client import Client
from producer.contract import JobState, priority_queues
from producer.fleet import FleetStore
from producer.local_redis import free_port
from tests.integration.conftest import SMALL, SVDQ, WorkerProcess
from worker.settings import WorkerSettings
from worker.startup import LOAD_FAILED, check_safetensors, check_unique_name

pytestmark = pytest.mark.integration


def damaged_copy(tiny_model: Path, tmp_path: Path, damage: Callable[[Path], Path]) -> tuple[Path, Path]:
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    return model, damage(model)


def truncate_unet(model: Path) -> Path:
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])  # an interrupted download
    return weights


def break_unet_config(model: Path) -> Path:
    config = model / "unet" / "config.json"
    config.write_text('{"_class_name": "UNetSpatioTemporalConditionModel", ')
    return config


def run_failing_worker(
    env: dict[str, str], model: Path, queue: str, hostname: str, *extra: str
) -> subprocess.CompletedProcess:
    started = time.monotonic()
    done = subprocess.run(
        [SVDQ, "worker", f"--hostname={hostname}", f"--queues={','.join(priority_queues(queue))}", *extra],
        # With metrics on: a restarted pool process used to fail on the port, hiding the real error.
        env={**env, "SVDQ_MODEL": str(model), "SVDQ_METRICS_PORT": str(free_port())},
        capture_output=True,
        text=True,
        timeout=120,
    )
    print(done.stdout[-3000:], done.stderr[-3000:])
    assert time.monotonic() - started < 60  # within seconds, not a crash loop
    return done


def top(env: dict[str, str]) -> dict:
    out = subprocess.run([SVDQ, "top", "--once", "--json"], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def top_entry(env: dict[str, str], hostname: str) -> dict:
    return next(w for w in top(env)["workers"] if w["name"] == hostname)


@pytest.mark.parametrize(
    ("damage", "expected", "pool"),
    [
        (truncate_unet, "truncated", "prefork"),  # caught before Celery starts, from the file's own header
        (break_unet_config, "config.json", "prefork"),  # raised by from_pretrained in the pool process
        (break_unet_config, "config.json", "solo"),  # raised in the main process itself
    ],
)
def test_a_worker_whose_model_cannot_load_exits_and_the_job_waits_for_a_healthy_one(
    svdq_env: dict[str, str],
    tiny_model: Path,
    tmp_path: Path,
    image_file: Path,
    start_worker: Callable[..., WorkerProcess],
    damage: Callable[[Path], Path],
    expected: str,
    pool: str,
) -> None:
    model, damaged = damaged_copy(tiny_model, tmp_path, damage)
    queue = f"test-{uuid.uuid4().hex[:8]}"
    with Client.from_env(queue=queue) as client:
        job = client.submit(image_file, **SMALL)
    hostname = f"broken{uuid.uuid4().hex[:6]}@test"

    done = run_failing_worker(svdq_env, model, queue, hostname, f"--pool={pool}")

    assert done.returncode == LOAD_FAILED
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("svdq worker: the model") and expected in last and str(damaged) in last
    output = done.stderr + done.stdout
    assert output.count("worker process loading") <= 1 and "Address already in use" not in output  # no reload
    with Client.from_env(queue=queue) as client:
        assert client.job(job.id).status().state is JobState.QUEUED
    shown = top_entry(svdq_env, hostname)
    assert shown["stage"] == "failed" and str(damaged) in shown["error"]

    started = time.monotonic()
    start_worker(queue=queue)
    with Client.from_env(queue=queue) as client:
        record = client.job(job.id).wait(timeout=60)
    assert record.state is JobState.SUCCEEDED, record
    assert time.monotonic() - started < 45  # at once: the message was back on its queue, no visibility timeout


def test_safetensors_check_names_what_is_wrong(tiny_model: Path, tmp_path: Path) -> None:
    weights = tiny_model / "unet" / "diffusion_pytorch_model.safetensors"
    assert check_safetensors(weights) is None
    short = tmp_path / "short.safetensors"
    short.write_bytes(weights.read_bytes()[:-1])
    assert "truncated" in (check_safetensors(short) or "")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\xff" * 64)
    assert "not a readable safetensors file" in (check_safetensors(garbage) or "")


def test_a_model_folder_that_is_not_one_is_named_as_the_user_gave_it(svdq_env: dict[str, str], tmp_path: Path) -> None:
    for argv, env, says in (
        (["--model", str(tmp_path / "nope")], {}, f"--model '{tmp_path / 'nope'}': no such folder"),
        ([], {"SVDQ_MODEL": str(tmp_path)}, f"SVDQ_MODEL='{tmp_path}' is not a diffusers pipeline folder"),
    ):
        done = subprocess.run(
            [SVDQ, "worker", *argv], env={**svdq_env, **env}, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == LOAD_FAILED and says in done.stderr, done.stderr


def test_a_hub_model_that_cannot_be_fetched_says_what_to_do(svdq_env: dict[str, str]) -> None:
    """No hub here (nor on many fleets' machines): the default model's error ends with the way out."""
    hostname = f"w{uuid.uuid4().hex[:6]}@test"
    done = run_failing_worker(
        {**svdq_env, "HF_HUB_OFFLINE": "1"}, Path("svdq-test/no-such-model"), f"q-{uuid.uuid4().hex[:6]}", hostname
    )
    assert done.returncode == LOAD_FAILED
    last = (done.stdout + done.stderr).strip().splitlines()[-1]
    assert "svdq-test/no-such-model" in last and "svdq make-tiny-model DIR" in last, last


def pool_process(main_pid: int, timeout: float = 30.0) -> int:
    """The worker's pool process, caught as soon as it is forked: it then loads the model for seconds. A fork
    of the main process, so its command line is the main process's (Celery's banner runs `uname` too)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        main = Path(f"/proc/{main_pid}/cmdline").read_bytes()  # `svdq worker` execs `python -m worker` first
        for stat in Path("/proc").glob("[0-9]*/stat"):
            with contextlib.suppress(OSError):
                parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
                if parent == main_pid and (stat.parent / "cmdline").read_bytes() == main:
                    return int(stat.parent.name)
        time.sleep(0.01)
    raise AssertionError("the worker forked no pool process")


def start_loading_worker(
    env: dict[str, str], queue: str, hostname: str, log: Path
) -> tuple[subprocess.Popen[bytes], int]:
    """A worker whose pool process is held (SIGSTOP) in the middle of loading its model, as a slow download or
    a long compile holds it; the caller lets it go on with SIGCONT."""
    with log.open("wb") as fh:
        proc = subprocess.Popen(
            [SVDQ, "worker", f"--hostname={hostname}", f"--queues={','.join(priority_queues(queue))}"],
            env=env,
            stdout=fh,
            stderr=subprocess.STDOUT,
        )
    try:
        child = pool_process(proc.pid)
    except BaseException:
        proc.kill()  # else a worker stays behind, loading, after the test
        proc.wait()
        raise
    os.kill(child, signal.SIGSTOP)
    return proc, child


def test_a_worker_loading_its_model_answers_no_ping_and_holds_no_job(
    svdq_env: dict[str, str],
    tmp_path: Path,
    image_file: Path,
    start_worker: Callable[..., WorkerProcess],
    celery_control: Celery,
) -> None:
    """It used to consume as soon as it forked: it took a job off the queue and sat on it through the load while a
    warm worker idled, and compose's healthcheck (a ping) called it healthy."""
    queue = f"test-{uuid.uuid4().hex[:8]}"
    warm = start_worker(queue=queue)
    hostname = f"loading{uuid.uuid4().hex[:6]}@test"
    log = tmp_path / "loading.log"
    proc, child = start_loading_worker(svdq_env, queue, hostname, log)
    try:
        time.sleep(3)  # the time it took to start consuming (and answer pings) before it waited for the load
        assert not celery_control.control.ping(destination=[hostname], timeout=1), log.read_text()
        with Client.from_env(queue=queue) as client:
            jobs = [client.submit(image_file, **SMALL, seed=n) for n in range(2)]
            done = [job.wait(timeout=60) for job in jobs]
        assert [(r.state, r.worker) for r in done] == [(JobState.SUCCEEDED, warm.hostname)] * 2
        assert "waiting for the model to load" in log.read_text()
        os.kill(child, signal.SIGCONT)
        deadline = time.monotonic() + 60
        while not celery_control.control.ping(destination=[hostname], timeout=0.5):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGCONT)
        proc.terminate()
        proc.wait(timeout=30)


def start_twin(env: dict[str, str], hostname: str, *extra: str) -> subprocess.CompletedProcess:
    """`svdq worker` under a name another worker has: it must stop before it loads anything."""
    return subprocess.run(
        [SVDQ, "worker", f"--hostname={hostname}", "--queues=twin-q", *extra],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_second_worker_under_a_running_worker_s_name_is_refused_and_the_first_runs_on(
    svdq_env: dict[str, str], worker: WorkerProcess, celery_control: Celery
) -> None:
    """Celery node names must be unique (revokes, ping replies, and svdq's lease holders and presence are keyed by
    them), and with mingle off Celery no longer warns of a second node under a name. `--gpus` with `--hostname`
    gave every GPU's worker the same one."""
    fleet = FleetStore(redis.Redis.from_url(svdq_env["SVDQ_REDIS_URL"]))
    deadline = time.monotonic() + 30  # the node's presence is written on a thread after it is ready
    while "machine" not in (before := fleet.node(worker.hostname)):
        assert time.monotonic() < deadline, before
        time.sleep(0.2)
    assert (before["pid"], before["machine"]) == (str(worker.proc.pid), socket.gethostname())

    twin = start_twin(svdq_env, worker.hostname)
    assert twin.returncode == 2, twin.stderr
    assert f"another worker named '{worker.hostname}' is running (process {worker.proc.pid} on" in twin.stderr
    assert "own --hostname" in twin.stderr
    assert celery_control.control.ping(destination=[worker.hostname], timeout=5)
    after = fleet.node(worker.hostname)
    assert "error" not in after and after["pid"] == before["pid"]  # its presence is the first worker's still

    gpus = start_twin(svdq_env, "mine@%h", "--gpus", "all")
    assert gpus.returncode == 2 and "--gpus names its workers gpuN@%h" in gpus.stderr, gpus.stderr


def test_a_name_whose_process_has_ended_here_is_free_and_one_up_elsewhere_is_not(svdq_env: dict[str, str]) -> None:
    """A node killed without clearing its presence may start again at once on its machine; on another machine
    (or in another container) the name is taken while that node loads, or answers pings."""
    fleet = FleetStore(redis.Redis.from_url(svdq_env["SVDQ_REDIS_URL"]))
    settings, name = WorkerSettings(), f"twin{uuid.uuid4().hex[:6]}@test"
    ended = subprocess.Popen(["true"])
    ended.wait()

    def never(_: str) -> bool:
        raise AssertionError("pinged, where the presence alone answers")

    fleet.present(name, {"model": "tiny", "pid": ended.pid, "machine": socket.gethostname()}, 60, device="cpu")
    assert check_unique_name(settings, name, never) is None
    fleet.loading(name, "tiny", ["q"], owner={"pid": 4242, "machine": "gpu-host-7"})
    loading = check_unique_name(settings, name, never)
    assert loading is not None and "is loading its model (process 4242 on gpu-host-7)" in loading
    fleet.started(name)  # loaded: now only a ping tells whether it is up
    running = check_unique_name(settings, name, lambda n: n == name)
    assert running is not None and "is running (process 4242 on gpu-host-7)" in running
    assert check_unique_name(settings, name, lambda n: False) is None  # up no more
    fleet.failed(name, "tiny", "RuntimeError: no model")  # a failed load has exited
    assert check_unique_name(settings, name, never) is None


def test_a_loading_worker_is_listed_as_loading_and_a_job_waiting_for_it_is_told_so(
    svdq_env: dict[str, str], tmp_path: Path, image_file: Path
) -> None:
    """A load takes minutes on a GPU (80 s on an H100 with a warm compile cache, 3 with a cold one): `svdq top`
    listed no worker and flagged its queue unread, and `svdq wait` told the user to start a worker, while one was
    starting."""
    queue = f"q-{uuid.uuid4().hex[:6]}"
    hostname = f"loading{uuid.uuid4().hex[:6]}@test"
    proc, child = start_loading_worker(svdq_env, queue, hostname, tmp_path / "w.log")
    try:
        deadline = time.monotonic() + 30
        while not (entry := {w["name"]: w for w in top(svdq_env)["workers"]}.get(hostname)):
            assert time.monotonic() < deadline, (tmp_path / "w.log").read_text()[-3000:]  # announced on the fork
            time.sleep(0.5)
        assert entry["stage"] == "loading" and entry["loading_for"] >= 0 and queue in entry["queues"]
        with Client.from_env(queue=queue) as client:
            job = client.submit(image_file, **SMALL)
            waited = subprocess.run(
                [SVDQ, "wait", job.id, "--timeout", "1"], env=svdq_env, capture_output=True, text=True, timeout=60
            )
            assert waited.returncode != 0 and f"{hostname} loading the model" in waited.stderr, waited.stderr
            assert "svdq worker" not in waited.stderr  # not told to start one
            (row,) = (q for q in top(svdq_env)["queues"] if q["name"] == queue)
            assert (row["waiting"], row["readers"], row["loading"]) == (1, 0, 1)
            # A second worker under the loading one's name (which answers no ping yet) is refused.
            twin = start_twin(svdq_env, hostname)
            assert twin.returncode == 2 and f"another worker named '{hostname}' is loading its model" in twin.stderr
            assert f"(process {proc.pid} on {socket.gethostname()})" in twin.stderr, twin.stderr
            os.kill(child, signal.SIGCONT)
            assert job.wait(timeout=60).state is JobState.SUCCEEDED
        fleet = FleetStore(redis.Redis.from_url(svdq_env["SVDQ_REDIS_URL"]))
        deadline = time.monotonic() + 30  # the node's start clears it, on a thread of its own
        while "loading_since" in (node := fleet.node(hostname)) or "queues" in node:
            assert time.monotonic() < deadline, node
            time.sleep(0.2)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGCONT)
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.parametrize(
    ("env", "end", "says"),
    [
        ({"SVDQ_LOAD_TIMEOUT": "4"}, None, "the model was not loaded within SVDQ_LOAD_TIMEOUT=4s"),
        ({}, signal.SIGKILL, "the process loading the model was killed by SIGKILL (out of memory?)"),
    ],
    ids=["too-slow", "killed"],
)
def test_a_load_too_slow_or_killed_ends_the_worker_with_the_reason(
    svdq_env: dict[str, str], tmp_path: Path, env: dict[str, str], end: signal.Signals | None, says: str
) -> None:
    """Celery's own timer killed a slow load and forked another, for ever; a killed loader was replaced likewise."""
    hostname = f"loading{uuid.uuid4().hex[:6]}@test"
    proc, child = start_loading_worker({**svdq_env, **env}, f"q-{uuid.uuid4().hex[:6]}", hostname, tmp_path / "w.log")
    try:
        if end is not None:
            os.kill(child, end)
        assert proc.wait(timeout=60) == LOAD_FAILED
    finally:
        if proc.poll() is None:  # else the child is gone, and its pid maybe another process's
            os.kill(child, signal.SIGKILL)
            proc.kill()
    last = (tmp_path / "w.log").read_text().strip().splitlines()[-1]
    assert last.startswith(f"svdq worker: the model failed to load: {says}"), last
    shown = top_entry(svdq_env, hostname)
    assert shown["stage"] == "failed" and shown["error"].startswith(says)


def test_a_worker_stopped_while_loading_stops_at_once(svdq_env: dict[str, str], tmp_path: Path) -> None:
    """It holds no job yet: the load is ended, not waited for (a deploy would otherwise wait out the grace
    period and then SIGKILL it). No load failure is reported: it was asked to stop."""
    hostname = f"loading{uuid.uuid4().hex[:6]}@test"
    proc, child = start_loading_worker(svdq_env, f"q-{uuid.uuid4().hex[:6]}", hostname, tmp_path / "w.log")
    try:
        fleet = FleetStore(redis.Redis.from_url(svdq_env["SVDQ_REDIS_URL"]))
        deadline = time.monotonic() + 30
        while hostname not in fleet.loading_nodes():  # in the gate's wait, and listed as loading
            assert time.monotonic() < deadline, (tmp_path / "w.log").read_text()[-3000:]
            time.sleep(0.2)
        proc.terminate()
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            os.kill(child, signal.SIGKILL)
            proc.kill()
    log = (tmp_path / "w.log").read_text()
    assert "failed to load" not in log and " ready." not in log, log[-3000:]
    assert hostname not in fleet.loading_nodes()  # no longer listed as loading


@pytest.mark.parametrize("store", ["no-bucket", "bad-bucket-name", "not-a-folder"])
def test_a_worker_that_cannot_store_videos_does_not_start(svdq_env: dict[str, str], tmp_path: Path, store: str) -> None:
    """It would fail every job it took, and quickly, so it would take most of the queue."""
    if store == "no-bucket":
        url, says = "s3://svdq-no-such-bucket/renders", "NoSuchBucket"
    elif store == "bad-bucket-name":
        url, says = "s3://svdq!bucket/renders", "not a valid object reference"
    else:
        (tmp_path / "a-file").write_text("")
        url, says = f"file://{tmp_path}/a-file/store", "Not a directory"
    hostname = f"w{uuid.uuid4().hex[:6]}@test"
    started = time.monotonic()
    done = subprocess.run(
        [SVDQ, "worker", f"--hostname={hostname}", f"--queues=q-{uuid.uuid4().hex[:6]}"],
        env={**svdq_env, "SVDQ_STORAGE_URL": url},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert time.monotonic() - started < 20
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("svdq worker: storage:") and url in last and says in last, last
    assert "worker process loading" not in done.stderr + done.stdout  # refused before the model's minutes
    shown = top_entry(svdq_env, hostname)
    assert shown["stage"] == "failed" and says in shown["error"]


def test_a_worker_starts_while_its_store_does_not_answer(
    svdq_env: dict[str, str], start_worker: Callable[..., WorkerProcess]
) -> None:
    """An outage is waited out job by job: a start-up check must not keep a fleet down behind one."""
    down = free_port()  # nothing listens there
    fresh = start_worker(env={"SVDQ_S3_ENDPOINT_URL": f"http://127.0.0.1:{down}"})
    assert "does not answer" in fresh.log_text()
