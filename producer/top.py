"""`svdq top`: the fleet at a glance, refreshed live: workers, what each renders, and the queues.

Workers come from Celery's inspect (who answers, what it runs, which queues it reads) and from the
`svdq:worker:*` keys each worker's main process keeps alive (its model and device); job progress from the
records; queue depths from the broker's lists in the same Redis. Queues nobody reads are flagged: a job for a
model no worker serves waits there, visibly.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from dataclasses import asdict, dataclass, field

from celery import Celery

from producer.contract import JobState, printable, priority_queues
from producer.fleet import FleetStore
from producer.status import JobNotFound, MalformedRecord, StatusStore


@dataclass
class WorkerView:
    name: str
    model: str | None = None
    device: str | None = None
    queues: list[str] = field(default_factory=list)
    job: str | None = None
    stage: str | None = None
    progress: float | None = None
    error: str | None = None  # why a worker that answers nothing stopped (its model failed to load)
    loading_for: float | None = None  # seconds a worker that answers nothing yet has been loading its model


@dataclass
class QueueView:
    name: str
    waiting: int
    readers: int
    loading: int = 0  # workers that will read it once their model is loaded


@dataclass
class Snapshot:
    workers: list[WorkerView]
    queues: list[QueueView]
    states: dict[str, int]
    warnings: list[str] = field(default_factory=list)  # about the fleet as a whole (its Redis)


def _workers(celery: Celery, status: StatusStore, fleet: FleetStore, timeout: float) -> list[WorkerView]:
    inspect = celery.control.inspect(timeout=timeout)
    active = inspect.active() or {}
    active_queues = inspect.active_queues() or {}
    workers = []
    for name in sorted(set(active) | set(active_queues)):
        view = WorkerView(name, queues=[q["name"] for q in active_queues.get(name, [])])
        info = fleet.node(name)
        view.model, view.device = info.get("model"), info.get("device")
        for task in active.get(name, []):
            view.job = task.get("id")
            with contextlib.suppress(JobNotFound, MalformedRecord):
                record = status.get(view.job or "")
                if record.state is JobState.STARTED:
                    view.stage, view.progress = record.stage, record.progress
        workers.append(view)
    answered = {w.name for w in workers}
    nodes = fleet.nodes()
    for name, info in nodes.items():
        if name not in answered and info.get("error"):
            workers.append(WorkerView(name, model=info.get("model"), stage="failed", error=info["error"]))
    for name, loading in fleet.loading_nodes(nodes).items():
        if name not in answered:
            device, queues = nodes[name].get("device"), list(loading.queues)
            workers.append(
                WorkerView(name, loading.model, device, queues, stage="loading", loading_for=loading.seconds)
            )
    return workers


def _queues(fleet: FleetStore, base_queue: str, workers: list[WorkerView]) -> list[QueueView]:
    names = set(priority_queues(base_queue)) | fleet.queues_of_waiting_jobs()
    for view in workers:
        names.update(view.queues)
    ordered = sorted(names)
    ready = [w for w in workers if w.loading_for is None]
    loading = [w for w in workers if w.loading_for is not None]
    return [
        QueueView(name, depth, sum(name in w.queues for w in ready), sum(name in w.queues for w in loading))
        for name, depth in zip(ordered, fleet.depths(ordered), strict=True)
    ]


def snapshot(celery: Celery, status: StatusStore, base_queue: str, timeout: float = 1.0) -> Snapshot:
    fleet = FleetStore(status.redis)
    workers = _workers(celery, status, fleet, timeout)
    warnings = [risk] if (risk := fleet.eviction_risk()) else []
    return Snapshot(workers, _queues(fleet, base_queue, workers), fleet.counts(), warnings)


def tail(text: str, width: int) -> str:
    """The end of a long name (where model names differ), marked as cut."""
    return text if len(text) <= width else "…" + text[-(width - 1) :]


def render(snap: Snapshot) -> str:
    lines = [f"svdq top   {time.strftime('%H:%M:%S')}   " + "  ".join(f"{k} {v}" for k, v in snap.states.items())]
    lines += [f"WARNING: {printable(w)}" for w in snap.warnings] + [""]
    lines.append(f"{'WORKER':<28} {'MODEL':<28} {'JOB':<34} {'STAGE':<14} PROGRESS")
    if not snap.workers:
        lines.append("(no worker answers)")
    for w in snap.workers:
        bar = "" if w.progress is None else f"{'#' * int(w.progress * 20):<20} {w.progress:4.0%}"
        if w.loading_for is not None:
            bar = f"model, for {w.loading_for:.0f}s"
        job = "-" if w.error or w.loading_for is not None else w.job or "idle"
        line = f"{w.name:<28} {tail(w.model or '?', 28):<28} {job:<34} {w.stage or '':<14} {w.error or bar}"
        lines.append(printable(line))
    lines += ["", f"{'QUEUE':<40} {'WAITING':>8} {'READERS':>8}"]
    for q in snap.queues:
        if q.waiting or q.readers or q.loading:
            flag = ""
            if q.waiting and not q.readers:
                flag = "   <- no worker reads this queue"
                if q.loading:
                    flag = f"   <- none reads it yet; {q.loading} loading (see STAGE)"
            lines.append(printable(f"{q.name:<40} {q.waiting:>8} {q.readers:>8}{flag}"))
    return "\n".join(lines)


def as_json(snap: Snapshot, indent: int | None = 2) -> str:
    return json.dumps(asdict(snap), indent=indent)


def run(celery: Celery, status: StatusStore, base_queue: str, interval: float, once: bool, json_out: bool) -> None:
    # A terminal's screen is redrawn in place; into a pipe or a file, each snapshot follows the last one.
    clear = "" if once or not sys.stdout.isatty() else "\x1b[H\x1b[2J"
    while True:
        snap = snapshot(celery, status, base_queue)
        if json_out:  # one document; refreshed, JSON Lines (a document a line), which a script reads line by line
            print(as_json(snap, 2 if once else None), flush=True)
        else:
            print(clear + render(snap), flush=True)
        if once:
            return
        time.sleep(interval)
