"""One job in flight behind the GPU: its encode tail, upload and final status, on a thread of its own.

While job N is finished here, the task that rendered it has returned, so Celery hands job N+1 to the
GPU at once. The hand-off is bounded to one: the next job to reach it waits for the previous tail first,
so at most one finished video is held in memory and a crash loses at most the job being finished.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)


class Finisher:
    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def submit(self, name: str, work: Callable[[], None]) -> None:
        """Start `work` once the previous one is done. `work` records its own failures."""
        with self._lock:
            self.drain()
            self._thread = threading.Thread(target=self._run, args=(name, work), name=f"svdq-finish-{name}")
            self._thread.start()

    @staticmethod
    def _run(name: str, work: Callable[[], None]) -> None:
        try:
            work()
        except Exception:  # work records failures itself; this is the last line of defence
            log.exception("finishing %s failed", name)

    def drain(self) -> None:
        """Wait for the job being finished, if any (before the next hand-off, and at shutdown)."""
        thread = self._thread
        if thread is not None:
            thread.join()
