"""The benchmarks stay runnable: their smallest forms, one JSON line per figure, ratios present."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parents[2] / "bench"


def run(script: str, *args: str, env: dict[str, str] | None = None) -> list[dict]:
    run = subprocess.run(
        [sys.executable, str(BENCH / script), *args],
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, **(env or {})},
    )
    assert run.returncode == 0, run.stderr[-3000:]
    lines = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    assert lines and all({"bench", "figure", "value"} <= set(line) for line in lines)
    return lines


def test_encode_bench_reports_speed_and_size_ratios() -> None:
    figures = {line["figure"]: line["value"] for line in run("encode.py", "--repeat", "1", "--frames", "3")}
    assert {"speedup", "size_ratio", "stock_seconds", "svdq_seconds", "svdq_psnr_db"} <= set(figures)
    assert figures["svdq_bytes"] > 0 and figures["stock_bytes"] > 0


def test_gpu_bench_runs_small_on_a_cpu() -> None:
    lines = run(
        "gpu_svd.py",
        "--small",
        "--repeat",
        "1",
        "--variants",
        "cudnn_benchmark,vae_compile",
        "--profile",
        "3",
        env={"SVDQ_COMPILE_BACKEND": "aot_eager", "SVDQ_DEVICE": "cpu"},  # on a GPU host too: the CPU's form
    )
    figures = {(line["path"], line["figure"]): line["value"] for line in lines}
    paths = {"load", "stock", "lowvram", "svdq", "svdq_cudnn_benchmark", "vae_compile", "profile"}
    assert {line["path"] for line in lines} == paths
    assert figures[("vae_compile", "decode_ms_per_frame_chunk4_compiled")] > 0
    assert [line["figure"] for line in lines if line["path"] == "profile"].count("kernel_ms") == 3
    for path in ("lowvram", "svdq"):
        assert figures[(path, "speedup_vs_stock")] > 0 and figures[(path, "cold_start_seconds")] > 0
        assert figures[(path, "checkpoints")] > 0  # timed with a job's cancel checks, as a worker runs it
        assert {"total", "denoise", "decode", "encode", "decode_chunk_size"} <= {f for p, f in figures if p == path}


def test_svdq_bench_prints_a_table_or_json_lines() -> None:
    svdq = str(Path(sys.executable).with_name("svdq"))
    table = subprocess.run(
        [svdq, "bench", "--small", "--paths", "stock,svdq"],
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "SVDQ_DEVICE": "cpu"},  # --small is the CPU's form (a GPU host compiles by default)
    )
    assert table.returncode == 0, table.stderr[-3000:]
    rows = {line.split()[0]: line.split() for line in table.stdout.splitlines()[2:]}
    assert set(rows) == {"stock", "svdq"} and float(rows["svdq"][1]) > 0  # total seconds
    bad = subprocess.run([svdq, "bench", "--paths", "turbo"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "unknown turbo" in bad.stderr


def test_fuzz_bench_finds_no_escape_in_its_smallest_form() -> None:
    lines = run("fuzz_images.py", "--cases", "300", "--worker-sample", "0")
    figures = {line["figure"]: line["value"] for line in lines}
    assert figures["submit_escapes"] == 0 and figures["worker_escapes"] == 0
    assert 0 < figures["submit_refused"] < 300 and figures["cases_per_second"] > 0


def test_bulk_submit_bench_compares_submit_many_with_the_loop() -> None:
    figures = {line["figure"]: line for line in run("bulk_submit.py", "--jobs", "200", "--manifest-rows", "300")}
    assert figures["speedup"]["store"] == "s3" and figures["speedup"]["value"] > 0
    assert figures["manifest_rows"]["value"] == 300 and figures["manifest_peak_rss_mb"]["value"] > 0


def test_gateway_bench_reports_rate_latency_and_stream_memory() -> None:
    figures = {
        line["figure"]: line["value"] for line in run("gateway.py", "--posts", "64", "--clients", "2", "--streams", "5")
    }
    assert figures["posts"] == 64 and figures["posts_per_second"] > 0 and figures["post_p99_ms"] > 0
    assert figures["open_streams"] == 5 and figures["rss_with_streams_mib"] > 0


def test_bulk_submit_bench_can_put_redis_a_round_trip_away() -> None:
    lines = run("bulk_submit.py", "--jobs", "100", "--store", "file", "--redis-rtt-ms", "4")
    figures = {line["figure"]: line for line in lines}
    assert figures["speedup"]["redis_rtt_ms"] == 4
    assert figures["loop_jobs_per_second"]["value"] < 250  # each submit of the loop waits a whole round trip


def test_cancel_bench_runs_and_reports_both_paths() -> None:
    # Steps long enough to be seen twice at the record's four writes a second, on a GPU host's tiny model too.
    size = ["--width", "256", "--height", "256", "--frames", "8", "--steps", "200"] if torch.cuda.is_available() else []
    lines = run(
        "cancel_latency.py", "--frames", "4", "--width", "64", "--height", "64", "--steps", "60", *size, "--repeat", "1"
    )
    figures = {(line["path"], line["figure"]): line["value"] for line in lines}
    assert figures[("svdq", "cancel_to_free_seconds_max")] > 0 and figures[("step_end", "step_seconds")] > 0
    assert figures[("svdq", "ratio_to_step_end")] > 0


def test_unet_graph_count_shows_blocks_sharing_graphs() -> None:
    lines = run("unet_graphs.py", "--tiny", "--width", "64", "--height", "64", "--frames", "4")
    figures = {line["figure"]: line["value"] for line in lines}
    # The tiny UNet's 18 regions, at one shape: instances of a block class at the same shapes share a graph.
    assert figures["regions"] == 18 and 0 < figures["graphs"] < figures["regions"]
    assert figures["regions_per_graph"] == figures["regions"] / figures["graphs"]
