"""`AsyncClient`: the Python client for async web backends (FastAPI, aiohttp, Starlette...), on redis.asyncio.

Same contract as `producer.client.Client`: the same checks refuse the same bad parameters (`Intake`), the same
Lua scripts change records (`Records`), the same message reaches the workers (built by `producer.wire` as Celery
writes it, and pushed on redis.asyncio). Redis calls are awaited; the blocking ones (checking the image, its
upload through boto3) run in a thread, so one request's upload never stalls the event loop's other requests.

    async with AsyncClient.from_env() as svdq:
        job = await svdq.submit(image_bytes, num_frames=14)
        async for record in job.events():   # every change, until the job ends
            ...
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from typing import Any

import redis
import redis.asyncio
from celery import Celery

from producer import keys, wire
from producer.client import Checked, ImageInput, Intake, NotCancelable, check_same_request, producer_celery
from producer.contract import JobRecord, JobState, check_job_id
from producer.settings import Settings, is_sentinel
from producer.status import (
    _TRANSITION_LUA,
    DuplicateKey,
    InvalidTransition,
    JobNotFound,
    MalformedRecord,
    Records,
    parse_record,
)
from producer.storage import ObjectStore, open_store

MAX_CONNECTIONS = 256  # per AsyncClient; each `events()` holds one while it waits


class AsyncStatusStore(Records):
    """The records as `StatusStore` keeps them, read and changed through redis.asyncio."""

    def __init__(self, client: redis.asyncio.Redis, *, result_ttl: int):
        super().__init__(result_ttl=result_ttl)
        self.redis = client
        self._transition = client.register_script(_TRANSITION_LUA)

    async def create(
        self,
        job_id: str,
        request: dict[str, Any],
        *,
        idempotency_key: str | None = None,
        push: tuple[str, str] | None = None,
        **fields: Any,
    ) -> bool:
        """As StatusStore.create; `push`: (queue, message) enqueued in the same script as the record."""
        record = self.creation(job_id, request, **fields)
        try:
            await self.transition(
                job_id, JobState.QUEUED, idempotency_key=idempotency_key, only_new=True, push=push, **record
            )
        except InvalidTransition:
            return False
        return True

    async def transition(self, job_id: str, new: JobState, **options: Any) -> int:
        script_keys, args = self.plan_transition(job_id, new, **options)
        return self.transition_outcome(job_id, new, await self._transition(keys=script_keys, args=args))

    async def get_many(self, job_ids: list[str]) -> dict[str, JobRecord | None]:
        """As StatusStore.get_many: one round trip; None for an expired or unreadable record."""
        pipe = self.redis.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hgetall(keys.job(job_id))
        found: dict[str, JobRecord | None] = {}
        for job_id, raw in zip(job_ids, await pipe.execute(), strict=True):
            try:
                found[job_id] = parse_record(job_id, raw) if raw else None
            except MalformedRecord:  # one bad record must not hide the others
                found[job_id] = None
        return found

    async def get(self, job_id: str) -> JobRecord:
        raw = await self.redis.hgetall(keys.job(job_id))
        if not raw:
            raise JobNotFound(job_id)
        return parse_record(job_id, raw)


class AsyncJob:
    """A thin handle, as `producer.client.Job`: an id and the client it talks through."""

    def __init__(self, job_id: str, client: AsyncClient):
        self.id = job_id
        self.client = client

    def __repr__(self) -> str:
        return f"AsyncJob({self.id!r})"

    async def status(self) -> JobRecord:
        return await self.client.records.get(self.id)

    async def events(self, *, reread_every: float = 1.0) -> AsyncIterator[JobRecord]:
        """The record now, then again at each change (and at least every `reread_every` seconds while it
        stays the same, so a missed event only delays), ending with its terminal record."""
        async with contextlib.aclosing(self.changes(reread_every=reread_every)) as changes:
            async for record in changes:
                if record is not None:
                    yield record

    async def changes(self, *, reread_every: float = 1.0) -> AsyncIterator[JobRecord | None]:
        """As `events`, with None at each re-read that found no change (for a stream's keep-alives)."""
        pubsub = self.client.redis.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(keys.events(self.id))  # before the first read: nothing slips in between
            last: JobRecord | None = None
            while True:
                record = await self.status()
                yield record if record != last else None
                last = record
                if record.state.is_terminal():
                    return
                try:
                    await pubsub.get_message(timeout=reread_every)
                except redis.ConnectionError:  # redis-py resubscribes on the next call; no busy loop meanwhile
                    await asyncio.sleep(min(reread_every, 0.5))
        finally:
            await pubsub.aclose()

    async def wait(self, timeout: float | None = None) -> JobRecord:
        """The terminal record; TimeoutError after `timeout` seconds (the job goes on)."""
        async with asyncio.timeout(timeout), contextlib.aclosing(self.events()) as records:
            async for record in records:
                if record.state.is_terminal():
                    return record
        raise AssertionError("events() ends only with a terminal record")  # pragma: no cover

    async def cancel(self) -> JobRecord:
        """Cancel a queued job (it never starts) or a running one (it stops within its current step)."""
        try:
            await self.client.records.transition(self.id, JobState.CANCELED)
        except InvalidTransition as exc:
            if exc.current is None:
                raise JobNotFound(self.id) from None
            raise NotCancelable(self.id, exc.current) from None
        return await self.status()

    async def video_bytes(self) -> bytes:
        record = await self.status()
        if record.state is not JobState.SUCCEEDED or record.result is None:
            raise RuntimeError(f"job {self.id} is {record.state.value}: there is no video to fetch")
        return await asyncio.to_thread(self.client.store.read_key, record.result.key)


class AsyncClient:
    def __init__(self, settings: Settings, redis_client: redis.asyncio.Redis, store: ObjectStore, celery: Celery):
        self.settings = settings
        self.redis = redis_client
        self.records = AsyncStatusStore(  # the job records; AsyncJob.status() is one record
            redis_client, result_ttl=settings.result_ttl
        )
        self.store = store
        self.celery = celery
        self.intake = Intake(settings, store)

    @classmethod
    def from_env(cls, **overrides: Any) -> AsyncClient:
        return cls.from_settings(Settings(**overrides))

    @classmethod
    def from_settings(cls, settings: Settings) -> AsyncClient:
        if is_sentinel(settings.redis_url):
            raise NotImplementedError("AsyncClient does not follow Redis Sentinel yet: use Client, or a plain URL")
        # A blocking pool: under a burst (a thousand streams re-reading their records at once) a request waits
        # for one of the pool's connections instead of failing with "Too many connections".
        pool = redis.asyncio.BlockingConnectionPool.from_url(
            settings.redis_url,
            max_connections=MAX_CONNECTIONS,
            timeout=30,
            socket_connect_timeout=5,
            socket_timeout=30,
            health_check_interval=30,
        )
        client = redis.asyncio.Redis.from_pool(pool)  # the client owns it: aclose() disconnects it
        return cls(settings, client, open_store(settings), producer_celery(settings))

    async def aclose(self) -> None:
        await self.redis.aclose()
        await asyncio.to_thread(self.celery.close)  # may wait on its broker connection: not on the event loop

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def job(self, job_id: str) -> AsyncJob:
        """A handle on a job by its id; an id outside the job-id grammar raises InvalidParameter("job_id")."""
        return AsyncJob(check_job_id(job_id), self)

    async def submit(
        self,
        image: ImageInput,
        *,
        priority: str = "normal",
        idempotency_key: str | None = None,
        webhook: str | None = None,
        owner: str | None = None,
        **params: Any,
    ) -> AsyncJob:
        """As `Client.submit`: validate, store the image, write a `queued` record and its message. `owner` (the
        gateway's API key name) goes on the record."""

        # 1-2. Check parameters and the image (decoding it is CPU work), then store the image once per content
        # (boto3 blocks): off the loop, in one trip to a thread.
        def check_and_store() -> tuple[Checked, str]:
            checked = self.intake.check(
                image, priority=priority, idempotency_key=idempotency_key, webhook=webhook, params=params
            )
            return checked, checked.image_ref or self.intake.store_image(checked)

        checked, image_ref = await asyncio.to_thread(check_and_store)

        # 3. The record and its Celery message in one script: one round trip, and never one without the other.
        job_id = uuid.uuid4().hex
        request = checked.request(image_ref)
        try:
            await self.records.create(
                job_id,
                request,
                idempotency_key=idempotency_key,
                priority=priority,
                webhook=webhook,
                queue=checked.queue,
                owner=owner,
                push=(checked.queue, wire.message(job_id, request, checked.queue)),
            )
        except DuplicateKey as dup:
            if dup.job_id != job_id:  # else its own key: a retried creation whose first reply was lost
                with contextlib.suppress(JobNotFound):  # gone since: its key went with it
                    held = await self.records.get(dup.job_id)
                    if held.owner == owner:  # else not the caller's to compare with (the gateway refuses it)
                        check_same_request(dup.job_id, held.request, request)
                return AsyncJob(dup.job_id, self)
        return AsyncJob(job_id, self)
