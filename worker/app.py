"""The Celery app for workers: one job at a time per GPU, JSON only, events on for Flower."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
import time
from collections.abc import Callable
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

from producer import keys
from producer.client import connect_redis, producer_celery
from producer.contract import TASK_NAME
from producer.settings import redact_url, sentinel_options
from producer.status import StatusStore
from worker import revoke, runtime, tasks
from worker.events import TaskEvents
from worker.recovery import Recovery, Sweeper
from worker.settings import WorkerSettings
from worker.startup import LOAD_FAILED, LoadFailure, describe, report_to_presence
from worker.webhooks import notify, sender_for

log = logging.getLogger(__name__)


def broker_options(settings: WorkerSettings) -> dict[str, Any]:
    return {
        **sentinel_options(settings),
        # Read the priority queues in the order given ({queue}.high, {queue}, {queue}.low), not round robin.
        "queue_order_strategy": "priority",
        "visibility_timeout": settings.visibility_timeout,
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
        # Flower's view of the fleet.
        worker_send_task_events=True,
        task_send_sent_event=True,
        # The pool child loads the model before it reports ready; a real checkpoint takes minutes.
        worker_proc_alive_timeout=settings.load_timeout,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,  # a Redis restart must never end a worker
        # Nor the job it is rendering: the render goes on through a reconnect (its lease and fenced writes
        # keep it single), rather than being killed and redone.
        worker_cancel_long_running_tasks_on_connection_loss=False,
        broker_transport_options=broker_options(settings),
        worker_hijack_root_logger=False,
    )
    tasks.register(app, settings)
    revoke.install()
    _connect_signals(settings)
    return app


def _presence(status: StatusStore, hostname: str, settings: WorkerSettings, ttl: int) -> Callable[[], None]:
    """What `svdq top` shows of this worker node, kept alive while its main process lives."""
    info = {
        "model": settings.served_model(),
        "source": settings.model,
        "device": os.environ.get("CUDA_VISIBLE_DEVICES", settings.device),
        "pid": os.getpid(),
    }

    def refresh() -> None:
        pipe = status.redis.pipeline()
        pipe.hset(keys.worker(hostname), mapping=info)
        pipe.expire(keys.worker(hostname), ttl)
        pipe.execute()

    return refresh


POOL_EXIT_DELAY = 5.0


def _load_model(settings: WorkerSettings, sender: str | None = None, **_: Any) -> None:
    log.info("worker process loading %s (broker %s)", settings.model, redact_url(settings.redis_url))
    try:
        runtime.start(settings)
    except BaseException as exc:  # Celery would log it and carry on with a process that has no model
        _load_failed(settings, sender, exc)


def _load_failed(settings: WorkerSettings, hostname: str | None, exc: BaseException) -> None:
    """Say why, hand the reason to the main process, stop the whole worker. In a pool process this always ends
    the process (Celery would otherwise keep it, model-less); where the model loads in the main process
    (`--pool=solo`), SystemExit stops the worker and its main() prints the reason last."""
    failure = LoadFailure.from_env()
    in_main = failure is not None and failure.in_main_process()
    try:
        message = describe(exc)
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


def _start_main_process(settings: WorkerSettings, sender: Any) -> dict[str, Any]:
    """The main process's duties, which outlive any pool process: recover dead workers' jobs anywhere, keep
    this node's presence for `svdq top`, and cancel jobs that Flower or `celery control` revoke."""
    status = StatusStore(connect_redis(settings, retry_for=60), result_ttl=settings.result_ttl)
    status.redis.delete(keys.stopping(sender.hostname))  # a restarted node is not stopping
    status.redis.hdel(keys.worker(sender.hostname), "error", "failed_at")  # nor failed, as it may have been
    sender_app = producer_celery(settings)
    webhooks = sender_for(settings)
    events = TaskEvents(sender.app, sender.hostname)

    def send(job_id: str, request: dict[str, Any], queue: str) -> None:
        sender_app.send_task(TASK_NAME, kwargs={"job_id": job_id, "request": request}, task_id=job_id, queue=queue)

    def ended(job_id: str) -> None:
        events.ended(status.get(job_id))
        notify(status, webhooks, job_id)

    recovery = Recovery(
        status,
        send,
        lease_ttl=settings.lease_ttl,
        max_attempts=settings.max_attempts,
        default_queue=settings.queue,
        notify=ended,
        requeued=lambda job_id, error: events.requeued(job_id, error, "recovered"),
    )
    revoke.CANCELLER.attach(status, events, notify=lambda job_id: notify(status, webhooks, job_id))
    interval = max(0.5, settings.lease_ttl / 2)
    presence = _presence(status, sender.hostname, settings, ttl=int(interval * 3) + 1)
    presence()
    sweeper = Sweeper(recovery, interval, also=presence).start()
    return {"status": status, "sweeper": sweeper, "hostname": sender.hostname, "events": events}


def _connect_signals(settings: WorkerSettings) -> None:
    state: dict[str, Any] = {}

    def finish_last_job(**_: Any) -> None:
        runtime.stop()

    def start_recovery(sender: Any = None, **_: Any) -> None:
        state.update(_start_main_process(settings, sender))

    def begin_grace(sender: str | None = None, how: str = "", **_: Any) -> None:
        # Runs inside Celery's signal handler: the Redis write goes on a thread of its own.
        status = state.get("status")
        if how != "Warm" or status is None or sender is None:
            return
        deadline = time.time() + settings.stop_grace

        def publish() -> None:
            status.redis.set(keys.stopping(sender), str(deadline), ex=int(settings.stop_grace) + 3600)
            log.warning("warm shutdown: a running job may finish within %.0fs, then goes back to its queue",
                        settings.stop_grace)  # fmt: skip

        threading.Thread(target=publish, name="svdq-stopping", daemon=True).start()

    def stop_recovery(sender: Any = None, **_: Any) -> None:
        if "sweeper" in state:
            state["sweeper"].stop()
            state["events"].close()
            failure = LoadFailure.from_env()
            if failure is not None and (error := failure.read()):  # keep the reason for `svdq top`
                report_to_presence(state["status"].redis, state["hostname"], settings.served_model(), error)
            else:
                state["status"].redis.delete(keys.worker(state["hostname"]))

    # After the fork, in the child that runs jobs: CUDA must not be initialised in the parent.
    worker_process_init.connect(functools.partial(_load_model, settings), weak=False)
    worker_process_shutdown.connect(finish_last_job, weak=False)
    worker_ready.connect(start_recovery, weak=False)
    task_revoked.connect(revoke.on_task_revoked, weak=False)
    worker_shutting_down.connect(begin_grace, weak=False)
    worker_shutdown.connect(stop_recovery, weak=False)
