"""The Celery task: hand over to `run_job`. A job going back to its queue (a retry, a hand-back) waits in svdq's
retry schedule for a worker's sweeper to send its message (worker.recovery), never in a Celery countdown: an
idle worker held those in memory, and a Redis restart could end that worker (kombu) with the message in hand."""

from __future__ import annotations

from typing import Any

from celery import Celery

from producer.contract import TASK_NAME
from worker import runtime
from worker.events import Request
from worker.render import run_job
from worker.settings import WorkerSettings


def register(app: Celery, settings: WorkerSettings) -> None:
    # Request: Flower hears the job's state from svdq's record, not from this function's return (worker.events).
    @app.task(name=TASK_NAME, bind=True, acks_late=True, Request=Request)
    def generate_video(self: Any, job_id: str, request: dict[str, Any]) -> dict[str, Any]:
        # The routing key is the sender's to write: only a queue this worker reads is the job's (recovery sends
        # it back there); any other, a key an attacker chose, is not, and the job takes SVDQ_QUEUE's.
        routing_key = (self.request.delivery_info or {}).get("routing_key")
        queue = (
            routing_key if isinstance(routing_key, str) and routing_key in self.app.amqp.queues.consume_from else None
        )
        hostname = self.request.hostname or "unknown"
        rt = runtime.current(settings)
        if not rt.events.bound:
            rt.events.bind(self.app, hostname)
        return run_job(rt, job_id, request, worker=hostname, queue=queue, task_id=self.request.id).as_dict()
