"""The Python client web backends import: `Client.from_env().submit(image, **params) -> Job`."""

from __future__ import annotations

import contextlib
import errno
import functools
import io
import json
import os
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import redis
from celery import Celery
from PIL import Image
from redis.backoff import ExponentialWithJitterBackoff
from redis.retry import Retry
from redis.sentinel import Sentinel

from producer import images, keys, wire
from producer.contract import (
    MAX_REFERENCE,
    TASK_NAME,
    InvalidParameter,
    JobParams,
    JobRecord,
    JobState,
    check_inputs,
    check_job_id,
    has_control,
    model_queue,
    queue_for,
    shown,
)
from producer.netguard import UnsafeURL, check_url
from producer.settings import Settings, broker_transport_options, is_sentinel, parse_sentinel_url
from producer.status import DuplicateKey, InvalidTransition, JobNotFound, StatusStore, as_text
from producer.storage import (
    FOLDER_REFUSED,
    ObjectStore,
    StorageRefused,
    StorageUnavailable,
    content_name,
    not_readable,
    open_store,
)

ImageInput = str | Path | bytes | Image.Image | BinaryIO
URL_SCHEMES = ("s3://", "file://", "http://", "https://")  # an image given as one is read by the worker


def connect_redis(settings: Settings, *, retry_for: float = 4.0) -> redis.Redis:
    """A client for SVDQ_REDIS_URL that rides out a Redis restart (or failover) of about `retry_for` seconds.

    Short timeouts: a producer in a web request should fail fast, not hang, when Redis is away.
    """
    retries = max(1, int(retry_for * 2))  # jittered waits of half a second on average
    options: dict[str, Any] = {
        "socket_connect_timeout": 5,
        "socket_timeout": 30,
        "health_check_interval": 30,
        "retry": Retry(ExponentialWithJitterBackoff(base=0.05, cap=1.0), retries),
    }
    if not is_sentinel(settings.redis_url):
        return redis.Redis.from_url(settings.redis_url, **options)
    nodes, password, db = parse_sentinel_url(settings.redis_url)
    sentinel = Sentinel(nodes, socket_timeout=5, sentinel_kwargs={"password": password} if password else None)
    # Asks the sentinels for the current master on every (re)connection, so a failover is followed.
    return sentinel.master_for(settings.sentinel_master, db=db, password=password, **options)


def producer_celery(settings: Settings) -> Celery:
    """A Celery app that only sends: producers never import the worker (or torch)."""
    app = Celery("svdq-producer", broker=settings.redis_url, set_as_current=False)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        broker_connection_retry_on_startup=True,
        broker_transport_options=broker_transport_options(settings),
    )
    return app


class NotCancelable(RuntimeError):
    def __init__(self, job_id: str, state: JobState):
        self.job_id, self.state = job_id, state
        super().__init__(f"job {job_id} already {state.value}: only queued or started jobs can be canceled")


def _next_event(events: redis.client.PubSub, timeout: float) -> None:
    """Wait up to `timeout` for the next event; a broken connection just ends the wait early."""
    try:
        events.get_message(timeout=timeout)
    except redis.ConnectionError:
        time.sleep(min(timeout, 0.5))  # redis-py resubscribes on the next call


class Job:
    """A thin handle: an id and the client it talks through."""

    def __init__(self, job_id: str, client: Client):
        self.id = job_id
        self.client = client

    def __repr__(self) -> str:
        return f"Job({self.id!r})"

    def status(self) -> JobRecord:
        return self.client.records.get(self.id)

    def wait(
        self,
        timeout: float | None = None,
        *,
        on_update: Callable[[JobRecord], None] | None = None,
        reread_every: float = 1.0,
    ) -> JobRecord:
        """Block until the job is terminal and return its record; TimeoutError after `timeout` seconds.

        Woken by the job's events, not a sleep loop. The record is re-read after every event and at
        least every `reread_every` seconds, so a missed event (or a dropped connection) only delays.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        events = self.client.redis.pubsub(ignore_subscribe_messages=True)
        try:
            events.subscribe(keys.events(self.id))  # before the first read: nothing can slip in between
            while True:
                record = self.status()
                if on_update is not None:
                    on_update(record)
                if record.state.is_terminal():
                    return record
                remaining = reread_every if deadline is None else deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"job {self.id} still {record.state.value} after {timeout:g}s")
                _next_event(events, min(remaining, reread_every))
        finally:
            events.close()

    def cancel(self) -> JobRecord:
        """Cancel a queued job (it never starts) or a running one (it stops within its current step)."""
        try:
            self.client.records.transition(self.id, JobState.CANCELED)
        except InvalidTransition as exc:
            if exc.current is None:
                raise JobNotFound(self.id) from None
            raise NotCancelable(self.id, exc.current) from None
        return self.status()

    def video_bytes(self) -> bytes:
        record = self.status()
        if record.state is not JobState.SUCCEEDED or record.result is None:
            raise RuntimeError(f"job {self.id} is {record.state.value}: there is no video to fetch")
        return self.client.store.read_key(record.result.key)

    def download(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_bytes(self.video_bytes())
        return path


class Client:
    def __init__(self, settings: Settings, redis_client: redis.Redis, store: ObjectStore, celery: Celery):
        self.settings = settings
        self.redis = redis_client
        self.records = StatusStore(  # the job records; Job.status() is one record
            redis_client, result_ttl=settings.result_ttl
        )
        self.store = store
        self.celery = celery
        self.intake = Intake(settings, store)

    @classmethod
    def from_env(cls, **overrides: Any) -> Client:
        settings = Settings(**overrides)
        return cls(settings, connect_redis(settings), open_store(settings), producer_celery(settings))

    def close(self) -> None:
        self.redis.close()
        self.celery.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def job(self, job_id: str) -> Job:
        """A handle on a job by its id; an id outside the job-id grammar raises InvalidParameter("job_id")."""
        return Job(check_job_id(job_id), self)

    def list(self, state: JobState | str | None = None, limit: int = 20) -> list[JobRecord]:
        """The newest jobs, optionally in one state."""
        return self.records.list(JobState(state) if state else None, limit)

    def submit(
        self,
        image: ImageInput,
        *,
        priority: str = "normal",
        idempotency_key: str | None = None,
        webhook: str | None = None,
        **params: Any,
    ) -> Job:
        """Validate, store the image, write a `queued` record and its message. Returns the job's handle.

        A bad parameter or unreadable image raises InvalidParameter before anything is written. With an
        `idempotency_key` already used (by any client, at any time until that job's record expires), the
        job that holds it is returned and nothing is enqueued; if that job was asked for another render (other
        parameters or another image), KeyConflict is raised instead.
        """
        # 1. Check parameters and the image: nothing is stored or enqueued if either is bad.
        checked = self.intake.check(
            image, priority=priority, idempotency_key=idempotency_key, webhook=webhook, params=params
        )

        # 2. Store the image once per content; URLs the worker can read are passed through.
        image_ref = checked.image_ref or self.intake.store_image(checked)

        # 3. The record (atomically claiming the idempotency key) and its Celery message in one script: a job
        #    is created enqueued or not at all, and a key maps to one job however many submits race for it.
        job_id = uuid.uuid4().hex
        request = checked.request(image_ref)
        try:
            self.records.create(
                job_id,
                request,
                idempotency_key=idempotency_key,
                priority=priority,
                webhook=webhook,
                queue=checked.queue,
                push=(checked.queue, wire.message(job_id, request, checked.queue)),
            )
        except DuplicateKey as dup:
            if dup.job_id != job_id:  # else its own key: a retried creation whose first reply was lost
                with contextlib.suppress(JobNotFound):  # gone since: its key went with it
                    check_same_request(dup.job_id, self.records.get(dup.job_id).request, request)
                return Job(dup.job_id, self)
        return Job(job_id, self)

    def submit_many(
        self,
        submissions: Iterable[Submission],
        *,
        priority: str = "normal",
        webhook: str | None = None,
        batch_size: int = 500,
        concurrency: int = 8,
        **defaults: Any,
    ) -> Iterator[Submitted]:
        """Submit each in turn, yielding as it goes: a job, or the InvalidParameter that refused it (the rest go on).

        A submission's own `params` override `defaults`. One whose idempotency key already names a job is not
        submitted again, nor its image read or stored: its job is yielded with `existed=True`, so a re-run of a
        big batch costs two Redis reads per item; if that job was asked for other parameters, the submission is
        refused with KeyConflict (its image is not compared: it is not read). Pipelined: `batch_size`
        submissions at a time, their images checked and stored `concurrency` at a time, their keys read in one
        round trip, their records and messages (producer.wire) written in another, each job's two in one script."""
        # While Redis runs one batch's scripts, this thread prepares the next: at most two batches in hand.
        with (
            ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="svdq-submit") as pool,
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="svdq-write") as writer,
        ):
            writing: tuple[_Batch, Future[list[Exception | None]]] | None = None
            uploads: dict[str, Future[str]] = {}  # content name -> its upload: many rows of one image store it once
            batches = _batches(submissions, batch_size)
            while True:
                try:
                    if (chunk := next(batches, None)) is None:
                        break
                    if len(uploads) > 10_000:
                        uploads.clear()
                    batch = self._prepare(chunk, pool, uploads, priority, webhook, defaults)
                except BaseException:
                    # Ctrl-C or a failure while preparing: the batch being written exists all the same, so the
                    # caller hears of its jobs (to follow or cancel them) before the exception.
                    yield from self._results(writing)
                    raise
                yield from self._results(writing)
                writing = batch, writer.submit(self.records.create_many, list(batch.creations.values()))
            yield from self._results(writing)

    def _prepare(
        self,
        batch: list[Submission],
        pool: ThreadPoolExecutor,
        uploads: dict[str, Future[str]],
        priority: str,
        webhook: str | None,
        defaults: dict[str, Any],
    ) -> _Batch:
        # 1. Keys already held: those jobs exist (a re-run). A key another batch is claiming right now is not
        # seen here, but its creation script refuses it (DuplicateKey, below).
        pipe = self.redis.pipeline(transaction=False)
        for submission in batch:
            pipe.get(keys.idempotency(submission.idempotency_key or "-"))
        held = [
            as_text(h) if h is not None and s.idempotency_key else None
            for s, h in zip(batch, pipe.execute(), strict=True)
        ]
        conflicts = self._conflicts(batch, held, priority, defaults) if any(held) else {}

        # 2. Check the others here (CPU), and store their images on the pool, `concurrency` at a time (I/O).
        def check(submission: Submission) -> Checked | InvalidParameter:
            try:
                return self.intake.check(
                    submission.image,
                    priority=priority,
                    webhook=webhook,
                    idempotency_key=submission.idempotency_key,
                    params={**defaults, **submission.params},
                )
            except InvalidParameter as exc:
                return exc

        checked: dict[int, Checked | InvalidParameter] = {
            i: check(batch[i]) for i, job_id in enumerate(held) if job_id is None
        }
        stored = {}
        for i, c in checked.items():
            if isinstance(c, Checked) and c.data is not None:
                if (upload := uploads.get(c.name)) is None:
                    upload = uploads[c.name] = pool.submit(self.intake.store_image, c)
                stored[i] = upload
        checks = {
            i: c if isinstance(c, InvalidParameter) else (c, c.image_ref or stored[i].result())
            for i, c in checked.items()
        }
        for i, conflict in conflicts.items():
            held[i], checks[i] = None, conflict

        # 3. What to create: each record with its message, written in one script (StatusStore.create_many), so a
        # job is created enqueued or not at all, however the batch fails.
        todo = [(i, c) for i, c in checks.items() if not isinstance(c, InvalidParameter)]
        randoms = _random_hex(2 * len(todo))  # a job id and a delivery tag each
        creations = {
            i: _creation(c[0], c[1], priority, webhook, batch[i].idempotency_key, next(randoms), next(randoms))
            for i, c in todo
        }
        return _Batch(batch, held, checks, creations)

    def _conflicts(
        self, batch: list[Submission], held: list[str | None], priority: str, defaults: dict[str, Any]
    ) -> dict[int, InvalidParameter]:
        """The held keys whose jobs were asked for other parameters (one round trip for their requests), by
        position: their submissions are refused, not answered with another render's job."""
        positions = [i for i, job_id in enumerate(held) if job_id is not None]
        pipe = self.redis.pipeline(transaction=False)
        for i in positions:
            pipe.hget(keys.job(held[i] or ""), "request")
        conflicts: dict[int, InvalidParameter] = {}
        for i, raw in zip(positions, pipe.execute(), strict=True):
            if raw is None:  # expired since: its key went with it
                continue
            try:
                request = self.intake.check_request({**defaults, **batch[i].params}, priority)[0].model_dump()
            except InvalidParameter:  # its job passed the checks of its day (caps since lowered): it stands
                continue
            try:
                check_same_request(held[i] or "", json.loads(as_text(raw)), request)
            except KeyConflict as exc:
                conflicts[i] = exc
        return conflicts

    def _check_taken(self, batch: _Batch, job_id: str, request: dict[str, Any]) -> None:
        """KeyConflict if the job that took a key meanwhile was asked for another render than `request`."""
        held = next((c["request"] for c in batch.creations.values() if c["job_id"] == job_id), None)
        if held is None and (raw := self.redis.hget(keys.job(job_id), "request")) is not None:
            held = json.loads(as_text(raw))
        if held is not None:
            check_same_request(job_id, held, request)

    def _results(self, writing: tuple[_Batch, Future[list[Exception | None]]] | None) -> Iterator[Submitted]:
        """A written batch's submissions, once its scripts have run (none before the first batch)."""
        if writing is None:
            return
        batch, answers = writing
        refused = dict(zip(batch.creations, answers.result(), strict=True))
        for i, submission in enumerate(batch.submissions):
            if (held := batch.held[i]) is not None:
                yield Submitted(submission, Job(held, self), existed=True)
            elif isinstance(error := batch.checks[i], InvalidParameter):
                yield Submitted(submission, None, error=error)
            elif (why := refused[i]) is None:
                yield Submitted(submission, Job(batch.creations[i]["job_id"], self))
            elif isinstance(why, DuplicateKey):  # a row before it in the batch, or another submit, took the key
                try:
                    self._check_taken(batch, why.job_id, batch.creations[i]["request"])
                except KeyConflict as exc:
                    yield Submitted(submission, None, error=exc)
                    continue
                yield Submitted(submission, Job(why.job_id, self), existed=True)
            else:  # a fresh random id that already had a record, or Redis refused the script
                raise why


@dataclass
class _Batch:
    """One batch of submit_many on its way: what was found, checked and is to be created, by position."""

    submissions: list[Submission]
    held: list[str | None]
    checks: dict[int, tuple[Checked, str] | InvalidParameter]
    creations: dict[int, dict[str, Any]]


def _random_hex(n: int) -> Iterator[str]:
    """`n` random 128-bit values as hex (uuid4's randomness), from one read of the OS's source: a read per value
    costs more than the rest of a job's message."""
    pool = os.urandom(16 * n).hex()
    return (pool[i : i + 32] for i in range(0, 32 * n, 32))


def _creation(
    checked: Checked,
    image_ref: str,
    priority: str,
    webhook: str | None,
    idempotency_key: str | None,
    job_id: str,
    tag: str,
) -> dict[str, Any]:
    """`StatusStore.create_many`'s arguments for one job, its Celery message (producer.wire) included."""
    request = checked.request(image_ref)
    return {
        "job_id": job_id,
        "request": request,
        "priority": priority,
        "webhook": webhook,
        "queue": checked.queue,
        "idempotency_key": idempotency_key,
        "push": (checked.queue, wire.message(job_id, request, checked.queue, tag=str(uuid.UUID(tag, version=4)))),
    }


def _batches(items: Iterable[Submission], size: int) -> Iterator[list[Submission]]:
    batch: list[Submission] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


@dataclass(frozen=True)
class Submission:
    """One item of `Client.submit_many`: an image, its own parameters, and its idempotency key."""

    image: ImageInput
    params: dict[str, Any] = field(default_factory=dict)
    idempotency_key: str | None = None


@dataclass(frozen=True)
class Submitted:
    """What became of a Submission: its job, or the error that refused it before anything was written."""

    submission: Submission
    job: Job | None
    error: InvalidParameter | None = None
    existed: bool = False  # its idempotency key already named this job: nothing was submitted


def send_job(celery: Celery, job_id: str, request: dict[str, Any], queue: str) -> None:
    """The Celery message for a job (README: "From any language"); its task id is the job id."""
    kwargs = {"job_id": job_id, "request": request}
    celery.send_task(TASK_NAME, kwargs=kwargs, kwargsrepr=wire.kwargs_repr(kwargs), task_id=job_id, queue=queue)


class KeyConflict(InvalidParameter):
    """An idempotency key already used for another render: its job is not the video asked for. (Stripe and the
    IETF Idempotency-Key draft refuse a key reused with another request, so a bug that reuses one is seen.)"""

    def __init__(self, job_id: str, differ: list[str]):
        self.job_id, self.differ = job_id, differ
        super().__init__(
            "idempotency_key",
            f"already used for a different render ({', '.join(differ)} differ): use a new key for a new request",
        )


def check_same_request(job_id: str, held: dict[str, Any], request: dict[str, Any]) -> None:
    """KeyConflict naming what differs between the request a key's job `job_id` holds and `request`. A field the
    held request lacks (a record an older svdq wrote) is no difference, nor one `request` lacks (the image,
    where it was not read)."""
    if differ := sorted(k for k in request.keys() & held.keys() if request[k] != held[k]):
        raise KeyConflict(job_id, differ)


@dataclass(frozen=True)
class Checked:
    """A submit that passed every check: its parameters, queue, and the image as bytes or as a reference."""

    params: JobParams
    queue: str
    data: bytes | None
    suffix: str
    image_ref: str | None

    def request(self, image_ref: str) -> dict[str, Any]:
        return {**self.params.model_dump(), "image": image_ref}

    @functools.cached_property
    def name(self) -> str:
        """The stored image's name: its content's (storage.content_name)."""
        assert self.data is not None
        return content_name(self.data, self.suffix)


class Intake:
    """What every producer checks before it writes anything (Client and producer.aio's AsyncClient alike)."""

    def __init__(self, settings: Settings, store: ObjectStore):
        self.settings, self.store = settings, store

    def check(
        self,
        image: ImageInput,
        *,
        priority: str,
        idempotency_key: str | None,
        webhook: str | None,
        params: dict[str, Any],
    ) -> Checked:
        """Raises InvalidParameter naming the first bad parameter (or the image); stores and sends nothing."""
        checked, queue = self.check_request(params, priority)
        if idempotency_key is not None and not 0 < len(idempotency_key) <= 200:
            raise InvalidParameter("idempotency_key", "must be 1 to 200 characters")
        if webhook is not None:
            try:
                check_url(webhook, allow_private=self.settings.webhook_allow_private)
            except UnsafeURL as exc:
                raise InvalidParameter("webhook", str(exc)) from None
        data, suffix = self._image_bytes(image)
        return Checked(checked, queue, data, suffix, str(image) if data is None else None)

    def check_request(self, params: dict[str, Any], priority: str) -> tuple[JobParams, str]:
        """The parameters, checked against the contract and this service's caps, and the queue they go to."""
        checked = check_inputs(params)
        self.settings.check_caps(checked)
        return checked, queue_for(model_queue(self.settings.queue, checked.model), priority)

    def store_image(self, checked: Checked) -> str:
        """Store the image under its content's name (the same bytes, the same object); returns its reference."""
        assert checked.data is not None
        name = checked.name
        try:
            if len(checked.data) > self.store.ask_first_above and self.store.exists(name):
                return self.store.ref(name)
            return self.store.put(name, checked.data, f"image/{checked.suffix.lstrip('.')}").ref
        except OSError as exc:  # a file:// store whose folder cannot be made or written
            where = f" ({exc.filename})" if exc.filename else ""
            message = f"the store cannot take the image: {exc.strerror or exc}{where}"
            if exc.errno in FOLDER_REFUSED:
                raise StorageRefused(message, errno.errorcode[exc.errno]) from None
            raise StorageUnavailable(message) from None  # a full disk, an I/O error: may pass

    def _image_bytes(self, image: ImageInput) -> tuple[bytes | None, str]:
        """The image's bytes and file suffix, or (None, "") for a reference the worker reads itself.

        A `str` is never a path on this machine: a web backend passes its users' strings straight through, and
        they must not name the backend's own files. A local file is a `pathlib.Path` (or its bytes, or an open
        binary file)."""
        if isinstance(image, Image.Image):
            buf = io.BytesIO()
            image.save(buf, format="PNG")
            data = buf.getvalue()
        elif isinstance(image, (bytes, bytearray, memoryview)):
            data = bytes(image)
        elif isinstance(image, str):
            self._check_reference(image)
            return None, ""
        elif isinstance(image, Path):
            data = self._read_path(image)
        elif hasattr(image, "read"):
            data = image.read(self.settings.max_image_bytes + 1)
            if not isinstance(data, bytes):
                raise InvalidParameter("image", "a file object must be opened in binary mode ('rb')")
        else:
            raise InvalidParameter(
                "image",
                f"must be a URL or store key (str), a pathlib.Path, bytes, a binary file "
                f"or a PIL image, not {type(image).__name__}",
            )
        return data, self._check_image(data)

    def _read_path(self, path: Path) -> bytes:
        try:
            if path.is_dir():
                raise InvalidParameter(
                    "image",
                    f"{path} is a folder: give one image (`svdq bulk FOLDER --out DIR` renders a folder of them)",
                )
            if not path.is_file():
                raise InvalidParameter("image", f"no such file: {path}")
            if path.stat().st_size > self.settings.max_image_bytes:
                raise InvalidParameter("image", f"larger than SVDQ_MAX_IMAGE_BYTES={self.settings.max_image_bytes}")
            return path.read_bytes()
        except OSError as exc:  # a name too long, a folder without read permission...
            raise InvalidParameter("image", f"cannot read {shown(str(path))}: {exc.strerror or exc}") from None

    def _check_reference(self, ref: str) -> None:
        """A URL the worker fetches (through the address guard), or an image in a place this service reads."""
        if not ref:
            raise InvalidParameter("image", "is empty: give a URL, a store key, or a local file as pathlib.Path")
        if len(ref) > MAX_REFERENCE:  # the worker would refuse its message, with the job left queued
            raise InvalidParameter("image", f"is {len(ref):,} characters long, over {MAX_REFERENCE:,}")
        if has_control(ref):  # no key svdq writes has them, and the worker's log would carry them
            raise InvalidParameter("image", f"{shown(ref)} holds control characters: no URL or store key does")
        if ref.startswith(("http://", "https://")):
            try:
                check_url(ref, allow_private=self.settings.allow_private_urls)
            except UnsafeURL as exc:
                raise InvalidParameter("image", str(exc)) from None
            return
        # Whether it exists is the worker's to find out: asking here would answer it for anyone who submits.
        if not self.store.may_read(ref):
            hint = "" if ref.startswith(URL_SCHEMES) else " (a local file is passed as pathlib.Path)"
            raise InvalidParameter("image", str(not_readable(ref)) + hint)

    def _check_image(self, data: bytes) -> str:
        if len(data) > self.settings.max_image_bytes:
            raise InvalidParameter("image", f"larger than SVDQ_MAX_IMAGE_BYTES={self.settings.max_image_bytes}")
        try:
            return images.inspect(data, self.settings.max_image_pixels).suffix
        except images.BadImage as exc:
            raise InvalidParameter("image", str(exc)) from None
