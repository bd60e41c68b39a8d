"""What operators watch: Flower (real, behind basic auth), each worker's Prometheus metrics, `svdq top`."""

from __future__ import annotations

import base64
import json
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from producer.client import Client
from producer.contract import JobState
from producer.local_redis import free_port
from tests.integration.conftest import BUCKET, FLOWER_AUTH, PREFIX, SLOW, SMALL, SVDQ, get

pytestmark = pytest.mark.integration


def test_flower_needs_auth_unless_told_otherwise(svdq_env: dict[str, str]) -> None:
    env = {k: v for k, v in svdq_env.items() if k not in ("SVDQ_FLOWER_BASIC_AUTH", "FLOWER_BASIC_AUTH")}
    refused = subprocess.run([SVDQ, "flower"], env=env, capture_output=True, text=True, timeout=30)
    assert refused.returncode == 2 and "SVDQ_FLOWER_BASIC_AUTH" in refused.stderr


def test_flower_asks_for_credentials_on_every_path_and_listens_on_loopback(flower: str) -> None:
    for path in ("/metrics", "/healthcheck", "/api/workers", "/tasks"):
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(flower + path, timeout=10)
        refused.value.close()
        assert refused.value.code == 401, path
    request = urllib.request.Request(flower + "/healthcheck")
    request.add_header("Authorization", "Basic " + base64.b64encode(FLOWER_AUTH.encode()).decode())
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.read() == b"OK"
    port = int(flower.rsplit(":", 1)[1])
    table = Path("/proc/net/tcp").read_text().splitlines()[1:] + Path("/proc/net/tcp6").read_text().splitlines()[1:]
    listening = [row.split()[1] for row in table if row.split()[3] == "0A" and row.split()[1].endswith(f":{port:04X}")]
    assert listening == [f"0100007F:{port:04X}"], listening  # 127.0.0.1 only (little-endian hex), no IPv6 either


def test_flower_shows_the_worker_online_while_it_renders_and_the_finished_task(
    flower: str, start_worker: Any, image_file: Path, svdq_env: dict[str, str]
) -> None:
    worker = start_worker()
    with pytest.raises(urllib.error.HTTPError) as unauthenticated:
        get(flower + "/api/workers")
    assert unauthenticated.value.code == 401
    with Client.from_env(queue=worker.queue) as client:
        job = client.submit(image_file, **SLOW)
        seen_online = 0
        while (record := job.status()).state is not JobState.SUCCEEDED:
            assert not record.state.is_terminal(), record
            if record.state is JobState.STARTED and (record.step or 0) >= 1:
                # Flower's own view, from the worker's heartbeat events, while the GPU (here a CPU) works.
                online = get(flower + "/api/workers?status=true", FLOWER_AUTH)
                assert online.get(worker.hostname) is True, online
                seen_online += 1
            time.sleep(0.5)
    assert seen_online >= 2
    assert worker.hostname in get(flower + "/api/workers?refresh=true", FLOWER_AUTH)
    deadline = time.monotonic() + 20
    while (task := get(flower + "/api/tasks", FLOWER_AUTH).get(job.id)) is None or task["state"] != "SUCCESS":
        assert time.monotonic() < deadline, task
        time.sleep(0.5)
    assert task["name"] == "svdq.generate_video" and task["worker"] == worker.hostname
    # The arguments Flower shows are the job id and its request: small, and without secrets.
    shown = f"{task['args']} {task['kwargs']}"
    assert job.id in shown and len(shown) < 2000
    assert svdq_env["AWS_SECRET_ACCESS_KEY"] not in shown


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_metrics_after_two_jobs(start_worker: Any, image_file: Path, s3: Any) -> None:
    port = free_port()
    worker = start_worker(env={"SVDQ_METRICS_PORT": str(port)})
    with Client.from_env(queue=worker.queue) as client:
        good = client.submit(image_file, **SMALL).wait(timeout=120)
        key = f"{PREFIX}/uploads/{uuid.uuid4().hex}.png"  # truncated; by URL, so only the worker sees it
        s3.put_object(Bucket=BUCKET, Key=key, Body=image_file.read_bytes()[:200])
        bad = client.submit(f"s3://{BUCKET}/{key}", **SMALL).wait(timeout=120)
    assert good.state is JobState.SUCCEEDED and bad.state is JobState.FAILED
    failed = ("svdq_jobs_total", (("error_code", "invalid_input"), ("state", "failed")))
    deadline = time.monotonic() + 10
    while failed not in (m := scrape(port)):  # counted just after the record says failed, which `wait` returns on
        assert time.monotonic() < deadline, "the failed job was never counted"
        time.sleep(0.1)
    assert m[("svdq_jobs_total", (("error_code", ""), ("state", "succeeded")))] == 1
    assert m[("svdq_jobs_total", (("error_code", "invalid_input"), ("state", "failed")))] == 1
    assert m[("svdq_frames_rendered_total", ())] == SMALL["num_frames"]
    for stage in ("fetch", "denoise", "decode", "encode", "upload"):  # the broken image failed before any stage ended
        assert m[("svdq_stage_seconds_count", (("stage", stage),))] == 1, stage
        assert m[("svdq_stage_seconds_sum", (("stage", stage),))] == pytest.approx(good.timings[stage], abs=1e-3)
    assert m[("svdq_stage_seconds_count", (("stage", "load"),))] == 1
    assert m[("svdq_queue_wait_seconds_count", ())] == 2
    assert m[("svdq_model_warm", ())] == 1
    device = "cuda" if torch.cuda.is_available() else "cpu"  # what the worker's SVDQ_DEVICE=auto picks here
    assert m[("svdq_worker_info", (("device", device), ("model", "tiny")))] == 1
    # A peak for each job that reached the GPU (the rendered one); a CPU has no peak to report.
    assert m[("svdq_gpu_peak_bytes_count", ())] == (1 if device == "cuda" else 0)


def test_jobs_reach_the_worker_serving_their_model_and_top_shows_the_rest(
    start_worker: Any, tiny_model: Path, image_file: Path, svdq_env: dict[str, str], tmp_path: Path
) -> None:
    other_model = tmp_path / "other-tiny"
    subprocess.run([SVDQ, "make-tiny-model", str(other_model)], check=True, capture_output=True)
    base = f"route-{uuid.uuid4().hex[:6]}"
    env = {"SVDQ_QUEUE": base}
    alpha = start_worker("--model", str(tiny_model), "--model-name", "alpha", queue=base, env=env, own_queues=True)
    beta = start_worker("--model", str(other_model), "--model-name", "beta", queue=base, env=env, own_queues=True)
    with Client.from_env(queue=base) as client:
        jobs = {name: client.submit(image_file, **SMALL, model=name) for name in ("alpha", "beta", "gamma")}
        done = {name: jobs[name].wait(timeout=120) for name in ("alpha", "beta")}
        assert done["alpha"].worker == alpha.hostname and done["beta"].worker == beta.hostname
        assert done["alpha"].state is done["beta"].state is JobState.SUCCEEDED
        # Nobody serves gamma: its job waits, and shows where.
        top = subprocess.run(
            [SVDQ, "top", "--once", "--json"], env={**svdq_env, **env}, capture_output=True, text=True, timeout=60
        )
        assert top.returncode == 0, top.stderr
        snap = json.loads(top.stdout)
        waiting = {q["name"]: q for q in snap["queues"]}
        assert waiting[f"{base}@gamma"] == {"name": f"{base}@gamma", "waiting": 1, "readers": 0, "loading": 0}
        assert waiting[f"{base}@alpha"]["readers"] == 1 and waiting[base]["readers"] == 2
        models = {w["name"]: w["model"] for w in snap["workers"]}
        assert models[alpha.hostname] == "alpha" and models[beta.hostname] == "beta"
        # What SVDQ_DEVICE=auto became in the worker process, not "auto".
        devices = {w["name"]: w["device"] for w in snap["workers"]}
        expected = "cuda:0 " + torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
        assert devices[alpha.hostname].startswith(expected) and devices[beta.hostname].startswith(expected)
        gamma = jobs["gamma"].status()
        assert gamma.state is JobState.QUEUED and gamma.queue == f"{base}@gamma"
        jobs["gamma"].cancel()


def test_gpus_is_refused_clearly_where_the_machine_lacks_them(svdq_env: dict[str, str]) -> None:
    """Any --gpus without a GPU; on a GPU host (the suite runs there too), an index past its last GPU."""
    count = torch.cuda.device_count()
    spec = str(count) if count else "all"
    refused = subprocess.run(
        [SVDQ, "worker", "--gpus", spec], env=svdq_env, capture_output=True, text=True, timeout=120
    )
    assert refused.returncode == 2
    if count:
        assert f"this machine has GPUs 0..{count - 1}" in refused.stderr
    else:
        assert "--gpus needs CUDA GPUs" in refused.stderr and "without --gpus" in refused.stderr
