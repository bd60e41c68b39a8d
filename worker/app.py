"""The Celery app for workers: one job at a time per GPU, JSON only, events on for Flower."""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery
from celery.signals import worker_process_init, worker_process_shutdown

from producer.settings import redact_url
from worker import runtime, tasks
from worker.settings import WorkerSettings

log = logging.getLogger(__name__)


def create_app(settings: WorkerSettings | None = None) -> Celery:
    settings = settings or WorkerSettings()
    app = Celery("svdq", broker=settings.redis_url)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,  # svdq keeps its own status records in Redis
        task_default_queue=settings.queue,
        # A message is acknowledged only once its job has ended, and a worker holds one at a time:
        # nothing waits behind a busy GPU that another worker could take.
        task_acks_late=True,
        worker_prefetch_multiplier=1,
        worker_concurrency=1,
        # Flower's view of the fleet.
        worker_send_task_events=True,
        task_send_sent_event=True,
        # The pool child loads the model before it reports ready; a real checkpoint takes minutes.
        worker_proc_alive_timeout=settings.load_timeout,
        broker_connection_retry_on_startup=True,
        # Read the priority queues in the order given ({queue}.high, {queue}, {queue}.low), not round robin.
        broker_transport_options={"queue_order_strategy": "priority"},
        worker_hijack_root_logger=False,
    )
    tasks.register(app, settings)

    def load_model(**_: Any) -> None:
        log.info("worker process loading %s (broker %s)", settings.model, redact_url(settings.redis_url))
        runtime.start(settings)

    def finish_last_job(**_: Any) -> None:
        runtime.stop()

    # After the fork, in the child that runs jobs: CUDA must not be initialised in the parent.
    worker_process_init.connect(load_model, weak=False)
    worker_process_shutdown.connect(finish_last_job, weak=False)
    return app
