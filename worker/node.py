"""A worker node's main process: what it does besides handing messages to its pool process.

It outlives any pool process (a crashed one is replaced; the model reloads in the new one), so the duties that
must not stop with a render live here: the recovery sweep that puts dead workers' jobs back on their queues (any
worker's, on any host), this node's presence for `svdq top`, the stopping flag a warm shutdown raises for the
running job, and the cancel behind Celery's revoke. Celery calls `start` once the worker is ready,
`begin_grace` on SIGTERM and `stop` at shutdown (wiring in worker.app).
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from typing import Any

import redis

from producer.client import connect_redis, producer_celery, send_job
from producer.fleet import FleetStore
from producer.status import StatusStore
from worker import revoke, timelimit
from worker.backoff import backoff
from worker.events import TaskEvents
from worker.recovery import Recovery, Sweeper
from worker.settings import WorkerSettings
from worker.startup import LoadFailure, report_to_presence, whoami
from worker.webhooks import notify, sender_for

log = logging.getLogger(__name__)


class Node:
    def __init__(self, settings: WorkerSettings, *, redis_retry_for: float = 60.0):
        self.settings = settings
        self.redis_retry_for = redis_retry_for
        self.hostname: str | None = None
        self.status: StatusStore | None = None
        self.events: TaskEvents | None = None
        self.sweeper: Sweeper | None = None
        self.fleet: FleetStore | None = None
        self._stopping = threading.Event()
        self._starter: threading.Thread | None = None

    def start(self, consumer: Any) -> None:
        """The worker is ready: start the node's duties, on a thread that tries again while Redis is away.
        (Raised in Celery's worker_ready signal, an error would only be logged, and the node would run on
        without its recovery sweep, presence and revoke.)"""
        self._starter = threading.Thread(
            target=self._start_until_done, args=(consumer,), name="svdq-node-start", daemon=True
        )
        self._starter.start()

    def _start_until_done(self, consumer: Any) -> None:
        tries = 0
        while not self._stopping.is_set():
            try:
                self._start(consumer)
                return
            except redis.RedisError as exc:
                tries += 1
                delay = backoff(tries, 1.0, 30.0, random.random())
                log.warning("node start: Redis unreachable (%s); trying again in %.0fs", exc, delay)
                self._stopping.wait(delay)

    def _start(self, consumer: Any) -> None:
        """Clear what a previous run of this node left, then start the sweep."""
        settings, hostname = self.settings, consumer.hostname
        status = StatusStore(connect_redis(settings, retry_for=self.redis_retry_for), result_ttl=settings.result_ttl)
        fleet = FleetStore(status.redis)
        fleet.started(hostname)  # a restarted node is neither stopping nor failed, as it may have been
        if risk := fleet.eviction_risk():
            log.warning("%s", risk)
        sender = producer_celery(settings)
        webhooks = sender_for(settings)
        events = TaskEvents(consumer.app, hostname)

        def ended(job_id: str) -> None:
            events.ended(status.get(job_id))
            notify(status, webhooks, job_id)

        recovery = Recovery(
            status,
            lambda job_id, request, queue: send_job(sender, job_id, request, queue),
            lease_ttl=settings.lease_ttl,
            max_attempts=settings.max_attempts,
            default_queue=settings.queue,
            notify=ended,
            requeued=lambda job_id, error: events.requeued(job_id, error, "recovered"),
        )
        revoke.CANCELLER.attach(status, events, notify=lambda job_id: notify(status, webhooks, job_id))
        timelimit.HARD.attach(
            status,
            notify=ended,
            requeued=lambda job_id: events.requeued(job_id, None, "handed back: its worker process was killed"),
        )
        interval = max(0.5, settings.lease_ttl / 2)
        self.hostname, self.status, self.events, self.fleet = hostname, status, events, fleet
        self._presence_ttl = int(interval * 3) + 1
        self.refresh_presence()
        self.sweeper = Sweeper(recovery, interval, also=self.refresh_presence).start()

    def refresh_presence(self) -> None:
        """What `svdq top` shows of this node, kept alive while this process lives."""
        assert self.fleet is not None and self.hostname is not None
        info = {"model": self.settings.served_model(), "source": self.settings.model, **whoami()}
        asked = os.environ.get("CUDA_VISIBLE_DEVICES", self.settings.device)
        self.fleet.present(self.hostname, info, self._presence_ttl, device=asked)

    def begin_grace(self, hostname: str | None, how: str) -> None:
        """SIGTERM (a warm shutdown): the running job may finish within SVDQ_STOP_GRACE, then is handed back.
        Runs inside Celery's signal handler, so the Redis write goes on a thread of its own."""
        fleet, grace = self.fleet, self.settings.stop_grace
        if how != "Warm" or fleet is None or hostname is None:
            return
        deadline = time.time() + grace

        def publish() -> None:
            fleet.stopping(hostname, deadline, grace)
            log.warning("warm shutdown: a running job may finish within %.0fs, then goes back to its queue", grace)

        threading.Thread(target=publish, name="svdq-stopping", daemon=True).start()

    def stop(self) -> None:
        """Shutdown: end the sweep; leave the presence with the load failure's reason, if that is why."""
        self._stopping.set()
        if self._starter is not None:
            self._starter.join(timeout=10)
        if self.sweeper is None or self.fleet is None or self.hostname is None:
            return
        self.sweeper.stop()
        if self.events is not None:
            self.events.close()
        failure = LoadFailure.from_env()
        if failure is not None and (error := failure.read()):  # keep the reason for `svdq top`
            report_to_presence(self.fleet.redis, self.hostname, self.settings.served_model(), error)
        else:
            self.fleet.gone(self.hostname)
