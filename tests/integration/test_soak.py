"""The chaos soak's short form (bench/soak.py): every fault at least once, overlapping, with every check held.

It starts its own redis-server, S3 server, proxy and workers, so it shares nothing with the other tests.
The long run and its figures are in docs/RELIABILITY.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.conftest import not_measured

pytestmark = pytest.mark.integration
SOAK = Path(__file__).resolve().parents[2] / "bench" / "soak.py"


def test_a_short_soak_loses_nothing(tmp_path: Path, tiny_model: Path) -> None:
    command = [sys.executable, str(SOAK), "--jobs", "30", "--workers", "2", "--minutes", "1.3", "--seed", "3"]
    soak = subprocess.Popen(
        [*command, "--drain-minutes", "1.5", "--model", str(tiny_model), "--workdir", str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=not_measured(os.environ),  # its workers restart dozens of times: tracing them only costs time
    )
    try:
        stdout, stderr = soak.communicate(timeout=280)
    except subprocess.TimeoutExpired:
        soak.terminate()  # it stops its workers, servers and proxy on SIGTERM
        stdout, stderr = soak.communicate(timeout=90)
    lines = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    checks = {line["check"]: line for line in lines if "check" in line}
    failed = {name: line for name, line in checks.items() if not line["ok"]}
    assert not failed, (failed, stderr[-3000:])
    assert soak.returncode == 0, stderr[-3000:]
    assert len(checks) == 11
    struck = {line["fault"] for line in lines if "fault" in line}
    assert struck == {"kill_worker", "kill_pool", "term_worker", "restart_redis", "cut_storage"}
    states = next(line for line in lines if line.get("figure") == "final_states")["value"]
    assert sum(states.values()) == 30
