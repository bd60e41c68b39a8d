"""The Celery task: hand over to `run_job`, and re-send the message when it asks for a retry."""

from __future__ import annotations

from typing import Any

from celery import Celery

from producer.contract import TASK_NAME
from worker import runtime
from worker.render import run_job
from worker.settings import WorkerSettings


def register(app: Celery, settings: WorkerSettings) -> None:
    @app.task(name=TASK_NAME, bind=True, acks_late=True)
    def generate_video(self: Any, job_id: str, request: dict[str, Any]) -> dict[str, Any]:
        queue = (self.request.delivery_info or {}).get("routing_key")
        rt = runtime.current(settings)
        outcome = run_job(rt, job_id, request, worker=self.request.hostname or "unknown", queue=queue)
        if "retry_in" in outcome:
            # Same id, same queue (so the same priority); svdq counts attempts itself, hence no max here.
            raise self.retry(countdown=outcome["retry_in"], max_retries=None)
        return outcome
