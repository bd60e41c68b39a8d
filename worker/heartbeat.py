"""Keeps this process's job leases alive, and tells it when a warm shutdown's grace period is over.

A job's lease (producer.status) lives `lease_ttl` seconds unless renewed. This thread renews every lease
the process holds, a third of the way through, so only a dead or frozen process lets one lapse. On the
same beat it reads the worker's `stopping` key, which the main process writes on SIGTERM, so a job still
running when the grace period ends can hand itself back to the queue.
"""

from __future__ import annotations

import logging
import threading
import time

import redis

from producer.contract import JobState
from producer.fleet import FleetStore
from producer.status import StatusStore

log = logging.getLogger(__name__)


class Heartbeat:
    def __init__(self, status: StatusStore, lease_ttl: float):
        self.status = status
        self.fleet = FleetStore(status.redis)
        self.lease_ttl = lease_ttl
        self._held: dict[str, tuple[str, str]] = {}  # job id -> (holder, worker node name)
        self._told: set[str] = set()  # held jobs whose lost lease has been logged: once is enough
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._hand_back_at: float | None = None  # epoch seconds
        self._thread = threading.Thread(target=self._run, name="svdq-heartbeat", daemon=True)
        self._thread.start()

    def hold(self, job_id: str, holder: str, worker: str) -> None:
        with self._lock:
            self._held[job_id] = (holder, worker)

    def release(self, job_id: str) -> None:
        with self._lock:
            self._held.pop(job_id, None)
            self._told.discard(job_id)

    def should_hand_back(self) -> bool:
        """True once the worker is stopping and its grace period is over."""
        return self._hand_back_at is not None and time.time() >= self._hand_back_at

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self.lease_ttl / 3):
            with self._lock:
                held = dict(self._held)
            try:
                self._beat(held)
            except redis.RedisError as exc:  # Redis restarting: the lease has TTL to spare, try next beat
                log.warning("heartbeat: %s", exc)

    def _beat(self, held: dict[str, tuple[str, str]]) -> None:
        for job_id, (holder, _) in held.items():
            if job_id in self._told or self.status.renew(job_id, holder, self.lease_ttl):
                continue
            with self._lock:
                self._told.add(job_id)
            if self.status.state(job_id) is JobState.CANCELED:  # a cancel ends the lease too
                log.info("job %s: canceled; its render stops at the next check", job_id)
            else:
                log.warning("job %s: lease lost (expired or taken over); its result will be dropped", job_id)
        for worker in {w for _, w in held.values()}:
            deadline = self.fleet.stop_deadline(worker)
            if deadline is not None:
                self._hand_back_at = deadline
