"""Finished videos that storage could not take yet: kept on local disk, bounded, uploaded when it returns.

A render is the expensive part of a job; an upload is cheap to repeat. So when storage is unreachable
after a render, the video goes to this spool and the job stays `started` (stage `upload_pending`), its
lease kept alive by the heartbeat. One thread retries every pending upload with backoff until storage
takes it, or the job is canceled or taken over meanwhile. When the spool has no room, or its disk will not
take the video (full below the cap, the folder removed), the job fails with `spool_full` at once: nothing
silently waits in memory. A spooled video removed before its upload fails its job too: its lease, renewed
for as long as the upload was pending, would otherwise keep it `started` for ever.

Each process spools into a folder of its own, holding a lock on it while it lives; folders whose lock nobody
holds were left by dead processes and are removed at start (their jobs are recovered through their lapsed
leases). A lock, not the pid in the name: in a container a restarted worker's processes get the same small
pids again, and a folder named after a live pid was kept, and filled the disk, for ever.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import random
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from producer.storage import ObjectStore, StorageUnavailable, Stored
from worker.backoff import backoff

log = logging.getLogger(__name__)


class SpoolFull(Exception):
    def __init__(self, needed: int, used: int, limit: int):
        super().__init__(
            f"the upload spool has no room for {needed} bytes ({used} of SVDQ_SPOOL_MAX_BYTES={limit} used)"
        )


class SpoolUnwritable(SpoolFull):
    def __init__(self, exc: OSError):
        Exception.__init__(self, f"the upload spool could not keep the video: {exc}")


@dataclass
class PendingUpload:
    job_id: str
    name: str
    path: Path
    content_type: str
    # Called before each try: False drops the upload (the job was canceled or taken over).
    still_wanted: Callable[[int], bool]
    # Called once the video is stored.
    done: Callable[[Stored], None]
    # Called, with why, if the spooled video is gone before its upload.
    lost: Callable[[str], None]
    tries: int = 1  # the finisher's own try failed first
    next_at: float = 0.0


def default_spool_dir() -> Path:
    return Path(tempfile.gettempdir()) / "svdq-spool"


OWNER = ".owner"  # the file in a spool folder its process keeps locked


def _owner_alive(folder: Path, now: float) -> bool:
    """Whether the process that made `folder` still runs: it holds the lock on its owner file."""
    try:
        fd = os.open(folder / OWNER, os.O_RDONLY)
    except FileNotFoundError:
        # A folder made this instant, its lock not in place yet; or one an older svdq left, without a lock.
        with contextlib.suppress(FileNotFoundError):
            return now - folder.stat().st_mtime < 60
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # which releases a lock this took
    return False


class Spool:
    def __init__(
        self, store: ObjectStore, root: Path, max_bytes: int, *, backoff_base: float = 2.0, backoff_max: float = 120.0
    ):
        self.store = store
        self.max_bytes = max_bytes
        self.backoff_base, self.backoff_max = backoff_base, backoff_max
        root.mkdir(parents=True, exist_ok=True)
        self._clear_dead(root)
        self.dir = Path(tempfile.mkdtemp(dir=root, prefix=f"{os.getpid()}-"))
        # Locked before it takes its name, so no other process sees the owner file unlocked: released when this
        # process ends, however it ends.
        self._owner = os.open(self.dir / f"{OWNER}.new", os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self._owner, fcntl.LOCK_EX)
        os.rename(self.dir / f"{OWNER}.new", self.dir / OWNER)
        self._pending: dict[str, PendingUpload] = {}
        self._wake = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="svdq-spool", daemon=True)
        self._thread.start()

    @staticmethod
    def _clear_dead(root: Path) -> None:
        now = time.time()
        for folder in root.iterdir():
            if folder.is_dir() and folder.name.split("-", 1)[0].isdigit() and not _owner_alive(folder, now):
                log.warning("removing the upload spool of a process that ended: %s", folder)
                shutil.rmtree(folder, ignore_errors=True)

    def used_bytes(self) -> int:
        with self._wake:
            return sum(p.path.stat().st_size for p in self._pending.values() if p.path.exists())

    def pending(self) -> int:
        with self._wake:
            return len(self._pending)

    def add(
        self,
        job_id: str,
        name: str,
        data: bytes,
        content_type: str,
        still_wanted: Callable[[int], bool],
        done: Callable[[Stored], None],
        lost: Callable[[str], None],
    ) -> None:
        """Keep `data` on disk and upload it as `name` once storage answers; SpoolFull when there is no room
        (SpoolUnwritable when the disk will not take it)."""
        used = self.used_bytes()
        if used + len(data) > self.max_bytes:
            raise SpoolFull(len(data), used, self.max_bytes)
        path = self.dir / f"{job_id}{Path(name).suffix}"
        try:
            path.write_bytes(data)
        except OSError as exc:  # a disk full below the cap, the folder removed by a /tmp cleaner
            with contextlib.suppress(OSError):
                path.unlink()
            raise SpoolUnwritable(exc) from exc
        upload = PendingUpload(job_id, name, path, content_type, still_wanted, done, lost)
        upload.next_at = time.monotonic() + self._delay(upload.tries)
        with self._wake:
            self._pending[job_id] = upload
            self._wake.notify()

    def close(self, timeout: float = 0.0) -> None:
        """Give pending uploads up to `timeout` seconds more, then stop; what is left is dropped."""
        deadline = time.monotonic() + timeout
        while self.pending() and time.monotonic() < deadline:
            time.sleep(0.2)
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join(timeout=10)
        if self._pending:
            log.warning("%d spooled uploads dropped at shutdown; their jobs are recovered by lease", len(self._pending))
        shutil.rmtree(self.dir, ignore_errors=True)
        with contextlib.suppress(OSError):  # closed by an earlier close
            os.close(self._owner)

    def _delay(self, tries: int) -> float:
        return backoff(tries, self.backoff_base, self.backoff_max, random.random())

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._closed and not self._due():
                    soonest = min((p.next_at for p in self._pending.values()), default=None)
                    self._wake.wait(None if soonest is None else max(0.0, soonest - time.monotonic()))
                if self._closed:
                    return
                due = [p for p in self._pending.values() if p.next_at <= time.monotonic()]
            for upload in due:
                self._try(upload)

    def _due(self) -> bool:
        now = time.monotonic()
        return any(p.next_at <= now for p in self._pending.values())

    def _try(self, upload: PendingUpload) -> None:
        try:
            if not upload.still_wanted(upload.tries):
                log.info("job %s: spooled upload dropped (canceled or taken over)", upload.job_id)
                self._forget(upload)
                return
            try:
                data = upload.path.read_bytes()
            except FileNotFoundError:
                self._forget(upload)
                upload.lost(f"the rendered video was removed from the upload spool ({upload.path}) before its upload")
                return
            stored = self.store.put(upload.name, data, upload.content_type)
        except StorageUnavailable as exc:
            upload.tries += 1
            delay = self._delay(upload.tries)
            upload.next_at = time.monotonic() + delay
            log.warning("job %s: upload try %d failed (%s); next in %.1fs", upload.job_id, upload.tries, exc, delay)
            return
        except Exception:  # Redis away, disk trouble: keep the video and try again later
            log.exception("job %s: spooled upload", upload.job_id)
            upload.next_at = time.monotonic() + self._delay(upload.tries)
            return
        self._forget(upload)
        try:
            upload.done(stored)
        except Exception:  # the video is stored; a lost final write is recovered through the lease
            log.exception("job %s: recording the spooled upload", upload.job_id)

    def _forget(self, upload: PendingUpload) -> None:
        with self._wake:
            self._pending.pop(upload.job_id, None)
        with contextlib.suppress(OSError):
            upload.path.unlink()
