"""`svdq worker --gpus all|0,1,3`: one worker process per GPU on this host, each pinned to its GPU.

Each child is a whole `svdq worker` (its own Celery main process and pool process) with
`CUDA_VISIBLE_DEVICES` set to one GPU and the hostname `gpuN@host`, so Flower and `svdq top` show one worker
per GPU. A child that exits on its own (a crash, a CUDA error that kills the process) is started again after a
backoff; the job it ran comes back through its lease (worker.recovery). SIGTERM and SIGINT are passed on to
every child, whose warm shutdown and grace period (SVDQ_STOP_GRACE) then run as for a single worker.

Children are new processes, not forks: CUDA, initialised here to count the GPUs, is never inherited.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from worker.startup import LOAD_FAILED

log = logging.getLogger(__name__)


class NoGPU(RuntimeError):
    pass


def parse_gpus(spec: str, available: int) -> list[int]:
    """`all` or a comma list of GPU indices, checked against the `available` count."""
    if available < 1:
        raise NoGPU(
            "--gpus needs CUDA GPUs and this machine shows none (torch.cuda.device_count() == 0); "
            "run `svdq worker` without --gpus for one worker on the CPU"
        )
    if spec == "all":
        return list(range(available))
    try:
        wanted = [int(part) for part in spec.split(",") if part.strip()]
    except ValueError:
        raise NoGPU(f"--gpus takes `all` or indices like 0,1,3 (got {spec!r})") from None
    missing = [i for i in wanted if not 0 <= i < available]
    if not wanted or missing or len(set(wanted)) != len(wanted):
        raise NoGPU(f"--gpus {spec!r}: this machine has GPUs 0..{available - 1}")
    return wanted


@dataclass
class Child:
    gpu: int
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    failures: int = 0


# Exit codes a worker gives a reason for, as the last line of its output (worker.__main__).
WHY = {
    LOAD_FAILED: "its model failed to load (the reason ends its log)",
    2: "it refused its settings or its store refused it (the reason ends its log)",
}


class Supervisor:
    """Runs `command(gpu)` for each GPU, restarts children that exit on their own, stops them on request."""

    def __init__(
        self,
        gpus: Sequence[int],
        command: Callable[[int], tuple[list[str], dict[str, str]]],
        *,
        backoff_max: float = 60.0,
        stable_after: float = 300.0,
    ):
        self.children = [Child(gpu) for gpu in gpus]
        self.command = command
        self.backoff_max, self.stable_after = backoff_max, stable_after
        self.stopping = threading.Event()

    def _start(self, child: Child) -> None:
        argv, env = self.command(child.gpu)
        child.proc = subprocess.Popen(argv, env=env, start_new_session=True)  # signals come from us only
        child.started = time.monotonic()
        log.info("gpu%d: worker started (pid %d)", child.gpu, child.proc.pid)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        self.stopping.set()
        for child in self.children:
            if child.proc is not None and child.proc.poll() is None:
                child.proc.send_signal(sig)

    def run(self, poll: float = 0.5) -> int:
        for child in self.children:
            self._start(child)
        restart_at: dict[int, float] = {}
        while not self.stopping.is_set():
            now = time.monotonic()
            for child in self.children:
                assert child.proc is not None
                if child.gpu in restart_at:
                    if now >= restart_at[child.gpu]:
                        del restart_at[child.gpu]
                        self._start(child)
                    continue
                code = child.proc.poll()
                if code is None:
                    continue
                # A child that ran a while before dying starts afresh; one that keeps dying waits longer.
                child.failures = 1 if now - child.started > self.stable_after else child.failures + 1
                delay = min(self.backoff_max, 2.0 ** (child.failures - 1))
                why = WHY.get(code, f"exit {code}")
                log.error(
                    "gpu%d: worker stopped, %s; failure %d in a row, restarting in %.0fs (backing off up to %.0fs)",
                    child.gpu,
                    why,
                    child.failures,
                    delay,
                    self.backoff_max,
                )
                restart_at[child.gpu] = now + delay
            self.stopping.wait(poll)
        codes = [child.proc.wait() for child in self.children if child.proc is not None]
        log.info("all GPU workers stopped (exit codes %s)", codes)
        return 0


def worker_command(gpu: int, argv: list[str], base_env: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    env = {**base_env, "CUDA_VISIBLE_DEVICES": str(gpu)}
    if metrics := base_env.get("SVDQ_METRICS_PORT"):
        env["SVDQ_METRICS_PORT"] = str(int(metrics) + gpu)  # one port per GPU on the host
    return [sys.executable, "-m", "worker", f"--hostname=gpu{gpu}@%h", *argv], env


def supervise(spec: str, argv: list[str]) -> int:
    import torch

    gpus = parse_gpus(spec, torch.cuda.device_count())
    return run_until_signalled(Supervisor(gpus, lambda gpu: worker_command(gpu, argv, dict(os.environ))))


def run_until_signalled(supervisor: Supervisor) -> int:
    """Run it in this process until SIGTERM or SIGINT, which stop every child with SIGTERM."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _frame: supervisor.stop(signal.SIGTERM))
    return supervisor.run()
