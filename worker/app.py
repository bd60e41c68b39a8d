"""The Celery app for workers: one job at a time per GPU, JSON only, events on for Flower."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import time
from typing import Any

from celery import Celery
from celery.signals import (
    task_revoked,
    worker_process_init,
    worker_process_shutdown,
    worker_ready,
    worker_shutdown,
    worker_shutting_down,
)

from producer.client import connect_redis
from producer.contract import TASK_NAME
from producer.fleet import FleetStore
from producer.settings import broker_transport_options, redact_url
from worker import revoke, runtime, tasks
from worker.gate import gate
from worker.node import Node
from worker.pipeline import describe_device
from worker.settings import WorkerSettings
from worker.startup import LOAD_FAILED, LoadFailure, describe, load_hint, report_to_presence

log = logging.getLogger(__name__)


def broker_options(settings: WorkerSettings) -> dict[str, Any]:
    return {
        **broker_transport_options(settings),
        # Read the priority queues in the order given ({queue}.high, {queue}, {queue}.low), not round robin.
        "queue_order_strategy": "priority",
        # kombu looks for abandoned messages every interval x throttle seconds: 10 x 10 by default, which
        # left a killed worker's message unseen for ~100 s past its visibility timeout. One scan per interval.
        "unacked_restore_interval": max(1, min(10, settings.visibility_timeout // 10)),
        "unacked_restore_throttle": 1,
    }


def create_app(settings: WorkerSettings | None = None) -> Celery:
    settings = settings or WorkerSettings()
    app = Celery("svdq", broker=settings.redis_url)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,  # svdq keeps its own status records in Redis
        task_default_queue=settings.queue,
        # A message is acknowledged only once its job's GPU work has ended, and a worker holds one at a
        # time: nothing waits behind a busy GPU that another worker could take.
        task_acks_late=True,
        worker_prefetch_multiplier=1,
        worker_concurrency=1,
        # Nor after a reconnect: Celery's prefetch count starts afresh then, and a busy worker took one more
        # message, whose job waited behind the render where no idle worker could take it. This consumes only
        # while the pool has a free process (Redis brokers).
        worker_disable_prefetch=True,
        # Flower's view of the fleet.
        worker_send_task_events=True,
        task_send_sent_event=True,
        # The pool child loads the model before it reports ready; a real checkpoint takes minutes. On the first
        # start worker.gate ends a load past SVDQ_LOAD_TIMEOUT itself, with the reason: Celery's timer (which
        # kills the process and forks another) only covers a process replaced later.
        worker_proc_alive_timeout=settings.load_timeout + 60,
        # A job's own checks stop it at SVDQ_JOB_TIMEOUT; this kills a process stuck past it (worker.timelimit).
        task_time_limit=settings.time_limit(),
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,  # a Redis restart must never end a worker
        # Nor the job it is rendering: the render goes on through a reconnect (its lease and fenced writes
        # keep it single), rather than being killed and redone.
        worker_cancel_long_running_tasks_on_connection_loss=False,
        broker_transport_options=broker_options(settings),
        worker_hijack_root_logger=False,
    )
    tasks.register(app, settings)
    # Celery's built-in tasks (celery.group, celery.chord, celery.accumulate...) would run for any message that
    # names them, and push messages to whatever queue their arguments name: svdq's worker runs its task only.
    for name in [name for name in app.tasks if name != TASK_NAME]:
        app.tasks.unregister(name)
    app.steps["consumer"].add(gate(settings))
    revoke.install()
    _connect_signals(settings)
    return app


POOL_EXIT_DELAY = 5.0


def _load_model(settings: WorkerSettings, sender: str | None = None, **_: Any) -> None:
    log.info("worker process loading %s (broker %s)", settings.model, redact_url(settings.redis_url))
    try:
        rt = runtime.start(settings)
    except BaseException as exc:  # Celery would log it and carry on with a process that has no model
        _load_failed(settings, sender, exc)
        return
    if failure := LoadFailure.from_env():
        failure.mark_loaded()  # the main process starts taking jobs (worker.gate)
    if sender:  # what "auto" became, for `svdq top` (the main process never touches CUDA); best effort
        try:
            with connect_redis(settings, retry_for=1) as client:
                FleetStore(client).loaded_on(sender, describe_device(rt.renderer.device))
        except Exception as exc:
            log.warning("could not show the device in svdq top: %s", describe(exc))


def _load_failed(settings: WorkerSettings, hostname: str | None, exc: BaseException) -> None:
    """Say why, hand the reason to the main process, stop the whole worker. In a pool process this always ends
    the process (Celery would otherwise keep it, model-less); where the model loads in the main process
    (`--pool=solo`), SystemExit stops the worker and its main() prints the reason last."""
    failure = LoadFailure.from_env()
    in_main = failure is not None and failure.in_main_process()
    try:
        message = describe(exc) + load_hint(settings.model)
        log.critical("the model %s failed to load", settings.model, exc_info=exc)
        if hostname:
            with contextlib.suppress(Exception):
                report_to_presence(connect_redis(settings), hostname, settings.served_model(), message)
        if failure is not None:
            failure.record(message)
        log.critical("svdq worker stops: the model failed to load: %s", message)
    finally:
        if in_main:
            raise SystemExit(LOAD_FAILED)
        # Leave once the main process has begun its shutdown: a pool process that exits at once is replaced
        # by the pool, and the new one would load the model again (minutes, for a real checkpoint).
        time.sleep(POOL_EXIT_DELAY)
        logging.shutdown()
        os._exit(LOAD_FAILED)


def _connect_signals(settings: WorkerSettings) -> None:
    node = Node(settings)
    # After the fork, in the child that runs jobs: CUDA must not be initialised in the parent.
    worker_process_init.connect(functools.partial(_load_model, settings), weak=False)
    worker_process_shutdown.connect(lambda **_: runtime.stop(), weak=False)
    # In the main process.
    worker_ready.connect(lambda sender=None, **_: node.start(sender), weak=False)
    worker_shutting_down.connect(lambda sender=None, how="", **_: node.begin_grace(sender, how), weak=False)
    worker_shutdown.connect(lambda **_: node.stop(), weak=False)
    task_revoked.connect(revoke.on_task_revoked, weak=False)
