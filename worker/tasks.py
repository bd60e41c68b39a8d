"""The Celery task: deserialise, hand over to `run_job`, nothing else (no retries yet, no logic)."""

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
        return run_job(runtime.current(settings), job_id, request, worker=self.request.hostname or "unknown")
