"""Revoke and Terminate (Flower's buttons, `celery control revoke`) mean `svdq cancel`.

Celery's own revoke remembers the id in each worker's memory and, with terminate, kills the pool process that
runs it. For svdq that loses the warm model (minutes to reload), and a job that a sweeper or a retry sends
again under the same id is then discarded unseen while its record still says `queued`: nobody's wait ever
returns. So svdq workers answer `revoke` themselves: the job's record is canceled (the one truth every worker
and client reads), a running render stops at its next check as for any cancel, and no process is signalled.
An id Celery discards as revoked anyway (a worker started with `--statedb`, revoke by stamped headers) is
canceled too, so no revoke can strand a job.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import redis
from celery.utils.functional import maybe_list
from celery.worker.control import control_command, ok

from producer.contract import InvalidParameter, JobState, Stage, check_job_id, shown
from producer.status import InvalidTransition, StatusStore
from worker.events import TaskEvents

log = logging.getLogger(__name__)


class Canceller:
    """Cancels jobs by id for the worker's main process; `attach` gives it its Redis and events at start."""

    def __init__(self) -> None:
        self.status: StatusStore | None = None
        self.events: TaskEvents | None = None
        self.notify: Callable[[str], None] = lambda job_id: None

    def attach(self, status: StatusStore, events: TaskEvents, notify: Callable[[str], None]) -> None:
        self.status, self.events, self.notify = status, events, notify

    def cancel(self, task_ids: list[str], why: str) -> list[str]:
        """Cancel each job that is still queued or started; returns the ids canceled here."""
        if self.status is None:
            log.warning("%s before this worker was ready: not applied to %s", why, shown(task_ids))
            return []
        canceled = []
        for task_id in task_ids:
            try:
                job_id = check_job_id(task_id)
                before = self.status.state(job_id)
                self.status.transition(job_id, JobState.CANCELED, stage=Stage.REVOKED)
            except (InvalidParameter, InvalidTransition):  # not a job id, or already ended: nothing to cancel
                continue
            except redis.RedisError as exc:
                log.error("%s of job %s not applied: Redis: %s", why, job_id, exc)
                continue
            log.warning("job %s canceled: %s", job_id, why)
            canceled.append(job_id)
            if before is JobState.QUEUED and self.events is not None:
                # No render will see it before its message comes up: tell Flower (and the webhook) now. A
                # running job's render stops at its next check and tells them itself.
                self.events.ended(self.status.get(job_id))
                self.notify(job_id)
        return canceled


CANCELLER = Canceller()


def install(canceller: Canceller = CANCELLER) -> None:
    """Replace Celery's `revoke` and `terminate` control commands in this process (a worker's main process)."""

    @control_command(variadic="task_id", signature="[id1 [id2 [... [idN]]]]")
    def revoke(state: Any, task_id: Any, terminate: bool = False, signal: str | None = None, **_: Any) -> Any:
        """Cancel svdq jobs by id (terminate is a cancel too: the worker process is never signalled)."""
        ids = [str(one) for one in maybe_list(task_id) or []]
        why = "revoked and terminated (Flower or celery control)" if terminate else "revoked (Flower or celery control)"
        done = canceller.cancel(ids, why)
        return ok(f"svdq canceled {', '.join(done) or 'nothing'}; the worker process is not signalled")

    # `celery control terminate SIG ID` is a command of its own, calling Celery's revoke, not the one above.
    @control_command(variadic="task_id", args=[("signal", str)], signature="<signal> [id1 [id2 [... [idN]]]]")
    def terminate(state: Any, signal: str, task_id: Any, **_: Any) -> Any:
        """Cancel svdq jobs by id: a revoke that terminates, so the worker process is not signalled either."""
        return revoke(state, task_id, terminate=True, signal=signal)


def on_task_revoked(request: Any = None, **_: Any) -> None:
    """Celery's `task_revoked` signal: it discarded a message as revoked (or expired), so its job must not stay
    queued. Only a message that names its own job (task id == job id, as svdq sends them) cancels it: any
    sender can set a message's task id and expiry, and must not cancel someone else's job that way."""
    task_id = getattr(request, "id", None)
    job_id = (getattr(request, "kwargs", None) or {}).get("job_id")
    if task_id and job_id == task_id:
        CANCELLER.cancel([task_id], "discarded by Celery as revoked")
