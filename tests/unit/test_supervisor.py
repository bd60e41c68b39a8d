"""`svdq worker --gpus`: which GPUs, and the supervision of one real child process per GPU."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from worker.startup import LOAD_FAILED
from worker.supervisor import NoGPU, Supervisor, parse_gpus, worker_command


def test_gpus_takes_all_or_distinct_indices_of_gpus_that_exist() -> None:
    assert parse_gpus("all", 4) == [0, 1, 2, 3]
    assert parse_gpus("0,1,3", 4) == [0, 1, 3]
    for bad in ("4", "0,0", "x", ""):
        with pytest.raises(NoGPU):
            parse_gpus(bad, 4)
    with pytest.raises(NoGPU, match="without --gpus"):
        parse_gpus("all", 0)


def test_each_child_is_pinned_named_and_given_its_own_metrics_port() -> None:
    argv, env = worker_command(3, ["--loglevel=DEBUG"], {"SVDQ_METRICS_PORT": "9100", "PATH": "/bin"})
    assert env["CUDA_VISIBLE_DEVICES"] == "3" and env["SVDQ_METRICS_PORT"] == "9103"
    assert argv[1:] == ["-m", "worker", "--hostname=gpu3@%h", "--loglevel=DEBUG"]


def sleeper(gpu: int) -> tuple[list[str], dict[str, str]]:
    return [sys.executable, "-c", "import time; time.sleep(120)"], {**os.environ, "CUDA_VISIBLE_DEVICES": str(gpu)}


def wait_for(predicate, timeout: float = 20) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_a_crashed_child_is_restarted_and_stop_ends_them_all() -> None:
    supervisor = Supervisor([0, 1], sleeper, backoff_max=1)
    result: list[int] = []
    runner = threading.Thread(target=lambda: result.append(supervisor.run(poll=0.05)))
    runner.start()
    wait_for(lambda: all(c.proc is not None for c in supervisor.children))
    first, second = supervisor.children
    assert first.proc is not None and second.proc is not None
    crashed, untouched = first.proc, second.proc
    crashed.kill()
    wait_for(lambda: first.proc is not crashed and first.proc is not None and first.proc.poll() is None)
    assert second.proc is untouched and untouched.poll() is None
    supervisor.stop()
    runner.join(20)
    assert result == [0]
    assert all(c.proc is not None and c.proc.returncode == -signal.SIGTERM for c in supervisor.children)


@pytest.mark.parametrize(("code", "says"), [(LOAD_FAILED, "its model failed to load"), (2, "its store refused it")])
def test_a_child_whose_model_cannot_load_is_retried_with_growing_waits_and_named(
    caplog: pytest.LogCaptureFixture, code: int, says: str
) -> None:
    def failing(gpu: int) -> tuple[list[str], dict[str, str]]:
        return [sys.executable, "-c", f"raise SystemExit({code})"], dict(os.environ)

    supervisor = Supervisor([0], failing, backoff_max=2)
    runner = threading.Thread(target=lambda: supervisor.run(poll=0.05))
    with caplog.at_level("ERROR", logger="worker.supervisor"):
        runner.start()
        wait_for(lambda: supervisor.children[0].failures >= 3)
        supervisor.stop()
        runner.join(20)
    messages = [r.getMessage() for r in caplog.records]
    assert all(says in m for m in messages)
    assert "restarting in 1s" in messages[0] and "restarting in 2s" in messages[1]  # backs off, capped at 2
    assert "failure 2 in a row" in messages[1]


def test_sigterm_to_the_supervisors_process_stops_every_child(tmp_path: Path) -> None:
    code = (
        "import sys; from worker.supervisor import Supervisor, run_until_signalled; "
        "from tests.unit.test_supervisor import pid_writer; "
        "sys.exit(run_until_signalled(Supervisor([0, 1], pid_writer(sys.argv[1]))))"
    )
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], cwd=root)
    try:
        wait_for(lambda: len(list(tmp_path.iterdir())) == 2)
        children = [int(p.name) for p in tmp_path.iterdir()]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        for pid in children:  # each child was stopped and reaped, not left running in its own session
            wait_for(lambda pid=pid: not alive(pid))
    finally:
        proc.kill()


def pid_writer(folder: str):  # type: ignore[no-untyped-def]
    def command(gpu: int) -> tuple[list[str], dict[str, str]]:
        child = f"import os, time; open(os.path.join({folder!r}, str(os.getpid())), 'w').close(); time.sleep(120)"
        return [sys.executable, "-c", child], {**os.environ, "CUDA_VISIBLE_DEVICES": str(gpu)}

    return command


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
