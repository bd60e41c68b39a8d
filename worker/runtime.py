"""What one worker process holds for its whole life: clients, the store and the warm pipeline.

Built in the pool's child process after the fork (`worker_process_init`), never in the parent,
so CUDA is first touched in the process that uses it.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from producer.client import connect_redis
from producer.status import StatusStore
from producer.storage import ObjectStore, open_store
from worker.events import TaskEvents
from worker.finisher import Finisher
from worker.heartbeat import Heartbeat
from worker.metrics import Metrics
from worker.pipeline import Renderer, load_renderer
from worker.settings import WorkerSettings
from worker.spool import Spool, default_spool_dir
from worker.webhooks import WebhookSender, sender_for

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    settings: WorkerSettings
    status: StatusStore
    store: ObjectStore
    renderer: Renderer
    heartbeat: Heartbeat
    spool: Spool
    webhooks: WebhookSender | None = None
    metrics: Metrics = field(default_factory=Metrics)
    finisher: Finisher = field(default_factory=Finisher)
    events: TaskEvents = field(default_factory=TaskEvents)  # bound to the worker by its first task
    _load_reported: bool = field(default=False)

    def take_load_seconds(self) -> float:
        """The model's load time for the first job this process runs, 0 for every later one."""
        if self._load_reported:
            return 0.0
        self._load_reported = True
        return self.renderer.load_seconds


def build_runtime(settings: WorkerSettings) -> Runtime:
    # Pillow's own bomb check (a warning up to twice its limit, then an error) at svdq's limit.
    Image.MAX_IMAGE_PIXELS = settings.max_image_pixels
    # A worker waits out a Redis restart of up to a minute rather than failing the job it is rendering.
    client = connect_redis(settings, retry_for=60)
    status = StatusStore(client, result_ttl=settings.result_ttl)
    store = open_store(settings)
    spool_dir = Path(settings.spool_dir) if settings.spool_dir else default_spool_dir()
    metrics = Metrics()
    if settings.metrics_port:
        try:
            metrics.serve(settings.metrics_port)  # before the load: a scrape shows the model is not warm yet
        except OSError as exc:
            raise RuntimeError(
                f"SVDQ_METRICS_PORT={settings.metrics_port}: cannot listen there ({exc.strerror}); "
                "another process holds the port"
            ) from exc
    renderer = load_renderer(settings)
    metrics.model_loaded(settings.served_model(), str(renderer.device), renderer.load_seconds)
    return Runtime(
        settings=settings,
        status=status,
        store=store,
        renderer=renderer,
        metrics=metrics,
        heartbeat=Heartbeat(status, settings.lease_ttl),
        spool=Spool(
            store,
            spool_dir,
            settings.spool_max_bytes,
            backoff_base=settings.retry_backoff,
            backoff_max=settings.retry_backoff_max,
        ),
        webhooks=sender_for(settings, status),
    )


_current: Runtime | None = None
_lock = threading.Lock()


def start(settings: WorkerSettings) -> Runtime:
    global _current
    with _lock:
        if _current is None:
            _current = build_runtime(settings)
        return _current


def stop() -> None:
    """Let the job being finished finish (its message is already acknowledged), give spooled uploads a
    last chance, then send the webhooks. Jobs still unfinished are recovered elsewhere through their leases."""
    if _current is not None:
        _current.finisher.drain()
        _current.spool.close(timeout=min(30.0, _current.settings.stop_grace))
        _current.heartbeat.close()
        _current.events.close()
        if _current.webhooks is not None:
            _current.webhooks.close()


def current(settings: WorkerSettings) -> Runtime:
    """The process's runtime; pools without a process-init hook (solo, threads) build it here once."""
    return _current if _current is not None else start(settings)
