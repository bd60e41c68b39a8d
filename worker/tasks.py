"""The Celery task: hand over to `run_job`, and re-send the message when it asks for a retry."""

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
        queue = (self.request.delivery_info or {}).get("routing_key")
        hostname = self.request.hostname or "unknown"
        rt = runtime.current(settings)
        if not rt.events.bound:
            rt.events.bind(self.app, hostname)
        outcome = run_job(rt, job_id, request, worker=hostname, queue=queue, task_id=self.request.id)
        if outcome.retry_in is not None:
            # Same id, same queue (so the same priority); svdq counts attempts itself, hence no max here.
            raise self.retry(countdown=outcome.retry_in, max_retries=None)
        return outcome.as_dict()
