"""For every test process and the worker, CLI and gateway processes they start."""

import os

import pytest

# One CPU thread per process. The tiny model gains nothing from more, and the suite runs several test processes
# (`make test`), each with worker processes: with torch's default (a thread per core) every process's threads
# spin for cores the others hold, and the suite took twice as long (measured: 258 s against 141 s for two files).
os.environ.setdefault("OMP_NUM_THREADS", "1")


# SVDQ_TEST_FAILURES=PATH: each failure's report appended to PATH as it happens, by the controlling process
# alone (xdist's workers pass their reports to it). A run cut off by a time limit (a GPU host's lease) prints no
# summary, so this is where its tracebacks are.
_FAILURES = os.environ.get("SVDQ_TEST_FAILURES")


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if _FAILURES and report.failed and "PYTEST_XDIST_WORKER" not in os.environ:
        with open(_FAILURES, "a") as out:
            out.write(f"===== {report.nodeid} ({report.when})\n{report.longreprtext}\n\n")
