"""What svdq's commands print about jobs, and how they wait on them: exit codes, records, progress bars.

Shared by the CLI (producer.cli) and `svdq demo` (producer.demo).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import kombu.exceptions
import redis

from producer.client import Job
from producer.contract import DEFAULT_QUEUE, JobRecord, JobState, printable
from producer.fleet import FleetStore

EXIT_OK, EXIT_JOB_FAILED, EXIT_USAGE, EXIT_NOT_FOUND, EXIT_TIMEOUT, EXIT_UNAVAILABLE, EXIT_REFUSED = range(7)
EXIT_INTERRUPTED, EXIT_BROKEN_PIPE = 130, 141  # the shell's codes for SIGINT and SIGPIPE


class CliError(Exception):
    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


def print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=True))


def describe(record: JobRecord) -> str:
    lines = [f"job      {record.id}", f"state    {record.state.value}"]
    if not record.state.is_terminal():
        lines.append(f"stage    {record.stage or '-'} ({record.progress:.0%})")
    if record.worker:
        lines.append(f"worker   {record.worker}")
    if record.error:
        lines.append(f"error    {record.error.code}: {record.error.message}")
    if record.webhook_error:
        lines.append(f"webhook  {record.webhook_error}")
    if record.result:
        r = record.result
        lines.append(f"video    {r.key} ({r.bytes} bytes, {r.frames} frames {r.width}x{r.height} @ {r.fps} fps)")
        if r.url:
            lines.append(f"url      {r.url}")
    if record.timings:
        lines.append("timings  " + ", ".join(f"{k} {v:.2f}s" for k, v in record.timings.items()))
    return "\n".join(printable(line) for line in lines)


def progress_printer() -> tuple[Callable[[JobRecord], None], Callable[[], None]]:
    """A progress bar on a terminal (stderr), nothing otherwise. Returns (update, close)."""
    if not sys.stderr.isatty():
        return (lambda record: None), (lambda: None)
    from tqdm import tqdm

    bar = tqdm(total=100, file=sys.stderr, unit="%", bar_format="{desc:<22}{percentage:3.0f}%|{bar}| {elapsed}")

    def update(record: JobRecord) -> None:
        bar.set_description_str(f"{record.state.value}:{record.stage or '-'}")
        bar.n = round(record.progress * 100)
        bar.refresh()

    return update, bar.close


def readers(job: Job, record: JobRecord) -> list[str] | None:
    """The workers that read the queue a queued job waits in (None: no queue recorded, or Redis unreadable)."""
    if not record.queue:
        return None
    try:
        active = job.client.celery.control.inspect(timeout=1.0).active_queues() or {}
    except (redis.RedisError, kombu.exceptions.OperationalError):
        return None
    return sorted(worker for worker, queues in active.items() if any(q.get("name") == record.queue for q in queues))


def still_waiting(job: Job, waited: str = "") -> str:
    """Why a job has not ended yet, and what to do about it, for a wait that stops before the job does."""
    record = job.status()
    waited = f" {waited}" if waited else ""
    follow = f"`svdq wait {job.id}` to keep following it, `svdq cancel {job.id}` to stop it"
    if record.state is JobState.STARTED:
        return f"job {job.id} goes on ({record.stage or 'started'}, {record.progress:.0%}){waited}; {follow}"
    if record.state is JobState.QUEUED and readers(job, record) == []:
        return f"job {job.id} is still queued{waited}: {unread(job, record)}; {follow}"
    return f"job {job.id} is still {record.state.value}{waited}; {follow}"


def unread(job: Job, record: JobRecord) -> str:
    """That no worker reads a queued job's queue, and the command that starts one that does; or, when workers
    that will read it are loading their model (minutes on a GPU), which and for how long."""
    try:
        loading = FleetStore(job.client.redis).loading_nodes()
    except redis.RedisError:  # a hint only: the wait goes on without it
        loading = {}
    if ours := {name: node.seconds for name, node in loading.items() if record.queue in node.queues}:
        names = printable(", ".join(sorted(ours)))
        return (
            f"no worker reads its queue {record.queue!r} yet: {names} loading the model "
            f"({max(ours.values()):.0f}s so far); the job starts once one is ready"
        )
    model = record.request.get("model")
    queue = job.client.settings.queue
    start = ("" if queue == DEFAULT_QUEUE else f"SVDQ_QUEUE={queue} ") + "svdq worker"
    if model:
        start += f" --model PATH --model-name {model}"
    return f"no worker reads its queue {record.queue!r} (start one with `{start}`, see `svdq top`)"


def unread_notice(job: Job, after: float = 10.0) -> Callable[[JobRecord], None]:
    """For a wait's updates: once the job has been queued `after` seconds, ask (once: it costs a second) whether
    any worker reads its queue, and say so if none does. The wait goes on; a forgotten worker is the usual cause
    of a wait that prints nothing."""
    since, asked = time.monotonic(), False

    def check(record: JobRecord) -> None:
        nonlocal asked
        if asked or record.state is not JobState.QUEUED or time.monotonic() - since < after:
            return
        asked = True
        if readers(job, record) == []:
            print(f"svdq: job {job.id} waits: {unread(job, record)}; still waiting (Ctrl-C stops)", file=sys.stderr)

    return check


def check_output(output: Path | None) -> None:
    """Refuse a path the video could not be written to now, before a render that would end in nothing."""
    if output is None:
        return
    folder = output.parent  # Path("x.mp4").parent is Path(".")
    if output.is_dir():
        raise CliError(f"--output {output}: is a folder; give the video's file name", EXIT_USAGE)
    if not folder.is_dir():
        raise CliError(f"--output {output}: no folder {folder}", EXIT_USAGE)
    if not os.access(folder, os.W_OK):
        raise CliError(f"--output {output}: cannot write in {folder}", EXIT_USAGE)


def wait_and_report(
    job: Job, timeout: float | None, output: Path | None, as_json: bool, quiet: bool, *, notice: bool = True
) -> int:
    """Follow the job to its end, say how it ended, download its video; the exit code. `notice`: say when the
    job sits in a queue no worker reads (not while the caller's own worker is still loading)."""
    show, close = progress_printer()
    unread_check = unread_notice(job) if notice else (lambda record: None)

    def update(record: JobRecord) -> None:
        show(record)
        unread_check(record)

    try:
        record = job.wait(timeout, on_update=update)
    except TimeoutError:
        raise CliError(still_waiting(job, f"after {timeout:g}s"), EXIT_TIMEOUT) from None
    except KeyboardInterrupt:
        raise CliError(f"stopped waiting (Ctrl-C). {still_waiting(job)}", EXIT_INTERRUPTED) from None
    finally:
        close()
    if as_json:
        print_json(record.to_json_dict())
    elif not quiet:
        print(describe(record), file=sys.stderr)
    elif record.state is not JobState.SUCCEEDED:  # quiet (submit --wait): still say why, in one line
        why = f": {record.error.code}: {record.error.message}" if record.error else ""
        print(printable(f"svdq: job {job.id} {record.state.value}{why}"), file=sys.stderr)
    if record.state is not JobState.SUCCEEDED:
        return EXIT_JOB_FAILED
    if output is not None:
        try:
            job.download(output)
        except OSError as exc:  # checked before the wait, but a disk fills up and folders go away
            again = f"the job succeeded: `svdq wait {job.id} --output FILE` downloads it"
            raise CliError(f"--output {output}: {exc.strerror or exc}; {again}", EXIT_USAGE) from None
        print(f"wrote {output}", file=sys.stderr)
    return EXIT_OK
