"""Bad input refused where it is found: a bad parameter at submit (nothing stored or enqueued, the CLI
names it), a bad image in the worker (its job fails `invalid_input`, the worker takes the next)."""

from __future__ import annotations

import io
import re
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from producer import keys
from producer.client import Client
from producer.contract import DEFAULT_QUEUE, InvalidParameter, JobState, model_queue
from tests.integration.conftest import BUCKET, PREFIX, SMALL, SVDQ, WorkerProcess

pytestmark = pytest.mark.integration


@pytest.mark.parametrize(
    "image",
    [
        "",
        "inputs/" + "a" * 2100 + ".png",
        "https://example.com/" + "a" * 2100,
        Path("x" * 300 + ".png"),
        "inputs/y.png\n[2026-11-28 03:00:00,000: CRITICAL/MainProcess] worker.recovery: FORGED \x1b[2J",
    ],
    ids=["empty", "long-key", "long-url", "long-file-name", "control-characters"],
)
def test_an_image_reference_the_worker_could_not_take_is_refused_at_submit(client: Client, image: Any) -> None:
    """A reference over the message's 2,048 characters was accepted, then dropped by the worker with its job left
    queued for ever; an empty one or a file name too long for the file system raised a bare exception; one with
    a newline wrote a forged line into the worker's log."""
    queued_before = client.redis.llen(DEFAULT_QUEUE)
    with pytest.raises(InvalidParameter) as err:
        client.submit(image, **SMALL)
    assert err.value.param == "image" and client.redis.llen(DEFAULT_QUEUE) == queued_before


def test_the_cli_refuses_a_file_name_too_long_in_one_line(svdq_env: dict[str, str]) -> None:
    run = subprocess.run([SVDQ, "submit", "x" * 300 + ".png"], env=svdq_env, capture_output=True, text=True)
    assert run.returncode == 2 and "File name too long" in run.stderr and "Traceback" not in run.stderr


def test_a_file_store_whose_folder_cannot_be_made_is_one_line_naming_it(
    svdq_env: dict[str, str], image_file: Path, tmp_path: Path, client: Client
) -> None:
    """It was a traceback from pathlib's mkdir."""
    (tmp_path / "a-file").write_text("not a folder")
    env = {**svdq_env, "SVDQ_STORAGE_URL": (tmp_path / "a-file" / "store").as_uri()}
    jobs_before = sorted(client.redis.scan_iter(keys.JOB_PATTERN))
    run = subprocess.run([SVDQ, "submit", str(image_file)], env=env, capture_output=True, text=True)
    assert run.returncode == 5 and run.stdout == "" and "Traceback" not in run.stderr, run.stderr
    assert run.stderr.startswith("svdq: the store cannot take the image: Not a directory") and "a-file" in run.stderr
    assert sorted(client.redis.scan_iter(keys.JOB_PATTERN)) == jobs_before


@pytest.mark.parametrize(
    ("params", "named"),
    [
        ({"num_frames": 0}, "num_frames"),
        ({"width": 100}, "width"),
        ({"height": 4096}, "height"),
        ({"motion_bucket_id": 300}, "motion_bucket_id"),
        ({"min_guidance_scale": 3.0, "max_guidance_scale": 1.0}, "max_guidance_scale"),
        ({"frames": 4}, "frames"),
    ],
)
def test_bad_parameter_is_refused_with_nothing_stored_or_enqueued(
    client: Client, s3: Any, params: dict[str, Any], named: str
) -> None:
    r = client.redis
    jobs_before = sorted(r.scan_iter(keys.JOB_PATTERN))
    queued_before = r.llen(DEFAULT_QUEUE)
    objects_before = s3.list_objects_v2(Bucket=BUCKET).get("KeyCount", 0)
    fresh_image = io.BytesIO()
    Image.new("RGB", (32, 32), (uuid.uuid4().int % 255, 1, 2)).save(fresh_image, format="PNG")

    with pytest.raises(InvalidParameter) as err:
        client.submit(fresh_image.getvalue(), **params)

    assert err.value.param == named and named in str(err.value)
    assert sorted(r.scan_iter(keys.JOB_PATTERN)) == jobs_before
    assert r.llen(DEFAULT_QUEUE) == queued_before
    assert s3.list_objects_v2(Bucket=BUCKET).get("KeyCount", 0) == objects_before


def test_cli_refuses_a_bad_parameter_naming_it(svdq_env: dict[str, str], image_file: Path) -> None:
    """By the flag the user typed, in words: the webhook, the key and the model were named as the request names
    them, and a model name's rule was a regular expression."""
    said = {
        ("--frames", "0"): "--frames: must be 1 to 128 (got 0)",
        # It said "--max-guidance: max_guidance_scale must be >= min_guidance_scale", for a flag not given.
        ("--min-guidance", "5"): "--max-guidance: must be >= --min-guidance (got 3; --min-guidance is 5)",
        ("--webhook", "ftp://example.com/x"): "--webhook: only http and https URLs are allowed, not ftp:",
        ("--key", "k" * 201): "--key: ",
        ("--model", "Big Model"): (
            "--model: must be a model name: 1 to 64 of a-z, 0-9, '-' and '_', starting with a letter or digit "
            "(got 'Big Model')"
        ),
    }
    for flag, says in said.items():
        run = subprocess.run([SVDQ, "submit", str(image_file), *flag], env=svdq_env, capture_output=True, text=True)
        assert run.returncode == 2 and run.stdout == "", run.stderr
        assert run.stderr.startswith(f"svdq: {says}") and run.stderr.count("\n") == 1, run.stderr


@pytest.mark.parametrize(
    "payload",
    [b"this is not an image at all", b"", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40],
    ids=["text", "empty", "truncated-png"],
)
def test_corrupt_image_fails_its_job_and_the_worker_takes_the_next(
    client: Client, worker: WorkerProcess, s3: Any, image_file: Path, payload: bytes
) -> None:
    key = f"{PREFIX}/uploads/{uuid.uuid4().hex}.png"
    s3.put_object(Bucket=BUCKET, Key=key, Body=payload)
    bad = client.submit(f"s3://{BUCKET}/{key}", **SMALL).wait(timeout=60)
    assert bad.state is JobState.FAILED
    assert bad.error is not None and bad.error.code == "invalid_input"
    assert "image" in bad.error.message
    assert bad.attempts == 1  # bad input is never retried
    assert bad.result is None

    good = client.submit(image_file, **SMALL).wait(timeout=120)
    assert good.state is JobState.SUCCEEDED
    assert good.worker == bad.worker == worker.hostname


def test_submit_wait_says_why_a_job_failed(svdq_env: dict[str, str], worker: WorkerProcess, s3: Any) -> None:
    key = f"{PREFIX}/uploads/{uuid.uuid4().hex}.png"
    s3.put_object(Bucket=BUCKET, Key=key, Body=b"this is not an image at all")
    argv = [SVDQ, "submit", f"s3://{BUCKET}/{key}", "--wait", "--width", "64", "--height", "64", "--frames", "4"]
    out = subprocess.run([*argv, "--steps", "2"], env=svdq_env, capture_output=True, text=True, timeout=120)
    job_id = out.stdout.strip()
    assert out.returncode == 1 and re.fullmatch(r"[0-9a-f]{32}", job_id)
    assert out.stderr.startswith(f"svdq: job {job_id} failed: invalid_input: the image is not an image svdq can read")


def test_a_job_for_another_model_that_reaches_this_worker_fails_naming_both(
    start_worker: Any, image_file: Path
) -> None:
    base = f"test-{uuid.uuid4().hex[:8]}"
    misrouted = start_worker(queue=model_queue(base, "svd-xt"))  # reads svd-xt's queues, serves the tiny model
    with Client.from_env(queue=base) as client:
        final = client.submit(image_file, **SMALL, model="svd-xt").wait(timeout=120)
    assert final.state is JobState.FAILED and final.attempts == 1
    assert final.error is not None and final.error.code == "invalid_input"
    assert "serves model 'tiny', the job asks for 'svd-xt'" in final.error.message
    assert misrouted.proc.poll() is None


def test_a_folder_given_to_submit_is_named_a_folder_with_bulk_suggested(client: Client, tmp_path: Path) -> None:
    """It said "no such file" of a folder that exists."""
    with pytest.raises(InvalidParameter) as err:
        client.submit(tmp_path, **SMALL)
    assert err.value.param == "image" and "is a folder" in err.value.message and "svdq bulk" in err.value.message
