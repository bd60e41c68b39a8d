"""The Celery task: hand over to `run_job`, and re-send the message when it asks for a retry."""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery
from celery.exceptions import Reject

from producer.contract import TASK_NAME
from worker import runtime
from worker.events import Request
from worker.render import run_job
from worker.settings import WorkerSettings

log = logging.getLogger(__name__)

# The retry's message rides out a Redis restart or failover as the job's status writes do (about a minute):
# Celery's default gives up within a second.
PUBLISH_RETRY = {"max_retries": 60, "interval_start": 0, "interval_step": 0.5, "interval_max": 1}


def register(app: Celery, settings: WorkerSettings) -> None:
    # Request: Flower hears the job's state from svdq's record, not from this function's return (worker.events).
    # max_retries=None: svdq counts attempts itself (SVDQ_MAX_ATTEMPTS; hand-backs not counted). Celery's own
    # cap (3) ended the fourth re-send with MaxRetriesExceededError and the job's record `queued`, message gone.
    @app.task(name=TASK_NAME, bind=True, acks_late=True, Request=Request, max_retries=None)
    def generate_video(self: Any, job_id: str, request: dict[str, Any]) -> dict[str, Any]:
        queue = (self.request.delivery_info or {}).get("routing_key")
        hostname = self.request.hostname or "unknown"
        rt = runtime.current(settings)
        if not rt.events.bound:
            rt.events.bind(self.app, hostname)
        outcome = run_job(rt, job_id, request, worker=hostname, queue=queue, task_id=self.request.id)
        if outcome.retry_in is not None:
            try:
                # Same id, same queue (so the same priority).
                raise self.retry(countdown=outcome.retry_in, retry_policy=PUBLISH_RETRY)
            except Reject as exc:
                # Celery could not send the new message and would drop this one: the record already says
                # `queued`, so the job would wait for ever for a message that no longer exists. This one goes
                # back to its queue instead (now, without the backoff). Where the broker refuses that too, it
                # stays unacknowledged until the visibility timeout brings it back (and Celery, which takes a
                # refusal for a broken broker, stops this worker).
                log.error("job %s: could not re-send its message (%s); putting this one back", job_id, exc.reason)
                raise Reject(exc.reason, requeue=True) from None
        return outcome.as_dict()
