"""`make demo`, the README's first command, as a user on a fresh machine runs it: `svdq demo` with no svdq
settings at all starts its own Redis, builds the tiny model, starts a worker, renders and stops them."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.integration.conftest import SVDQ, probe

pytestmark = pytest.mark.integration


def test_svdq_demo_renders_an_example_with_nothing_configured(tmp_path: Path) -> None:
    env = {name: value for name, value in os.environ.items() if not name.startswith(("SVDQ_", "AWS_"))}
    run = subprocess.run([SVDQ, "demo"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=280)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "started redis-server" in run.stderr and "done: the video is at" in run.stderr
    frames, stream = probe((tmp_path / "svdq-demo.mp4").read_bytes(), tmp_path)
    assert frames == 8 and stream["size"] == (64, 64)  # the demo's tiny-model job
    leftover = subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True, text=True)
    assert leftover.stdout == "", "the demo left a process of its folder running (its redis-server)"
