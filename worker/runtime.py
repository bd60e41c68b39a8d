"""What one worker process holds for its whole life: clients, the store and the warm pipeline.

Built in the pool's child process after the fork (`worker_process_init`), never in the parent,
so CUDA is first touched in the process that uses it.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

from PIL import Image

from producer.client import connect_redis
from producer.status import StatusStore
from producer.storage import ObjectStore, open_store
from worker.finisher import Finisher
from worker.pipeline import Renderer, load_renderer
from worker.settings import WorkerSettings
from worker.webhooks import WebhookSender

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    settings: WorkerSettings
    status: StatusStore
    store: ObjectStore
    renderer: Renderer
    webhooks: WebhookSender | None = None
    finisher: Finisher = field(default_factory=Finisher)
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
    client = connect_redis(settings.redis_url)
    return Runtime(
        settings=settings,
        status=StatusStore(client, result_ttl=settings.result_ttl),
        store=open_store(settings),
        renderer=load_renderer(settings),
        webhooks=WebhookSender(
            settings.webhook_secret.get_secret_value() if settings.webhook_secret else None,
            allow_private=settings.webhook_allow_private,
            timeout=settings.webhook_timeout,
            max_attempts=settings.webhook_max_attempts,
        ),
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
    """Let the job being finished finish (its message is already acknowledged), then its webhooks go."""
    if _current is not None:
        _current.finisher.drain()
        if _current.webhooks is not None:
            _current.webhooks.close()


def current(settings: WorkerSettings) -> Runtime:
    """The process's runtime; pools without a process-init hook (solo, threads) build it here once."""
    return _current if _current is not None else start(settings)
