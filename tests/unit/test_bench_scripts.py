"""The benchmarks stay runnable: their smallest forms, one JSON line per figure, ratios present."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"


def run(script: str, *args: str) -> list[dict]:
    run = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    assert lines and all({"bench", "figure", "value"} <= set(line) for line in lines)
    return lines


def test_encode_bench_reports_speed_and_size_ratios() -> None:
    figures = {line["figure"]: line["value"] for line in run("encode.py", "--repeat", "1", "--frames", "3")}
    assert {"speedup", "size_ratio", "stock_seconds", "svdq_seconds", "svdq_psnr_db"} <= set(figures)
    assert figures["svdq_bytes"] > 0 and figures["stock_bytes"] > 0


def test_gpu_bench_runs_small_on_a_cpu() -> None:
    lines = run("gpu_svd.py", "--small", "--repeat", "1", "--no-compile")
    paths = {line["path"] for line in lines}
    assert paths == {"stock decode_chunk_size=8", "svdq"}
    assert any(line["figure"] == "speedup_vs_stock" for line in lines)
