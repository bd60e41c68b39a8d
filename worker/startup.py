"""A worker whose model cannot load stops at once: non-zero exit, the real error as its log's last lines.

Two checks, one before and one after the fork:
1. `check_model` in the main process, before Celery starts: a local model folder must be a diffusers pipeline
   folder whose safetensors files are whole (a truncated download is caught from the file's own header, in
   milliseconds, naming the file).
2. Anything else (a CUDA error while tuning, out of memory at load, a bad config) raises in the pool process
   that loads the model. That process writes the error where the main process finds it (`LoadFailure`), asks
   the main process to stop, and exits with LOAD_FAILED; the main process then exits with the same code and
   prints the error last. Without this, Celery logs the exception, keeps the process, and every job it takes
   fails, or the pool restarts it in a loop while a job waits unseen.

A third check, `check_storage`, before Celery starts too: a worker that cannot write its videos to the store
and read them back (wrong credentials, no such bucket, a read-only folder) would fail every job it took, and
quickly, so it would take most of the queue. It stops instead, with exit 2 and the store's answer.

In each of these cases the worker's presence key (`svdq:worker:NAME`) keeps the error for an hour: `svdq top`
shows it.
A message the worker had reserved goes back to its queue when the broker connection closes (kombu restores
unacknowledged messages on close), so another worker takes the job at once.

Last, `check_unique_name`: a worker under the name of another that is up stops with exit 2, and leaves that one's
presence alone. Celery node names must be unique, and svdq's lease holders, revokes and presence are keyed by
them; with mingle off (svdq's default) Celery itself no longer warns of a second node with a name.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path

import redis

from producer.settings import ConfigurationError, Settings

log = logging.getLogger(__name__)

LOAD_FAILED = 3  # the exit code of a worker whose model could not load (`--gpus` backs off on it)


def is_local(model: str) -> bool:
    """Whether SVDQ_MODEL names a folder here rather than a hub id."""
    return model.startswith((".", "/", "~")) or Path(model).expanduser().exists()


def check_model(model: str, given_as: str = "SVDQ_MODEL=") -> str | None:
    """A reason the model cannot load, found before any process forks; None if it looks loadable. `given_as`:
    how the user named it (`--model `, or the variable), for the message."""
    path = Path(model).expanduser()
    if not is_local(model):
        return None  # a hub id: from_pretrained finds it, or fails in the pool process with its own error
    if not path.exists():
        return f"{given_as}{model!r}: no such folder; build a test model there with `svdq make-tiny-model DIR`"
    if not (path / "model_index.json").is_file():
        return (
            f"{given_as}{model!r} is not a diffusers pipeline folder (no model_index.json); "
            "build a test model with `svdq make-tiny-model DIR`"
        )
    for weights in sorted(path.rglob("*.safetensors")):
        if problem := check_safetensors(weights):
            return problem
    return None


def check_safetensors(path: Path) -> str | None:
    """safetensors files start with the length of a JSON header that gives every tensor's byte range: a file
    shorter than the last range ends is truncated (an interrupted download or copy)."""
    size = path.stat().st_size
    try:
        with path.open("rb") as fh:
            (header_len,) = struct.unpack("<Q", fh.read(8))
            if header_len > size - 8:
                raise ValueError(f"header of {header_len} bytes in a {size}-byte file")
            header = json.loads(fh.read(header_len))
        ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
    except (struct.error, ValueError, KeyError, TypeError, IndexError) as exc:
        return f"{path}: not a readable safetensors file ({exc}); download or copy it again"
    needed = 8 + header_len + max(ends, default=0)
    if size < needed:
        return f"{path}: truncated ({size} bytes of {needed}); download or copy it again"
    return None


class LoadFailure:
    """A file, named in the environment so forked pool processes inherit it, that carries a load error from
    the pool process to the worker's main process (whose pid travels beside it); a second file beside it says
    the model loaded."""

    ENV = "SVDQ_LOAD_ERROR_FILE"
    PID_ENV = "SVDQ_WORKER_MAIN_PID"

    def __init__(self, path: Path, main_pid: int | None = None):
        self.path, self.main_pid = path, main_pid

    @classmethod
    def create(cls) -> LoadFailure:
        fd, name = tempfile.mkstemp(prefix="svdq-load-error-")
        os.close(fd)
        os.unlink(name)  # exists only once a pool process has written an error to it
        os.environ[cls.ENV] = name
        os.environ[cls.PID_ENV] = str(os.getpid())
        return cls(Path(name), os.getpid())

    @classmethod
    def from_env(cls) -> LoadFailure | None:
        name, pid = os.environ.get(cls.ENV), os.environ.get(cls.PID_ENV, "")
        return cls(Path(name), int(pid) if pid.isdigit() else None) if name else None

    def in_main_process(self) -> bool:
        """True where the model loads in the main process itself (`--pool=solo`, `--pool=threads`)."""
        return self.main_pid == os.getpid()

    def record(self, message: str) -> None:
        """Keep the error for the main process, and ask it to stop (a warm shutdown)."""
        try:
            self.path.write_text(message)
        except OSError as exc:  # the log and the exit code still say why
            log.error("could not hand the load error to the main process: %s", exc)
        if self.main_pid and not self.in_main_process():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(self.main_pid, signal.SIGTERM)

    def read(self) -> str | None:
        try:
            return self.path.read_text()
        except FileNotFoundError:
            return None

    @property
    def _loaded_path(self) -> Path:
        return self.path.with_name(self.path.name + ".loaded")

    def mark_loaded(self) -> None:
        """The pool process has its model: the main process may start taking jobs (worker.gate)."""
        self._loaded_path.touch()

    def loaded(self) -> bool:
        return self._loaded_path.exists()

    def discard(self) -> None:
        self.path.unlink(missing_ok=True)
        self._loaded_path.unlink(missing_ok=True)


# Written and read back under the store's prefix at each start; not a job id (a dot), so never a job's folder.
STORAGE_PROBE = ".svdq-worker-probe"


def check_storage(settings: Settings) -> str | None:
    """Why this worker could not store a video, or None. A store that does not answer, or answers that it is
    busy, is no reason not to start: jobs wait out an outage (and this check must not keep a fleet down)."""
    from producer.storage import (
        FOLDER_REFUSED,
        InvalidReference,
        ObjectNotFound,
        StorageRefused,
        StorageUnavailable,
        open_store,
    )

    where = f"SVDQ_STORAGE_URL={settings.storage_url}"
    try:
        store = open_store(settings)
        stored = store.put(STORAGE_PROBE, b"svdq worker start-up check\n", "text/plain")
    except StorageRefused as exc:
        if exc.busy:
            log.warning("the store at %s is busy (%s): starting anyway", where, exc)
            return None
        return f"{where}: {exc} (check the bucket, and the worker's S3 credentials and what they may write)"
    except StorageUnavailable as exc:
        log.warning("the store at %s does not answer (%s): starting anyway", where, exc)
        return None
    except (ConfigurationError, InvalidReference) as exc:
        return f"{where}: {exc}"
    except OSError as exc:  # a file:// store
        if exc.errno not in FOLDER_REFUSED:
            log.warning("the store at %s failed (%s): starting anyway", where, exc)
            return None
        return f"{where}: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": ")
    try:
        store.read_key(stored.key)
    except (StorageUnavailable, ObjectNotFound, OSError) as exc:
        # Workers read inputs, which a policy may allow apart from the rest: the write is what must work.
        log.warning("the store at %s took a test file but did not give it back (%s)", where, exc)
    return None


def load_hint(model: str) -> str:
    """What to do next, where the model named no local folder: it came from the hub, or failed to."""
    if is_local(model):
        return ""
    return (
        f" (SVDQ_MODEL={model!r} is a hub id: the worker needs the hub or a cached copy; set SVDQ_MODEL to a "
        "local pipeline folder, or build a test model with `svdq make-tiny-model DIR`)"
    )


def describe(exc: BaseException) -> str:
    """One line for the log's last line and the presence key: the error's type and message, no traceback."""
    text = " ".join(str(exc).split())[:800]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def report_to_presence(redis_client: redis.Redis, hostname: str, model: str, message: str) -> None:
    """Best effort: `svdq top` lists the worker with its error although it answers no ping."""
    from producer.fleet import FleetStore

    try:
        FleetStore(redis_client).failed(hostname, model, message)
    except Exception as exc:  # Redis down too: the log and the exit code still say it
        log.warning("could not record the load failure in Redis: %s", describe(exc))


def whoami() -> dict[str, str | int]:
    """The node's process and machine, in its presence: a later start of the node tells from them whether the
    node is still up (`check_unique_name`)."""
    return {"pid": os.getpid(), "machine": socket.gethostname()}


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def check_unique_name(settings: Settings, name: str, answers_ping: Callable[[str], bool]) -> str | None:
    """Why this worker must not start as `name`: another worker that is up has it, or None. Two nodes with one
    name take each other's revokes and ping replies, and their jobs' lease holders (`name/pid`) can collide.
    The node's presence says whether one may be up; a process of this machine that has ended is not, and a
    loaded node must also answer a ping (`answers_ping`, asked only then). Best effort: Redis away, no check."""
    from producer.client import connect_redis
    from producer.fleet import LOADING_TTL, FleetStore

    try:
        client = connect_redis(settings, retry_for=1)
        try:
            info = FleetStore(client).node(name)
        finally:
            client.close()
    except redis.RedisError:
        return None
    if not info or "error" in info:  # no such node, or one whose model failed to load (it has exited)
        return None
    machine, raw_pid = info.get("machine", ""), info.get("pid", "")
    pid = int(raw_pid) if raw_pid.isdigit() else 0  # a presence another hand wrote: no number, no process known
    here = machine == socket.gethostname() and pid
    if here and pid != os.getpid() and not pid_alive(pid):
        return None  # this machine's earlier run of the node, ended without clearing its presence
    where = f" (process {pid} on {machine})" if machine else ""
    advice = "give each worker its own --hostname (in docker compose, its own `hostname:` or command)"
    if "loading_since" in info:  # it answers no ping until its model is loaded
        if here and pid == os.getpid():  # this process's number: a restarted container's earlier run, killed
            return None
        return (
            f"another worker named {name!r} is loading its model{where}: {advice}; a worker stopped while loading "
            f"drops off the list within {LOADING_TTL} s"
        )
    if answers_ping(name):
        return f"another worker named {name!r} is running{where}: {advice}"
    return None
