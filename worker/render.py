"""One job, start to finish, in numbered steps. The Celery task is a thin wrapper around `run_job`.

Every way a job can end is written to its record: success with a result, or failure with an
error code. Nothing a request contains can take the worker process down.

Steps 1-4 run in the task and hold the GPU; step 5 (the encoder's last frames, the upload, the final
status: worker.finisher) is handed to the process's Finisher, so the next job can start on the GPU meanwhile.
How an attempt ends is worker.outcome's; its progress and stop checks are worker.progress's.

From its claim to its final status a job holds a lease (producer.status), kept alive by the process's
heartbeat; every write it makes is fenced by its attempt number, so a worker that lost its lease (frozen,
cut off) can never overwrite the attempt that took the job over.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import secrets
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import redis
import torch

from producer.contract import (
    ErrorCode,
    InvalidParameter,
    JobRequest,
    JobState,
    Stage,
    check_inputs,
    check_job_id,
    shown,
)
from producer.status import AttemptsExhausted, InvalidTransition, JobNotFound, Leased, MalformedRecord, StatusStore
from worker import webhooks
from worker.backoff import backoff
from worker.errors import HandBack, JobCanceled, JobFailed
from worker.finisher import complete
from worker.inputs import fetch_image, fit, open_image
from worker.outcome import (
    Attempt,
    Outcome,
    Work,
    announce_canceled,
    announce_end,
    fail_job,
    fail_work,
    lease_holder,
)
from worker.progress import Progress
from worker.runtime import Runtime
from worker.video import PendingVideo, Stopwatch, start_video

log = logging.getLogger(__name__)


def run_job(
    rt: Runtime, job_id: Any, raw_request: Any, worker: str, queue: str | None = None, task_id: str | None = None
) -> Outcome:
    # 1. Check the message: its id, its request, and that it asks for what the job's record asks for.
    accepted = _accept(rt, job_id, raw_request, queue)
    if isinstance(accepted, Outcome):
        return accepted
    try:
        return _run(rt, job_id, accepted, worker, task_id)
    except BaseException:
        # Redis gone mid-job (or a bug): stop renewing the lease, so that it lapses and a live worker
        # recovers the job from its record, instead of the job staying `started` for good.
        rt.heartbeat.release(job_id)
        raise


def _run(rt: Runtime, job_id: str, request: JobRequest, worker: str, task_id: str | None) -> Outcome:
    # 2. Claim the job and its lease; this worker must serve its model, within its own caps.
    attempt = _claim(rt, job_id, worker, task_id)
    if isinstance(attempt, Outcome):
        return attempt
    if (refused := _not_here(rt, request)) is not None:
        return fail_job(rt, attempt, refused)

    # 3-4. Fetch the image and render on the device.
    seed = request.seed if request.seed is not None else secrets.randbelow(2**32)
    work = Work(
        attempt, request, seed, timings={"load": round(rt.take_load_seconds(), 4)}, memory={"decode_chunk_size": 0}
    )
    pending = _render_or_end(rt, work)
    if isinstance(pending, Outcome):
        return pending

    # 5. Hand the rest to the finisher and free the GPU for the next job.
    _after_previous_tail(rt, work, pending)
    rt.finisher.submit(job_id, lambda: complete(rt, work, pending))
    return Outcome(job_id, JobState.STARTED, detail="finishing")


def _after_previous_tail(rt: Runtime, work: Work, pending: PendingVideo) -> None:
    """Wait for the previous job's tail (its upload: the finisher holds one at a time). That wait is not this
    job's: its deadline moves by as long (a slow upload must not time out the job rendered behind it)."""
    if rt.finisher.busy():
        # Celery's hard time limit counts this wait: should it kill the process meanwhile, the stage tells the
        # main process that this render had ended, and the job is handed back, not failed (worker.timelimit).
        with contextlib.suppress(redis.RedisError):
            rt.status.update(work.attempt.job_id, fence=work.attempt.number, stage=Stage.UPLOAD, progress=0.95)
    started = time.monotonic()
    rt.finisher.drain()
    waited = time.monotonic() - started
    if waited > 0 and work.attempt.deadline != math.inf:
        work.attempt = replace(work.attempt, deadline=work.attempt.deadline + waited)
        pending.writer.deadline += waited


def _not_here(rt: Runtime, request: JobRequest) -> JobFailed | None:
    """Why this worker must not render the request, though the producer accepted it: another model, or caps
    lower than the producer's (the producer checked with its own settings: these are this GPU's)."""
    if request.model and request.model != (served := rt.settings.served_model()):
        wrong = f"this worker serves model {served!r}, the job asks for {request.model!r} (it reached the wrong queue)"
        return JobFailed(ErrorCode.INVALID_INPUT, wrong)
    try:
        rt.settings.check_caps(request)
    except InvalidParameter as exc:
        return JobFailed(ErrorCode.INVALID_INPUT, str(exc))
    return None


def _render_or_end(rt: Runtime, work: Work) -> PendingVideo | Outcome:
    """Steps 3-4, holding the GPU; the attempt's end instead when it is canceled, handed back or fails."""
    attempt = work.attempt
    try:
        with _peak_memory(rt.renderer.device, work.memory):
            return _render(rt, work)
    except JobCanceled:
        log.info("job %s canceled (or taken over) while rendering; the GPU is free", attempt.job_id)
        rt.heartbeat.release(attempt.job_id)
        announce_end(rt, attempt.job_id)
        return Outcome(attempt.job_id, JobState.CANCELED)
    except HandBack:
        return _hand_back(rt, attempt)
    except JobFailed as exc:
        if exc.transient and (delay := _retry_delay(rt, attempt.counted)) is not None:
            return _requeue(rt, attempt, exc, delay)
        return fail_work(rt, work, exc)
    except Exception as exc:
        return fail_work(rt, work, exc)


# A valid request is about 1 KB (a URL or key, a webhook, numbers); the record keeps an invalid one for `svdq
# status` and Flower only up to this size: a raw message's megabytes would otherwise sit in Redis for days.
MAX_KEPT_REQUEST = 16 * 1024


def kept_request(body: dict[str, Any]) -> dict[str, Any]:
    size = len(json.dumps(body, default=repr))
    if size <= MAX_KEPT_REQUEST:
        return body
    return {"omitted": f"a request of {size} bytes, over {MAX_KEPT_REQUEST}: not kept"}


def _accept(rt: Runtime, job_id: Any, raw_request: Any, queue: str | None) -> JobRequest | Outcome:
    """The request to render, or the outcome for a message that must not run.

    An id outside the grammar names no record, key or file: dropped. A malformed request fails its own job,
    never the worker, and never a job that already has a record. The record is the truth: a plain Celery
    client may have sent none (it is created here), and a message whose request is not its record's is
    refused, or any sender could re-render someone else's job."""
    status = rt.status
    try:
        check_job_id(job_id)
    except InvalidParameter:
        log.error("dropped a message with an invalid job id %s", shown(job_id))
        return Outcome(None, None, detail="dropped: invalid job_id")
    body = raw_request if isinstance(raw_request, dict) else {}
    try:
        request = check_inputs(body, JobRequest)
    except InvalidParameter as exc:
        if not status.create(job_id, kept_request(body), queue=queue):
            return _unreadable(rt, job_id, exc)
        log.warning("job %s has an invalid request: %s", job_id, exc)
        return fail_job(rt, Attempt(job_id, 0, ""), JobFailed(ErrorCode.INVALID_INPUT, f"invalid request: {exc}"))
    if not status.create(job_id, request.model_dump(), queue=queue) and (refused := _refused(status, job_id, request)):
        log.warning("job %s: message dropped: %s", job_id, refused)
        return Outcome(job_id, None, detail=f"dropped: {refused}")
    return request


def _unreadable(rt: Runtime, job_id: str, exc: InvalidParameter) -> Outcome:
    """A message this worker cannot read, for a job that has a record. When it cannot read the record either,
    a newer svdq wrote it (a parameter this worker does not know, say): the job fails saying so, where it
    waited `queued` for ever. Otherwise the message is not the record's (any sender's): dropped."""
    try:
        record = rt.status.get(job_id)
        check_inputs(record.request, JobRequest)
    except InvalidParameter as unknown:
        if record.state is JobState.QUEUED:
            log.error("job %s: this worker cannot read its request: %s", job_id, unknown)
            newer = JobFailed(
                ErrorCode.INVALID_INPUT,
                f"this worker cannot read the job's request ({unknown}): it was sent by a newer svdq than the "
                "worker's? Upgrade workers before producers",
            )
            # unleased: never over an attempt running on a worker that can read it
            return fail_job(rt, Attempt(job_id, 0, ""), newer, unleased=True)
    except (JobNotFound, MalformedRecord):
        pass
    log.warning("job %s: dropped a message with an invalid request (%s); its record stands", job_id, exc)
    return Outcome(job_id, None, detail="dropped: invalid request")


def _refused(status: StatusStore, job_id: str, request: JobRequest) -> str | None:
    """Why a message for a job that has a record must not run it; None when the record asks for the same."""
    try:
        recorded = check_inputs(status.get(job_id).request, JobRequest)
    except JobNotFound:  # expired just now: the claim finds no record and refuses on its own
        return None
    except (MalformedRecord, InvalidParameter) as exc:
        return f"the job's record is unreadable ({exc})"
    return None if recorded == request else "its request differs from the job's record"


def _claim(rt: Runtime, job_id: str, worker: str, task_id: str | None) -> Attempt | Outcome:
    """This process's attempt at the job, or the outcome when it must not run here."""
    holder = lease_holder(worker, os.getpid())
    claimed = time.monotonic()  # the time limit counts from here
    try:
        number = rt.status.claim(
            job_id,
            holder,
            rt.settings.lease_ttl,
            max_attempts=rt.settings.max_attempts,
            worker=worker,
            started_at=rt.status.now(),
            stage=Stage.FETCH,
            progress=0.0,
            error=None,
        )
    except Leased as exc:  # a redelivered message: the job runs on a live worker, it must not run twice
        log.info("job %s not run here: %s", job_id, exc)
        return Outcome(job_id, JobState.STARTED, detail=f"running on {exc.holder}")
    except AttemptsExhausted as exc:  # its worker died on every attempt: a poison job
        lost = JobFailed(ErrorCode.WORKER_LOST, f"{exc}; it is not tried again")
        return fail_job(rt, Attempt(job_id, exc.attempts, holder), lost, unleased=True)
    except InvalidTransition as exc:  # canceled while queued, or already finished elsewhere
        log.info("job %s not run: %s", job_id, exc)
        if exc.current is JobState.CANCELED:
            announce_canceled(rt, job_id)
        return Outcome(job_id, exc.current)
    rt.heartbeat.hold(job_id, holder, worker)
    if task_id and task_id != job_id and rt.status.state(task_id) is None:  # a plain client's own task id,
        rt.events.track(job_id, task_id)  # never another job's: its Flower row must not show this job
    rt.events.started(job_id)
    record = rt.status.get(job_id)
    if record.webhook and not (rt.webhooks and rt.webhooks.secret):  # said on the job, not only in this log
        unsigned = "not called: the worker has no SVDQ_WEBHOOK_SECRET to sign it with"
        log.warning("job %s: webhook %s", job_id, unsigned)
        rt.status.update(job_id, fence=number, webhook_error=unsigned)
    rt.metrics.job_started(record)
    webhooks.notify_record(rt.webhooks, record)
    limit = rt.settings.job_timeout
    return Attempt(job_id, number, holder, record.handbacks, deadline=claimed + limit if limit else math.inf)


def _render(rt: Runtime, work: Work) -> PendingVideo:
    # 3. Fetch and decode the input image.
    request = work.request
    progress = Progress(rt.status, work.attempt, hand_back=rt.heartbeat.should_hand_back, events=rt.events)
    started = time.perf_counter()
    data = _fetch(rt, work.attempt, request.image, progress.check)
    image = fit(open_image(data, rt.settings.max_image_pixels), request.width, request.height)
    Stopwatch(work.timings).add("fetch", started)

    # 4. Denoise, then decode streamed into the encoder (worker.video).
    return start_video(
        rt.renderer,
        image,
        request,
        work.seed,
        rt.settings,
        timings=work.timings,
        memory=work.memory,
        progress=progress,
        checkpoint=progress.check,
        deadline=work.attempt.deadline,
    )


def _fetch(rt: Runtime, attempt: Attempt, ref: str, checkpoint: Callable[[], None]) -> bytes:
    """The input's bytes. An unreachable store is waited for, up to SVDQ_FETCH_WAIT seconds with backoff, before
    the attempt fails transient (and the retry path takes over): retries cost attempts, and a 30 s outage
    used them all in seconds. The wait stays cancelable and ends at a stopping worker's hand-back."""
    settings = rt.settings
    # Only the store is waited for: a URL's host is anyone's, and one answering 503 must not hold a GPU for
    # minutes (its failures take the retry path at once, as before).
    waits = not ref.startswith(("http://", "https://"))
    deadline = time.monotonic() + (settings.fetch_wait if waits else 0.0)
    tries = 0
    while True:
        tries += 1
        try:
            return fetch_image(
                rt.store,
                ref,
                settings.max_image_bytes,
                allow_private_urls=settings.allow_private_urls,
                deadline=settings.fetch_timeout,
                stop=lambda: _stops(checkpoint),
            )
        except JobFailed as exc:
            checkpoint()  # a download that stopped for a cancel or a hand-back ends as one
            if not exc.transient or time.monotonic() >= deadline:
                raise
            pause = min(deadline - time.monotonic(), backoff(tries, 0.5, 10.0, random.random()))
            log.warning("job %s: %s; waiting %.1fs for it (SVDQ_FETCH_WAIT)", attempt.job_id, exc, pause)
        resume = time.monotonic() + pause
        while (left := resume - time.monotonic()) > 0:
            checkpoint()  # JobCanceled or HandBack end the wait
            time.sleep(min(left, 0.25))


def _stops(checkpoint: Callable[[], None]) -> bool:
    """Whether `checkpoint` would end the attempt (asked from a download's watch thread, which cannot raise)."""
    try:
        checkpoint()
    except (JobCanceled, HandBack, JobFailed):  # JobFailed: the attempt's time limit
        return True
    return False


# Why a job this attempt is requeueing or handing back may be `queued` already: its own write, repeated after
# its reply was lost, or a sweeper's (which sent a message). A second message would be dropped by the claim.
AGAIN = "this write repeated after its reply was lost in a Redis restart, or a sweeper's"


def _retry_delay(rt: Runtime, attempts: int) -> float | None:
    """Seconds to wait before the next attempt, or None when this was the last one allowed."""
    if attempts >= rt.settings.max_attempts:
        return None
    return backoff(attempts, rt.settings.retry_backoff, rt.settings.retry_backoff_max, random.random())


def _requeue(rt: Runtime, attempt: Attempt, exc: JobFailed, delay: float) -> Outcome:
    log.warning("job %s: %s; retrying in %.1fs", attempt.job_id, exc, delay)
    rt.heartbeat.release(attempt.job_id)
    try:
        rt.status.transition(
            attempt.job_id,
            JobState.QUEUED,
            fence=attempt.number,
            error=exc.as_error(),
            stage=Stage.RETRYING,
            progress=0.0,
            # Its message is sent when due, by a worker's sweeper (worker.recovery): not a Celery countdown,
            # which an idle worker would hold in memory until then (and lose to a Redis restart).
            due=rt.status.server_time() + delay,
        )
    except InvalidTransition as refused:  # (not `exc`: that is the job's error, used below)
        if refused.current is not JobState.QUEUED:  # canceled meanwhile: no retry
            announce_end(rt, attempt.job_id)
            return Outcome(attempt.job_id, JobState.CANCELED)
        log.info("job %s was queued already (%s)", attempt.job_id, AGAIN)
    rt.events.requeued(attempt.job_id, exc.as_error(), "retrying")
    return Outcome(attempt.job_id, JobState.QUEUED, detail=f"retry due in {delay:.1f}s")


def _hand_back(rt: Runtime, attempt: Attempt) -> Outcome:
    """The worker is stopping and its grace period is over: back to the queue, for another worker."""
    log.warning("job %s handed back to its queue: the worker is stopping", attempt.job_id)
    rt.heartbeat.release(attempt.job_id)
    try:
        rt.status.transition(
            attempt.job_id,
            JobState.QUEUED,
            fence=attempt.number,
            handback=True,  # a deploy's stop is not the job's failure: its attempt does not count
            stage=Stage.HANDED_BACK,
            progress=0.0,
            due=rt.status.server_time(),  # at once, by any worker's sweeper: see _requeue
        )
    except InvalidTransition as refused:
        if refused.current is not JobState.QUEUED:
            announce_end(rt, attempt.job_id)
            return Outcome(attempt.job_id, None)
        log.info("job %s was queued already (%s)", attempt.job_id, AGAIN)
    rt.events.requeued(attempt.job_id, None, "handed back: its worker is stopping")
    return Outcome(attempt.job_id, JobState.QUEUED, detail="handed back")


@contextmanager
def _peak_memory(device: torch.device, memory: dict[str, Any]) -> Iterator[None]:
    """Record the device's memory peak over the job's device work (CUDA only)."""
    if device.type != "cuda":
        yield
        return
    torch.cuda.reset_peak_memory_stats(device)
    try:
        yield
    finally:
        memory["peak_bytes"] = int(torch.cuda.max_memory_allocated(device))
