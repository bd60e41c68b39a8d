"""What ships: docker-compose.yml as Compose reads it, the image's pinned versions, the monitoring profile.

No Docker engine here: `docker-compose config` (Debian's) validates and resolves the file, pip resolves the
image's install against the lock without installing it."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).parents[2]
# Set by .ci/gpu-suite: the suite runs on a host's own torch and packages, with no package index to reach.
host_packages = pytest.mark.skipif(
    bool(os.environ.get("SVDQ_TESTS_ON_HOST_PACKAGES")), reason="the host's own packages, not the lock's"
)
ENV = {
    "MINIO_ROOT_PASSWORD": "pw-for-config",
    "FLOWER_BASIC_AUTH": "ops:pw-for-config",
    "HF_TOKEN": "hf_test",
    "SVDQ_API_KEYS": "app:key-for-config",
}


def need(tool: str) -> str:
    found = shutil.which(tool)
    if found is None:
        if os.environ.get("CI"):
            pytest.fail(f"CI must install {tool} (.ci/run)")
        pytest.skip(f"{tool} is not installed here (`apt-get install {tool}`)")
    return found


def compose_config(*args: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    out = subprocess.run(
        [need("docker-compose"), *args, "config"],
        cwd=ROOT,
        env={"PATH": os.environ["PATH"], **ENV, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return yaml.safe_load(out.stdout)


def mounts(service: dict[str, Any]) -> dict[str, str]:
    """target -> source of a service's volumes, in either of Compose's forms (`src:target[:mode]` or a map)."""
    found = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source, target = volume.split(":")[:2]
        else:
            source, target = volume["source"], volume["target"]
        found[target] = source
    return found


def test_compose_runs_svdq_on_an_nvidia_host() -> None:
    services = compose_config()["services"]
    for name in ("redis", "minio", "minio-init", "worker-gpu0", "flower"):  # started by a plain `up`
        assert "profiles" not in services[name], name
    worker = services["worker-gpu0"]
    env = worker["environment"]
    assert env["HF_TOKEN"] == "hf_test" and "SVDQ_WEBHOOK_SECRET" in env
    assert env["SVDQ_S3_PUBLIC_ENDPOINT_URL"].startswith("http://localhost")  # a browser can open result URLs
    assert env["SVDQ_S3_ENDPOINT_URL"] == "http://minio:9000"
    # The container's own name (a fixed one was the same on every host sharing the Redis), and a healthcheck
    # that asks that node; the first start may load for as long as the healthcheck waits.
    assert "hostname" not in worker and "--hostname=gpu0@%h" in worker["command"]
    assert worker["healthcheck"]["test"][1:5] == ["svdq", "ping", "--hostname", "gpu0@%h"]
    assert worker["healthcheck"]["start_period"] == "30m" and env["SVDQ_LOAD_TIMEOUT"] == str(30 * 60)
    caches = {"/home/svdq/.cache/huggingface", "/home/svdq/.cache/svdq/compile", "/var/lib/svdq/spool"}
    assert set(mounts(worker)) == caches
    device = worker["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    redis_args = services["redis"]["command"]
    assert redis_args[redis_args.index("--maxmemory-policy") + 1] == "noeviction"  # an evicted key is a lost job
    assert redis_args[redis_args.index("--maxmemory") + 1] == "0"  # REDIS_MAXMEMORY unset: no limit
    # Every long-running service says when it is healthy.
    for name in ("redis", "minio", "worker-gpu0", "flower", "gateway"):
        assert services[name].get("healthcheck", {}).get("test"), name
    # Flower from svdq's image (its pinned Flower, svdq's auth), its credentials from the environment.
    flower = services["flower"]
    assert flower["image"] == worker["image"] and flower["command"][:2] == ["svdq", "flower"]
    assert flower["environment"]["SVDQ_FLOWER_BASIC_AUTH"] == ENV["FLOWER_BASIC_AUTH"]
    # The gateway likewise: svdq's image, its keys from the environment, on loopback unless published further.
    gateway = services["gateway"]
    assert gateway["image"] == worker["image"] and gateway["command"][:2] == ["svdq", "gateway"]
    assert gateway["environment"]["SVDQ_API_KEYS"] == ENV["SVDQ_API_KEYS"]
    assert gateway["environment"]["SVDQ_REDIS_URL"] == worker["environment"]["SVDQ_REDIS_URL"]


def settings_in(service: dict[str, Any], cls: type, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The settings `cls` reads from a service's environment, as its process in the container would."""
    for name in list(os.environ):
        if name.startswith("SVDQ_"):
            monkeypatch.delenv(name)
    for name, value in service["environment"].items():
        monkeypatch.setenv(name, "" if value is None else str(value))
    return cls()


def test_every_service_starts_with_the_operator_s_environment_as_documented(monkeypatch: pytest.MonkeyPatch) -> None:
    """Compose passes "" for a variable left unset (`${SVDQ_WEBHOOK_SECRET:-}`): read as a secret, it failed its
    check and the worker exited 2 in a restart loop. Each shared setting can point at a Redis and store elsewhere
    (a second host), and an empty SVDQ_S3_ENDPOINT_URL or SVDQ_MODEL_VARIANT clears it."""
    from producer.settings import Settings
    from worker.settings import WorkerSettings

    services = compose_config()["services"]
    worker = settings_in(services["worker-gpu0"], WorkerSettings, monkeypatch)
    assert worker.webhook_secret is None and worker.model_variant == "fp16" and worker.load_timeout == 1800
    assert settings_in(services["gateway"], Settings, monkeypatch).redis_url == "redis://redis:6379/0"
    assert settings_in(services["flower"], Settings, monkeypatch).flower_basic_auth is not None

    # What a shell on the host exports for the CLI stays out of the containers (localhost is nothing there).
    cli = {"SVDQ_REDIS_URL": "redis://localhost:6379/0", "SVDQ_S3_ENDPOINT_URL": "http://localhost:9000"}
    worker = settings_in(compose_config(env=cli)["services"]["worker-gpu0"], WorkerSettings, monkeypatch)
    assert (worker.redis_url, worker.s3_endpoint_url) == ("redis://redis:6379/0", "http://minio:9000")

    shared = {"FLEET_REDIS_URL": "rediss://:pw@redis.internal:6380/2", "FLEET_STORAGE_URL": "s3://renders/svdq"}
    cleared = {"FLEET_S3_ENDPOINT_URL": "", "SVDQ_MODEL_VARIANT": "", "SVDQ_S3_PUBLIC_ENDPOINT_URL": ""}
    services = compose_config(env={**cli, **shared, **cleared})["services"]
    worker = settings_in(services["worker-gpu0"], WorkerSettings, monkeypatch)
    assert (worker.redis_url, worker.storage_url) == (shared["FLEET_REDIS_URL"], shared["FLEET_STORAGE_URL"])
    assert worker.model_variant is None  # a checkpoint without fp16 weights
    assert worker.s3_endpoint_url is worker.s3_public_endpoint_url is None  # AWS S3 itself, for both
    for name in ("gateway", "flower"):
        assert settings_in(services[name], Settings, monkeypatch).redis_url == shared["FLEET_REDIS_URL"]


def test_the_image_writes_where_compose_mounts_volumes() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    worker = compose_config()["services"]["worker-gpu0"]
    made = re.search(r"mkdir -p ([^&\n]+)", dockerfile)
    assert made is not None
    for target in mounts(worker):
        assert target in made.group(1).split(), f"{target} is not made (and owned) by the image's user"
    assert re.search(r"chown -R svdq:svdq .*/var/lib/svdq", dockerfile) and "USER svdq" in dockerfile
    assert "SVDQ_SPOOL_DIR=/var/lib/svdq/spool" in dockerfile
    # The build context holds what the image copies and nothing else (a checkout's .venv is gigabytes).
    ignore = [line for line in (ROOT / ".dockerignore").read_text().splitlines() if line and line[0] != "#"]
    copied = {p for line in dockerfile.splitlines() if line.startswith("COPY ") for p in line.split()[1:-1]}
    assert ignore[0] == "*" and {line[1:].rstrip("/") for line in ignore if line[0] == "!"} == copied


def test_monitoring_profile_scrapes_the_workers_and_provisions_the_dashboard() -> None:
    services = compose_config("--profile", "monitoring")["services"]
    prometheus, grafana = services["prometheus"], services["grafana"]
    assert prometheus["profiles"] == ["monitoring"] and grafana["profiles"] == ["monitoring"]
    for service in (prometheus, grafana):
        for source in mounts(service).values():
            assert "/" not in source or Path(source).is_file(), source  # named volumes, or files in the repo
    scrape = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())["scrape_configs"]
    targets = {job["job_name"]: job["static_configs"][0]["targets"] for job in scrape}
    assert targets["svdq-workers"] == ["worker-gpu0:9100"]
    assert services["worker-gpu0"]["environment"]["SVDQ_METRICS_PORT"] == "9100"
    # Flower's /metrics asks for credentials (svdq flower): the scrape sends them, from files written at start.
    flower_job = next(job for job in scrape if job["job_name"] == "flower")
    files = {"username_file": "/tmp/flower-user", "password_file": "/tmp/flower-password"}
    assert flower_job["basic_auth"] == files
    assert prometheus["entrypoint"] == ["/bin/sh", "-c"]
    assert "--config.file=/etc/prometheus/svdq.yml" in prometheus["command"][0]
    assert mounts(prometheus)["/etc/prometheus/svdq.yml"] == str(ROOT / "deploy" / "prometheus.yml")
    assert Path(mounts(grafana)["/var/lib/grafana/dashboards/svdq.json"]) == ROOT / "docs" / "grafana-svdq.json"
    json.loads((ROOT / "docs" / "grafana-svdq.json").read_text())
    datasource = yaml.safe_load((ROOT / "deploy" / "grafana" / "datasource.yml").read_text())["datasources"][0]
    assert datasource["type"] == "prometheus" and datasource["isDefault"] and "prometheus:9090" in datasource["url"]


@host_packages
def test_make_and_the_image_install_the_same_locked_versions() -> None:
    makefile, dockerfile = (ROOT / "Makefile").read_text(), (ROOT / "Dockerfile").read_text()
    assert "CONSTRAINTS ?= constraints.txt" in makefile and "$(PIN)" in makefile
    assert dockerfile.count("pip install -c constraints.txt") == 2
    lock = dict(line.split("==", 1) for line in (ROOT / "constraints.txt").read_text().splitlines() if "==" in line)
    # What CI runs is what the lock says (torch by release: the image's is its CUDA build).
    from importlib.metadata import version

    for name in ("torch", "diffusers", "transformers", "accelerate", "celery", "kombu", "flower", "redis", "boto3"):
        assert version(name).split("+")[0] == lock[name], name
    image_python = re.search(r"FROM python:(\d+\.\d+)", dockerfile)
    assert image_python is not None and image_python.group(1) == f"{sys.version_info[0]}.{sys.version_info[1]}"


@host_packages
@pytest.mark.integration
def test_the_images_pins_resolve_together() -> None:
    """pip resolves the image's install (torch, then svdq with its worker, flower and gateway extras) against
    the lock."""
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--dry-run",
            "--ignore-installed",
            "--quiet",
            "--report",
            "-",
            "-c",
            "constraints.txt",
            "torch",
            ".[worker,flower,gateway]",
        ],
        cwd=ROOT,
        env={k: v for k, v in os.environ.items() if k != "COVERAGE_PROCESS_CONFIG"},  # pip: not ours to measure
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout)["install"]
    chosen = {item["metadata"]["name"].lower(): item["metadata"]["version"] for item in report}
    lock = {
        name.lower(): pinned
        for name, pinned in (
            line.split("==", 1) for line in (ROOT / "constraints.txt").read_text().splitlines() if "==" in line
        )
    }
    assert chosen["torch"].split("+")[0] == lock["torch"] and chosen["flower"] == lock["flower"]
    assert chosen["diffusers"] == lock["diffusers"] and chosen["transformers"] == lock["transformers"]


def test_prometheus_gets_flower_s_first_user_and_password_whatever_they_hold(tmp_path: Path) -> None:
    """The start command used to sed them into the config: a second user ended up in the password, and a password
    with & or | came out mangled or stopped Prometheus from starting."""
    auth = "ops:p&a|ss\\w:o:rd,viewer:other"
    prometheus = compose_config("--profile", "monitoring", env={"FLOWER_BASIC_AUTH": auth})["services"]["prometheus"]
    # The command as the container's shell runs it: compose's $$ is one $, and Prometheus itself is not here.
    script = prometheus["command"][0].replace("$$", "$").replace("/tmp/", f"{tmp_path}/")
    script = script.split("&& exec /bin/prometheus")[0]
    done = subprocess.run(["sh", "-c", script], env={"FLOWER_BASIC_AUTH": auth}, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "flower-user").read_text() == "ops"
    assert (tmp_path / "flower-password").read_text() == "p&a|ss\\w:o:rd"
    assert prometheus["environment"]["FLOWER_BASIC_AUTH"] == auth
