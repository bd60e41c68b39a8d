"""`svdq bulk` as a user runs it: real Redis, the S3 server and a real worker with the tiny model."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import shutil
import signal
import struct
import subprocess
import termios
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import imageio_ffmpeg
import pytest
import redis
from PIL import Image

from producer import cli, keys, wire
from producer.bulk import Run, read_inputs
from producer.client import Client, Submission, send_job
from producer.contract import JobState
from producer.local_redis import LocalRedis, free_port
from tests.integration.conftest import SMALL, SVDQ, WorkerProcess
from tests.integration.test_image_urls import IMAGE, Site

pytestmark = pytest.mark.integration

PARAMS_SMALL = {k: SMALL[k] for k in ("width", "height", "num_frames", "num_inference_steps")}
SIZE = [
    "--width",
    str(SMALL["width"]),
    "--height",
    str(SMALL["height"]),
    "--steps",
    str(SMALL["num_inference_steps"]),
    "--frames",
    str(SMALL["num_frames"]),
]


def picture(path: Path, shade: int, fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", (64, 64), (shade, 255 - shade, (shade * 7) % 256))
    img.putpixel((shade % 64, 5), (0, 0, 0))
    img.save(path, format=fmt)
    return path


def bulk(env: dict[str, str], *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([SVDQ, "bulk", *args], env=env, capture_output=True, text=True, timeout=timeout)


def following(env: dict[str, str], queue: str, jobs: int, *args: str) -> subprocess.Popen[str]:
    """`svdq bulk ARGS` in the background, once its `jobs` messages wait in the (low priority) queue that no
    worker reads: it has submitted them all and is following them now."""
    running = subprocess.Popen(
        [SVDQ, "bulk", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    r = redis.Redis.from_url(env["SVDQ_REDIS_URL"])
    deadline = time.monotonic() + 60
    while r.llen(f"{queue}.low") < jobs:
        assert time.monotonic() < deadline and running.poll() is None, running.communicate()
        time.sleep(0.2)
    r.close()
    return running


def report(out: Path) -> dict[str, dict[str, Any]]:
    lines = [json.loads(line) for line in (out / "svdq-bulk.jsonl").read_text().splitlines()]
    return {line["input"]: line for line in lines}


def job_count(env: dict[str, str]) -> int:
    r = redis.Redis.from_url(env["SVDQ_REDIS_URL"])
    try:
        return sum(1 for _ in r.scan_iter(match=keys.job("*"), count=1000))
    finally:
        r.close()


def test_a_folder_renders_to_a_mirrored_folder_and_a_rerun_resumes_without_new_jobs(
    svdq_env: dict[str, str], worker: WorkerProcess, tmp_path: Path
) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    picture(src / "a" / "one.png", 10)
    picture(src / "a" / "two.jpg", 40, "JPEG")
    picture(src / "a" / "b" / "three.png", 70)
    picture(src / "a" / "b" / "four.webp", 100, "WEBP")
    picture(src / "c" / "five.bmp", 130, "BMP")
    picture(src / "c" / "six.png", 160)
    shutil.copy(src / "a" / "one.png", src / "c" / "same-as-one.png")  # identical: one job, two files
    (src / "c" / "d").mkdir()
    (src / "c" / "d" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    (src / "notes.txt").write_text("not an image: not an input")
    jobs_before = job_count(svdq_env)

    first = bulk(svdq_env, str(src), "--out", str(out), *SIZE)
    assert first.returncode == 1, first.stderr  # one input failed
    lines = report(out)
    assert len(lines) == 8
    broken = lines["c/d/broken.png"]
    assert broken["state"] == "failed" and broken["error"]["code"] == "invalid_input" and broken["job_id"] is None
    assert "is not an image svdq can read" in broken["error"]["message"]
    videos = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.mp4"))
    assert videos == [
        "a/b/four.mp4",
        "a/b/three.mp4",
        "a/one.mp4",
        "a/two.mp4",
        "c/five.mp4",
        "c/same-as-one.mp4",
        "c/six.mp4",
    ]
    assert all(line["state"] == "succeeded" for name, line in lines.items() if name != "c/d/broken.png")
    assert lines["a/one.png"]["job_id"] == lines["c/same-as-one.png"]["job_id"]
    assert (out / "a/one.mp4").read_bytes() == (out / "c/same-as-one.mp4").read_bytes()
    assert job_count(svdq_env) - jobs_before == 6
    assert imageio_ffmpeg.count_frames_and_secs(str(out / "a/b/three.mp4"))[0] == SMALL["num_frames"]
    assert "c/d/broken.png" in first.stdout and "6 jobs submitted" in first.stdout  # a line per input, a summary

    # The same command again: no new job, nothing downloaded, the same report.
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.mp4")}
    again = bulk(svdq_env, str(src), "--out", str(out), *SIZE, "--json")
    summary = json.loads(again.stdout)
    assert again.returncode == 1 and summary["jobs_submitted"] == 0 and summary["downloaded"] == 0, again.stdout
    assert summary["jobs_found"] == 6 and summary["states"] == {"failed": 1, "succeeded": 7}
    assert job_count(svdq_env) - jobs_before == 6
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.mp4")} == stamps
    assert {k: v["job_id"] for k, v in report(out).items()} == {k: v["job_id"] for k, v in lines.items()}

    # A deleted output comes back, and only it; still no new job.
    (out / "a/b/three.mp4").unlink()
    third = json.loads(bulk(svdq_env, str(src), "--out", str(out), *SIZE, "--json").stdout)
    assert third["downloaded"] == 1 and third["jobs_submitted"] == 0 and (out / "a/b/three.mp4").is_file()
    (out / "c/six.mp4").write_bytes((out / "c/six.mp4").read_bytes()[:100])  # cut short (a crash elsewhere)
    fourth = json.loads(bulk(svdq_env, str(src), "--out", str(out), *SIZE, "--json").stdout)
    assert fourth["downloaded"] == 1 and imageio_ffmpeg.count_frames_and_secs(str(out / "c/six.mp4"))[0] == 4
    assert job_count(svdq_env) - jobs_before == 6


def test_manifests_set_frames_and_outputs_per_row(
    svdq_env: dict[str, str], worker: WorkerProcess, tmp_path: Path
) -> None:
    picture(tmp_path / "in" / "x.png", 20)
    picture(tmp_path / "in" / "y.png", 220)
    csv = tmp_path / "jobs.csv"
    csv.write_text("image,frames,output\nin/x.png,6,clips/first\nin/y.png,,clips/second.mp4\n")
    run = bulk(svdq_env, str(csv), "--out", str(tmp_path / "csv-out"), *SIZE)
    assert run.returncode == 0, run.stdout + run.stderr
    frames = {
        name: imageio_ffmpeg.count_frames_and_secs(str(tmp_path / "csv-out" / "clips" / name))[0]
        for name in ("first.mp4", "second.mp4")
    }
    assert frames == {"first.mp4": 6, "second.mp4": SMALL["num_frames"]}  # the row's value beats the flag's

    jsonl = tmp_path / "jobs.jsonl"
    jsonl.write_text(json.dumps({"image": "in/y.png", "num_frames": 5, "seed": 7, "output": "y5"}) + "\n")
    run = bulk(svdq_env, str(jsonl), "--out", str(tmp_path / "jsonl-out"), *SIZE, "--json")
    assert run.returncode == 0, run.stderr
    [line] = report(tmp_path / "jsonl-out").values()
    assert line["seed"] == 7 and line["output"].endswith("jsonl-out/y5.mp4")
    assert imageio_ffmpeg.count_frames_and_secs(line["output"])[0] == 5


def on_a_terminal(env: dict[str, str], *args: str, timeout: float = 180) -> tuple[int, str]:
    """`svdq bulk ARGS` with a pseudo-terminal (120 columns) for its stdout and stderr: its exit code and all it
    drew."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    proc = subprocess.Popen([SVDQ, "bulk", *args], env=env, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave)
    os.close(slave)
    drawn, deadline = bytearray(), time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if select.select([master], [], [], 1.0)[0]:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not chunk:
                    break
                drawn += chunk
        return proc.wait(timeout=10), drawn.decode(errors="replace")
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()


def test_url_rows_on_a_terminal_render_and_an_unreachable_url_fails_its_own_line(
    svdq_env: dict[str, str], start_worker: Callable[..., WorkerProcess], tmp_path: Path
) -> None:
    """A manifest of http(s) URLs, run on a terminal: the good row renders; a missing and an unreachable URL fail
    their own lines; the bar shows the inputs ended, the counts by state, the frames, the rate and the ETA."""
    site = Site("127.0.0.1", {"/cat.png": (200, {"content-length": str(len(IMAGE))}, IMAGE)})
    queue = f"bulk-{uuid.uuid4().hex[:8]}"
    allow = {"SVDQ_ALLOW_PRIVATE_URLS": "1"}  # the site is on loopback
    start_worker(queue=queue, env={**allow, "SVDQ_MAX_ATTEMPTS": "1"})
    manifest = tmp_path / "urls.jsonl"
    rows = [f"{site.base}/cat.png", f"{site.base}/gone.png", f"http://127.0.0.1:{free_port()}/dog.png"]
    manifest.write_text("".join(json.dumps({"image": url}) + "\n" for url in rows))
    try:
        code, drawn = on_a_terminal(
            {**svdq_env, **allow, "SVDQ_QUEUE": queue}, str(manifest), "--out", str(tmp_path / "out"), *SIZE
        )
    finally:
        site.close()
    assert code == 1, drawn
    lines = report(tmp_path / "out")
    assert lines[rows[0]]["state"] == "succeeded" and (tmp_path / "out" / "cat.mp4").is_file()
    gone, unreachable = lines[rows[1]], lines[rows[2]]
    assert (gone["state"], gone["error"]["code"]) == ("failed", "invalid_input")
    assert "HTTP 404" in gone["error"]["message"]
    assert (unreachable["state"], unreachable["error"]["code"]) == ("failed", "storage_unavailable")  # transient
    assert "Connection refused" in unreachable["error"]["message"]
    bar = drawn.replace("\r", "\n").splitlines()
    final = [b for b in bar if "3/3" in b][-1]
    assert "succeeded 1, failed 2, 4 frames" in final, final
    assert any(re.search(r"(queued|started) \d", b) for b in bar), bar  # the unfinished, counted while they run
    # elapsed<ETA, then the rate (tqdm turns it over below one a second)
    assert re.search(r"3/3 \[\d\d:\d\d<\d\d:\d\d, +[\d.]+(video/s|s/video)", final), final
    assert not [b for b in bar if b.startswith("succeeded ")]  # no plain lines: they are for pipes


def test_a_bad_manifest_is_reported_whole_and_submits_nothing(svdq_env: dict[str, str], tmp_path: Path) -> None:
    picture(tmp_path / "ok.png", 50)
    csv = tmp_path / "bad.csv"
    rows = "ok.png,4,a,red\nmissing.png,4,b,red\nok.png,999,c,red\nok.png,4,../escape,red\n"
    csv.write_text("image,frames,output\n" + rows.replace(",red", ""))
    jobs_before = job_count(svdq_env)
    run = bulk(svdq_env, str(csv), "--out", str(tmp_path / "out"), *SIZE)
    assert run.returncode == 2 and job_count(svdq_env) == jobs_before
    assert "line 3: image: no such file: missing.png" in run.stderr
    assert "line 4: frames: must be" in run.stderr and "line 5: output: must be a relative path" in run.stderr
    assert "nothing was submitted" in run.stderr and not (tmp_path / "out").exists()
    # An unknown column hid every row's problem until it was fixed; no row can be rendered with one (its values
    # would be dropped), so --skip-invalid does not pass it.
    csv.write_text("image,frames,output,colour\n" + rows)
    run = bulk(svdq_env, str(csv), "--out", str(tmp_path / "out"), "--skip-invalid", *SIZE)
    assert run.returncode == 2 and job_count(svdq_env) == jobs_before, run.stderr
    assert "4 problem(s)" in run.stderr and "line 1: unknown column 'colour'" in run.stderr
    assert "line 3: image: no such file: missing.png" in run.stderr and "line 4: frames: must be" in run.stderr


def test_an_out_that_cannot_hold_videos_or_a_redis_that_is_gone_is_one_error_line(
    svdq_env: dict[str, str], tmp_path: Path
) -> None:
    """Both were a traceback, or a line per input saying `queued` for jobs that never existed."""
    picture(tmp_path / "src" / "a.png", 10)
    picture(tmp_path / "src" / "b.png", 20)
    (tmp_path / "taken").write_text("a file")
    jobs_before = job_count(svdq_env)
    for out, says in ((tmp_path / "taken", "it is a file, not a folder"), (tmp_path / "taken" / "v", "cannot write")):
        run = bulk(svdq_env, str(tmp_path / "src"), "--out", str(out), *SIZE)
        assert run.returncode == 2 and says in run.stderr and "Traceback" not in run.stderr, run.stderr
    assert job_count(svdq_env) == jobs_before
    gone = {**svdq_env, "SVDQ_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}
    run = bulk(gone, str(tmp_path / "src"), "--out", str(tmp_path / "out"), *SIZE)
    assert run.returncode == 5 and "cannot reach Redis" in run.stderr and run.stdout == "", run.stdout
    report = [json.loads(line) for line in (tmp_path / "out" / "svdq-bulk.jsonl").read_text().splitlines()]
    assert [(line["input"], line["state"], line["job_id"]) for line in report] == [
        ("a.png", "unsubmitted", None),
        ("b.png", "unsubmitted", None),
    ]


def test_ctrl_c_leaves_the_jobs_running_and_a_rerun_completes_them(
    svdq_env: dict[str, str], start_worker: Callable[..., WorkerProcess], tmp_path: Path
) -> None:
    queue = f"bulk-{uuid.uuid4().hex[:8]}"
    env = {**svdq_env, "SVDQ_QUEUE": queue}  # no worker reads it yet: the jobs wait
    src, out = tmp_path / "src", tmp_path / "out"
    for n in range(3):
        picture(src / f"p{n}.png", 30 + 60 * n)
    running = following(env, queue, 3, str(src), "--out", str(out), *SIZE)
    running.send_signal(signal.SIGINT)
    _, stderr = running.communicate(timeout=30)
    assert running.returncode == 130, stderr
    assert "the unfinished jobs go on: run the same command again to resume" in stderr and "Traceback" not in stderr
    assert {line["state"] for line in report(out).values()} == {"queued"}

    start_worker(queue=queue)
    rerun = bulk(env, str(src), "--out", str(out), *SIZE, "--json")
    summary = json.loads(rerun.stdout)
    assert rerun.returncode == 0 and summary["jobs_submitted"] == 0 and summary["jobs_found"] == 3, rerun.stderr
    assert sorted(p.name for p in out.glob("*.mp4")) == ["p0.mp4", "p1.mp4", "p2.mp4"]


def test_skip_invalid_and_no_wait_submit_the_good_rows_and_report_the_bad_ones(
    svdq_env: dict[str, str], tmp_path: Path
) -> None:
    env = {**svdq_env, "SVDQ_QUEUE": f"bulk-{uuid.uuid4().hex[:8]}"}  # no worker: --no-wait must not wait
    picture(tmp_path / "ok.png", 197)  # shades no other test uses: inputs are keyed by their content
    picture(tmp_path / "also-ok.png", 241)
    csv = tmp_path / "rows.csv"
    csv.write_text("image,frames\nok.png,4\nmissing.png,4\nalso-ok.png,999\nalso-ok.png,4\n")
    out = tmp_path / "out"
    jobs_before = job_count(env)
    run = bulk(env, str(csv), "--out", str(out), *SIZE, "--skip-invalid", "--no-wait", "--json", timeout=60)
    summary = json.loads(run.stdout)
    assert summary["jobs_submitted"] == 2 and job_count(env) - jobs_before == 2, run.stderr
    lines = [json.loads(line) for line in (out / "svdq-bulk.jsonl").read_text().splitlines()]
    assert sorted(line["state"] for line in lines) == ["failed", "failed", "queued", "queued"]
    bad = {line["error"]["message"] for line in lines if line["state"] == "failed"}
    assert bad == {"image: no such file: missing.png", "frames: must be 1 to 128 (got 999)"}
    assert run.returncode == 1  # the summary names the two bad rows; the good ones wait for a worker
    assert not list(out.glob("*.mp4"))


def test_cancel_on_interrupt_cancels_what_is_unfinished(svdq_env: dict[str, str], tmp_path: Path) -> None:
    queue = f"bulk-{uuid.uuid4().hex[:8]}"
    env = {**svdq_env, "SVDQ_QUEUE": queue}
    src, out = tmp_path / "src", tmp_path / "out"
    for n in range(2):
        picture(src / f"p{n}.png", 11 + 50 * n)
    running = following(env, queue, 2, str(src), "--out", str(out), *SIZE, "--cancel-on-interrupt")
    running.send_signal(signal.SIGINT)
    _, stderr = running.communicate(timeout=30)
    assert running.returncode == 130 and "canceled 2 unfinished jobs" in stderr, stderr
    lines = report(out).values()
    assert {line["state"] for line in lines} == {"canceled"}
    with Client.from_env(queue=queue) as client:
        assert {client.job(line["job_id"]).status().state.value for line in lines} == {"canceled"}


def run_of_queued_jobs(client: Client, tmp_path: Path, count: int) -> tuple[Run, Path]:
    """A run over `count` pictures, each followed as a queued job of its own that no worker will take."""
    src, out = tmp_path / "src", tmp_path / "out"
    for n in range(count):
        picture(src / f"p{n}.png", 10 * n)
    out.mkdir()
    run = Run(client, read_inputs(src), out, priority="low", retry_failed=False)
    for outcome in run.outcomes:
        job_id = uuid.uuid4().hex
        client.records.create(job_id, {"image": "x"})
        outcome.job = client.job(job_id)
    return run, out


def test_following_reads_a_job_s_whole_record_once_it_has_ended(svdq_env: dict[str, str], tmp_path: Path) -> None:
    """While jobs wait and run, a poll reads their states alone: polls read up to 2,000 whole records every half
    second, megabytes a second out of Redis for each run. A Redis of its own, to count its commands."""
    server = LocalRedis(tmp_path / "redis")
    try:
        with Client.from_env(redis_url=server.start()) as client:
            run, out = run_of_queued_jobs(client, tmp_path, 20)

            def cancel_later() -> None:
                time.sleep(1)  # about 20 polls
                for outcome in run.outcomes:
                    assert outcome.job is not None
                    client.records.transition(outcome.job.id, JobState.CANCELED)

            hgetalls = lambda: client.redis.info("commandstats").get("cmdstat_hgetall", {}).get("calls", 0)  # noqa: E731
            before = hgetalls()
            canceler = threading.Thread(target=cancel_later)
            canceler.start()
            run.follow(poll=0.05)
            run.close()
            canceler.join()
            read = hgetalls() - before
    finally:
        server.stop()
    assert {line["state"] for line in report(out).values()} == {"canceled"}
    assert read == 20


def test_unfinished_jobs_are_reported_a_batch_of_records_at_a_time(
    client: Client, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--no-wait on a 100,000-row manifest read every unfinished job's whole record before writing a line: 400 MB
    held at once (bench/bulk_submit.py --manifest-rows 100000: 584 MB peak, 178 MB a batch at a time)."""
    import producer.bulk

    run, out = run_of_queued_jobs(client, tmp_path, 5)
    monkeypatch.setattr(producer.bulk, "READ_BATCH", 2)
    get_many, reads = client.records.get_many, []

    def counted(ids: list[str]) -> Any:
        written = (out / "svdq-bulk.jsonl").read_text().count("\n") if (out / "svdq-bulk.jsonl").exists() else 0
        reads.append((len(ids), written))
        return get_many(ids)

    monkeypatch.setattr(client.records, "get_many", counted)
    run.finish_report()
    run.close()
    assert reads == [(2, 0), (2, 2), (1, 4)]  # each batch's lines written before the next batch is read
    assert [line["state"] for line in report(out).values()] == ["queued"] * 5


def test_an_interrupted_run_reports_what_its_unfinished_jobs_last_said(client: Client, tmp_path: Path) -> None:
    """Polls read states alone: the report of a run stopped by Ctrl-C still gives a retrying job's error."""
    src, out = tmp_path / "src", tmp_path / "out"
    picture(src / "p.png", 99)
    out.mkdir()
    job_id = uuid.uuid4().hex
    client.records.create(job_id, {"image": "x"})
    client.records.claim(job_id, "w/1", lease_seconds=30)
    error = {"code": "storage_unavailable", "message": "storage unreachable"}
    client.records.transition(job_id, JobState.QUEUED, fence=1, error=error, stage="retrying")

    def interrupt(waiting: Any) -> None:
        raise KeyboardInterrupt

    run = Run(client, read_inputs(src), out, priority="low", retry_failed=False, on_poll=interrupt)
    run.outcomes[0].job = client.job(job_id)
    with pytest.raises(KeyboardInterrupt):
        run.follow(poll=0.05)
    run.finish_report()
    run.close()
    [line] = report(out).values()
    assert line["state"] == "queued" and line["error"] == error


def test_a_batched_message_is_the_one_celery_writes(client: Client) -> None:
    """submit_many pushes messages it builds itself (producer.wire): they must stay what Celery would send."""
    queue = f"wire-{uuid.uuid4().hex[:8]}"
    request = {"image": "inputs/x.png", "num_frames": 4, "seed": None}
    send_job(client.celery, "wire-job-1", request, queue)
    client.redis.lpush(queue, wire.message("wire-job-1", request, queue))
    ours = json.loads(client.redis.lpop(queue))  # LPUSH: the newest is first
    celerys = json.loads(client.redis.lpop(queue))
    for message in (ours, celerys):
        message["properties"].pop("delivery_tag")  # a fresh uuid each
        message["properties"].pop("reply_to")  # Celery's per-thread oid; unused (no result backend)
        message["properties"].pop("kwargsrepr", None)  # send_task's option, copied there too; the header counts
    assert ours == celerys


def test_a_creation_retried_after_a_lost_reply_still_enqueues_its_job(
    client: Client, image_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """redis-py retries a command whose reply was lost to a dropped connection: the record was written the first
    time, so the retry answers "key taken" naming the job itself. That job must still get its message."""
    queue = f"retried-{uuid.uuid4().hex[:8]}"
    client.settings.queue = queue
    create, create_many = client.records.create, client.records.create_many

    def twice(*args: Any, **kwargs: Any) -> Any:
        create(*args, **kwargs)  # the reply that was lost
        return create(*args, **kwargs)

    def twice_many(creations: list[dict[str, Any]]) -> Any:
        create_many(creations)
        return create_many(creations)

    monkeypatch.setattr(client.records, "create", twice)
    monkeypatch.setattr(client.records, "create_many", twice_many)
    job = client.submit(image_file, idempotency_key=uuid.uuid4().hex, **PARAMS_SMALL)
    submitted = list(
        client.submit_many(
            [Submission(image_file, {"seed": 1}, uuid.uuid4().hex), Submission(image_file, {"seed": 2})], **PARAMS_SMALL
        )
    )
    assert all(s.job is not None and not s.existed for s in submitted)
    queued = [json.loads(m)["headers"]["id"] for m in client.redis.lrange(queue, 0, -1)]
    assert sorted(queued) == sorted([job.id, *(s.job.id for s in submitted if s.job)])


def test_a_batch_that_fails_halfway_leaves_no_record_without_its_message(client: Client, image_file: Path) -> None:
    """One job of a batch cannot be enqueued (its model's queue key holds a string): that job writes nothing,
    the others are queued with their messages, and the error reaches the caller at that job."""
    queue = f"halfway-{uuid.uuid4().hex[:8]}"
    client.settings.queue = queue
    client.redis.set(f"{queue}@broken", "not a list")
    ids = [uuid.uuid4().hex for _ in range(3)]
    submissions = [
        Submission(image_file, {"seed": 1}, ids[0]),
        Submission(image_file, {"seed": 2, "model": "broken"}, ids[1]),
        Submission(image_file, {"seed": 3}, ids[2]),
    ]
    submitted = []
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        for s in client.submit_many(submissions, **PARAMS_SMALL):
            submitted.append(s)
    assert [s.submission.idempotency_key for s in submitted] == [ids[0]]
    held = {key: client.redis.get(keys.idempotency(key)) for key in ids}
    assert held[ids[1]] is None  # the broken one: no key, no record
    jobs = [client.job(held[key].decode()) for key in (ids[0], ids[2])]  # type: ignore[union-attr]
    assert [job.status().state.value for job in jobs] == ["queued", "queued"]
    queued = [json.loads(m)["headers"]["id"] for m in client.redis.lrange(queue, 0, -1)]
    assert sorted(queued) == sorted(job.id for job in jobs)


def test_an_interrupted_submit_many_hands_out_every_job_it_created(client: Client, image_file: Path) -> None:
    """Ctrl-C while the next batch is prepared: the batch already being written exists, so its jobs are handed
    out before the interrupt (for `svdq bulk` to follow or cancel them), none left unknown in the queue."""
    queue = f"interrupted-{uuid.uuid4().hex[:8]}"
    client.settings.queue = queue

    def submissions() -> Iterator[Submission]:
        for n in range(5):
            yield Submission(image_file, {"seed": n}, uuid.uuid4().hex)
        raise KeyboardInterrupt  # as Ctrl-C lands while the second batch is read

    handed: list[Any] = []
    with pytest.raises(KeyboardInterrupt):
        for submitted in client.submit_many(submissions(), batch_size=5, **PARAMS_SMALL):
            handed.append(submitted)
    queued = [json.loads(m)["headers"]["id"] for m in client.redis.lrange(queue, 0, -1)]
    assert len(queued) == 5 and sorted(s.job.id for s in handed if s.job) == sorted(queued)


def test_a_submit_that_cannot_be_enqueued_writes_nothing(client: Client, image_file: Path) -> None:
    """Client.submit writes the record and its message in one script too: when the message cannot go (the
    model's queue key holds a string), there is no record, and the idempotency key stays free."""
    queue, key = f"single-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    client.settings.queue = queue
    client.redis.set(f"{queue}@broken", "not a list")
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        client.submit(image_file, idempotency_key=key, model="broken", **PARAMS_SMALL)
    assert client.redis.get(keys.idempotency(key)) is None
    job = client.submit(image_file, idempotency_key=key, **PARAMS_SMALL)  # the key is free for a good submit
    assert job.status().state.value == "queued"
    assert [json.loads(m)["headers"]["id"] for m in client.redis.lrange(queue, 0, -1)] == [job.id]


def test_retry_failed_submits_a_failed_input_once_a_run(
    svdq_env: dict[str, str], worker: WorkerProcess, tmp_path: Path
) -> None:
    manifest = tmp_path / "m.jsonl"
    missing = f"s3://svdq-test/renders/missing-{uuid.uuid4().hex}.png"  # fails in the worker, every time
    manifest.write_text(json.dumps({"image": missing, "output": "gone"}) + "\n")
    jobs_before = job_count(svdq_env)
    first = bulk(svdq_env, str(manifest), "--out", str(tmp_path / "out"), *SIZE, "--json")
    assert first.returncode == 1 and job_count(svdq_env) - jobs_before == 1
    [line] = report(tmp_path / "out").values()
    assert line["state"] == "failed" and line["error"]["code"] == "invalid_input"
    again = bulk(svdq_env, str(manifest), "--out", str(tmp_path / "out"), *SIZE, "--json", "--retry-failed")
    assert again.returncode == 1 and job_count(svdq_env) - jobs_before == 2  # one more try, then the run ends
    [line] = report(tmp_path / "out").values()
    assert line["state"] == "failed" and line["job_id"] != json.loads(first.stdout)["failed"][0]["job_id"]
    third = bulk(svdq_env, str(manifest), "--out", str(tmp_path / "out"), *SIZE, "--json", "--retry-failed")
    assert third.returncode == 1 and job_count(svdq_env) - jobs_before == 3


def test_links_planted_in_out_are_refused_or_passed_by_never_followed(
    svdq_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A link at OUT/svdq-bulk.jsonl had its target emptied and the report written into it; one at the write test's
    name (`.svdq-write-test-PID`, known in advance) had its target emptied."""
    src, out = tmp_path / "src", tmp_path / "out"
    picture(src / "p.png", 203)
    out.mkdir()
    report_victim, probe_victim = tmp_path / "report-victim.txt", tmp_path / "probe-victim.txt"
    for victim in (report_victim, probe_victim):
        victim.write_text("precious")
    (out / "svdq-bulk.jsonl").symlink_to(report_victim)
    queue = f"bulk-{uuid.uuid4().hex[:8]}"  # no worker: nothing renders
    jobs_before = job_count(svdq_env)
    run = bulk({**svdq_env, "SVDQ_QUEUE": queue}, str(src), "--out", str(out), *SIZE, "--no-wait", timeout=60)
    assert run.returncode == 2 and job_count(svdq_env) == jobs_before, run.stderr
    says = "is a link: svdq writes its report only into a file; remove it, or use another --out"
    assert run.stderr == f"svdq: {out}/svdq-bulk.jsonl {says}\n"
    assert report_victim.read_text() == "precious"

    # In this process, to plant a link at its write test's name.
    (out / "svdq-bulk.jsonl").unlink()
    (out / f".svdq-write-test-{os.getpid()}").symlink_to(probe_victim)
    monkeypatch.setenv("SVDQ_QUEUE", queue)
    with pytest.raises(SystemExit) as exited:
        cli.main(["bulk", str(src), "--out", str(out), *SIZE, "--no-wait", "--json"])
    assert exited.value.code == 0, capsys.readouterr()
    assert probe_victim.read_text() == "precious"
    assert [line["state"] for line in report(out).values()] == ["queued"]


def test_references_a_submit_refuses_are_manifest_problems_and_a_bad_image_fails_its_own_line(
    svdq_env: dict[str, str], tmp_path: Path
) -> None:
    """Another bucket, a metadata service and a file over SVDQ_MAX_IMAGE_BYTES were refused at submit only, after
    the good rows had been submitted; a file that is no image is still its own line's failure, at submit."""
    env = {**svdq_env, "SVDQ_QUEUE": f"bulk-{uuid.uuid4().hex[:8]}", "SVDQ_MAX_IMAGE_BYTES": "20000"}
    picture(tmp_path / "d.png", 217)
    (tmp_path / "big.png").write_bytes(picture(tmp_path / "big.bmp", 1, "BMP").read_bytes() + bytes(20000))
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    rows = [
        "d.png",
        "s3://otherbucket/secret.png",
        "http://169.254.169.254/latest/meta-data/iam",
        "big.png",
        "corrupt.png",
    ]
    manifest = tmp_path / "m.csv"
    manifest.write_text("image\n" + "\n".join(rows) + "\n")
    out = tmp_path / "out"
    jobs_before = job_count(env)
    run = bulk(env, str(manifest), "--out", str(out), *SIZE)
    assert run.returncode == 2 and job_count(env) == jobs_before and not out.exists(), run.stderr
    assert run.stderr.splitlines()[1:-1] == [
        "  line 3: image: no image at s3://otherbucket/secret.png that this service may read",
        "  line 4: image: 169.254.169.254 resolves to a non-public address (169.254.169.254)",
        "  line 5: image: larger than SVDQ_MAX_IMAGE_BYTES=20000",
    ]
    run = bulk(env, str(manifest), "--out", str(out), *SIZE, "--skip-invalid", "--no-wait", "--json", timeout=60)
    assert run.returncode == 1 and job_count(env) - jobs_before == 1, run.stderr
    lines = report(out)
    assert lines["d.png"]["state"] == "queued"
    corrupt = lines["corrupt.png"]
    assert (corrupt["state"], corrupt["error"]["code"], corrupt["job_id"]) == ("failed", "invalid_input", None)
    assert "is not an image svdq can read" in corrupt["error"]["message"]
    assert [lines[row]["error"]["code"] for row in rows[1:4]] == ["invalid_input"] * 3


def test_images_come_from_the_manifest_s_folder_unless_images_root_widens_it(
    svdq_env: dict[str, str], tmp_path: Path
) -> None:
    """`../private/secret.png` and `/tmp/private/secret.png` were read and uploaded to the shared store."""
    env = {**svdq_env, "SVDQ_QUEUE": f"bulk-{uuid.uuid4().hex[:8]}"}
    secret = picture(tmp_path / "private" / "secret.png", 229)
    manifest = tmp_path / "jobs" / "m.csv"
    manifest.parent.mkdir()
    manifest.write_text(f"image,output\n../private/secret.png,one\n{secret},two\n")
    jobs_before = job_count(env)
    run = bulk(env, str(manifest), "--out", str(tmp_path / "out"), *SIZE)
    assert run.returncode == 2 and job_count(env) == jobs_before, run.stderr
    where = f"leads outside {manifest.parent.resolve()}, where images are read from (--images-root DIR names another)"
    assert f"line 2: image: '../private/secret.png' {where}" in run.stderr
    assert f"line 3: image: '{secret}' {where}" in run.stderr and "Traceback" not in run.stderr
    run = bulk(env, str(manifest), "--out", str(tmp_path / "out"), *SIZE, "--images-root", str(tmp_path / "nowhere"))
    assert run.returncode == 2 and run.stderr == f"svdq: --images-root {tmp_path / 'nowhere'}: not a folder\n"
    widened = ["--images-root", str(tmp_path), "--no-wait", "--json"]
    run = bulk(env, str(manifest), "--out", str(tmp_path / "out"), *SIZE, *widened, timeout=60)
    assert run.returncode == 0 and job_count(env) - jobs_before == 1, run.stderr  # one image, one job
    assert json.loads(run.stdout)["states"] == {"queued": 2}


def test_outputs_that_cannot_be_written_are_refused_first_or_fail_their_own_line(
    svdq_env: dict[str, str], worker: WorkerProcess, tmp_path: Path
) -> None:
    """A file and a folder of one name, a name over 255 bytes and a NUL were each a traceback once the videos had
    rendered; a folder where a video goes, found only then, failed the whole run, its other jobs unfollowed."""
    picture(tmp_path / "x.png", 233)
    picture(tmp_path / "y.png", 239)
    bad = tmp_path / "bad.jsonl"
    outputs = ["a", "a.mp4/b", "n" * 300, "nul\x00"]
    bad.write_text(
        "".join(json.dumps({"image": "x.png", "output": o, "seed": n}) + "\n" for n, o in enumerate(outputs))
    )
    jobs_before = job_count(svdq_env)
    run = bulk(svdq_env, str(bad), "--out", str(tmp_path / "out"), *SIZE)
    assert run.returncode == 2 and job_count(svdq_env) == jobs_before and "Traceback" not in run.stderr, run.stderr
    assert [line.split(":")[0] for line in run.stderr.splitlines()[1:-1]] == ["  line 2", "  line 3", "  line 4"]

    out = tmp_path / "out"
    (out / "blocked.mp4").mkdir(parents=True)  # where a video goes: a folder, found only when writing it
    good = tmp_path / "good.csv"
    good.write_text("image,output\nx.png,blocked\ny.png,fine\n")
    run = bulk(svdq_env, str(good), "--out", str(out), *SIZE, "--json")
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr
    lines = report(out)
    assert (lines["y.png"]["state"], lines["y.png"]["output"]) == ("succeeded", str(out / "fine.mp4"))
    assert (out / "fine.mp4").is_file()
    blocked = lines["x.png"]
    assert (blocked["state"], blocked["output"], blocked["error"]["code"]) == ("failed", None, "output_unwritable")
    assert blocked["error"]["message"] == f"cannot write {out / 'blocked.mp4'}: Is a directory"
    assert [line["input"] for line in json.loads(run.stdout)["failed"]] == ["x.png"]
