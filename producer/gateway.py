"""`svdq gateway`: svdq's contract over HTTP, for web backends in any language (FastAPI on uvicorn).

Stateless: every request reads and writes Redis and the store through `AsyncClient`, so any number of gateway
processes can serve behind a load balancer. Each API key (SVDQ_API_KEYS, `Authorization: Bearer KEY`) sees,
streams, cancels and downloads only the jobs it submitted: another key's job is a 404, as an unknown one is.

    POST   /v1/jobs                 JSON ({"image_url"} or {"image": base64}, parameters by diffusers' names) or
                                    multipart/form-data with an `image` file part; Idempotency-Key header
    GET    /v1/jobs                 the caller's jobs, newest first (?state=&limit=&cursor=)
    GET    /v1/jobs/{id}            the job's record
    DELETE /v1/jobs/{id}            cancel (409 when it already ended)
    GET    /v1/jobs/{id}/events     Server-Sent Events, one per change, closing after the final state
    GET    /v1/jobs/{id}/video      302 to a presigned URL (S3; ?redirect=0: the URL as JSON), or the file (a
                                    file:// store, with Range requests)
    GET    /healthz, /readyz        alive; Redis and the store reachable (else 503)
    GET    /                        a page to try it (producer/page.html), using only the API above
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import hmac
import json
import math
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any

import redis
import redis.asyncio
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response, StreamingResponse

from producer import keys
from producer.aio import AsyncClient, AsyncJob
from producer.client import KeyConflict, NotCancelable
from producer.contract import PRIORITIES, InvalidParameter, JobRecord, JobState, value_from_text
from producer.settings import Settings
from producer.status import JobNotFound, as_text, parse_record
from producer.storage import FileStore, StorageUnavailable

KEEP_ALIVE_SECONDS = 15.0
RETRY_AFTER = "5"
NO_AUTH = "anonymous"
RESERVED = {"owner", "idempotency_key", "image", "self"}  # submit()'s own arguments: never from a body


class Refused(Exception):
    """An HTTP error with svdq's error body: {"error": {"code", "message", "param"?}}."""

    def __init__(self, status: int, code: str, message: str, param: str | None = None, **headers: str):
        super().__init__(message)
        self.status, self.code, self.message, self.param = status, code, message, param
        self.headers = {name.replace("_", "-"): value for name, value in headers.items()}

    def response(self) -> JSONResponse:
        error = {"code": self.code, "message": self.message} | ({"param": self.param} if self.param else {})
        return JSONResponse({"error": error}, status_code=self.status, headers=self.headers)


def parse_api_keys(spec: str) -> dict[str, str]:
    """`name:key,name2:key2` or bare keys (named key1, key2...) -> {key: name}."""
    keys: dict[str, str] = {}
    for n, part in enumerate(p.strip() for p in spec.split(",") if p.strip()):
        name, sep, key = part.partition(":")
        name, key = (name, key) if sep else (f"key{n + 1}", name)
        if not key or not name:
            raise ValueError(f"SVDQ_API_KEYS: entry {n + 1} is empty; use name:key[,name2:key2]")
        if name in keys.values() or name == NO_AUTH:  # two keys with one name would share their jobs
            raise ValueError(f"SVDQ_API_KEYS: the name {name!r} is taken; give each key a name of its own")
        keys[key] = name
    return keys


RATE_UNITS = {"s": 1, "m": 60, "h": 3600}


def parse_rate(spec: str | None) -> tuple[int, int] | None:
    """`20/s`, `600/m`, `10000/h` -> (requests, window seconds); None: no limit."""
    if not spec:
        return None
    match = re.fullmatch(r"\s*(\d+)\s*/\s*([smh])\s*", spec)
    if match is None or int(match.group(1)) < 1:
        raise ValueError(f"SVDQ_RATE_LIMIT={spec!r}: write it as N/s, N/m or N/h, e.g. 20/s")
    return int(match.group(1)), RATE_UNITS[match.group(2)]


class Auth:
    """Who is calling: the name of the key in `Authorization: Bearer KEY`, compared in constant time."""

    def __init__(self, keys: dict[str, str] | None):
        self.keys = keys  # None: no authentication (`--unsafe-no-auth`)

    def __call__(self, request: Request) -> str:
        if self.keys is None:
            return NO_AUTH
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        name = None
        for key, key_name in self.keys.items():  # every key compared, so the time says nothing about which
            if hmac.compare_digest(given.strip().encode(), key.encode()) and scheme.lower() == "bearer":
                name = key_name
        if name is None:
            raise Refused(
                401,
                "unauthorized",
                "send `Authorization: Bearer KEY` with one of SVDQ_API_KEYS",
                **{"WWW-Authenticate": "Bearer"},
            )
        return name


async def caller(request: Request) -> str:
    """The calling key's name, once it is authenticated and within its rate limit (one INCR a request)."""
    name = request.app.state.auth(request)
    rate = request.app.state.rate
    if rate is None:
        return name
    limit, window = rate
    now = time.time()
    bucket = int(now // window)
    counter = keys.rate(name, bucket)
    pipe = client_of(request).redis.pipeline(transaction=False)
    pipe.incr(counter)
    pipe.expire(counter, window + 1)
    count, _ = await pipe.execute()
    if count > limit:
        wait = max(1, int((bucket + 1) * window - now + 0.999))
        raise Refused(
            429,
            "rate_limited",
            f"more than {limit} requests in {window}s for this key; slow down",
            Retry_After=str(wait),
        )
    return name


def for_callers(message: str) -> str:
    """An error as an API caller may read it: whether a name resolves inside the network, and to what, is not
    theirs to learn (a 422 would otherwise map internal DNS for them), so every such answer reads the same."""
    same = r"\1 does not resolve to a public address"
    message = re.sub(r"(\S+) resolves to a non-public address \([^)]*\)", same, message)
    message = re.sub(r"cannot resolve (\S+): .*$", same, message)
    return re.sub(r"(\S+) has no address", same, message)


def stored(owner: str) -> str | None:
    """The record's `owner` for a caller: its key's name; none for an open gateway (`--unsafe-no-auth`)."""
    return None if owner == NO_AUTH else owner


def links(job_id: str) -> dict[str, str]:
    base = f"/v1/jobs/{job_id}"
    return {"self": base, "events": f"{base}/events", "video": f"{base}/video"}


def job_json(record: JobRecord) -> dict[str, Any]:
    return {**record.to_json_dict(), "links": links(record.id)}


router = APIRouter()


def create_app(settings: Settings, *, unsafe_no_auth: bool = False) -> FastAPI:
    keys = parse_api_keys(settings.api_keys.get_secret_value()) if settings.api_keys else None
    if keys is None and not unsafe_no_auth:
        raise ValueError("svdq gateway needs SVDQ_API_KEYS (name:key[,name2:key2]); --unsafe-no-auth runs it open")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.client = AsyncClient.from_settings(settings)
        app.state.hub = EventHub(app.state.client.redis)
        await app.state.hub.start()
        yield
        await app.state.hub.close()
        await app.state.client.aclose()

    app = FastAPI(title="svdq", version="1", lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.state.auth, app.state.settings, app.state.rate = Auth(keys), settings, parse_rate(settings.rate_limit)
    app.include_router(router)
    app.add_exception_handler(Refused, lambda request, exc: exc.response())  # type: ignore[arg-type,return-value]
    app.add_exception_handler(redis.RedisError, lambda request, exc: unavailable("Redis").response())
    app.add_exception_handler(StorageUnavailable, lambda request, exc: unavailable("storage").response())
    return app


def unavailable(what: str) -> Refused:
    return Refused(503, "unavailable", f"{what} is unreachable; try again", Retry_After=RETRY_AFTER)


def client_of(request: Request) -> AsyncClient:
    return request.app.state.client  # type: ignore[no-any-return]


async def owned(request: Request, job_id: str) -> tuple[AsyncJob, JobRecord]:
    """The caller's job: another key's, an unknown id and a malformed one all read as 404."""
    owner = await caller(request)
    try:
        job = client_of(request).job(job_id)
        record: JobRecord | None = await job.status()
    except (InvalidParameter, JobNotFound):
        record = None
    if record is None or record.owner != stored(owner):
        raise Refused(404, "not_found", f"no job {job_id}")
    return job, record


@router.post("/v1/jobs", status_code=201)
async def submit(request: Request) -> JSONResponse:
    owner = await caller(request)
    image, fields = await read_submission(request, request.app.state.settings.max_image_bytes)
    key = request.headers.get("idempotency-key")
    priority = fields.pop("priority", "normal")
    if priority not in PRIORITIES:
        raise Refused(422, "invalid_parameter", f"priority: must be one of {', '.join(PRIORITIES)}", "priority")
    webhook = fields.pop("webhook", None)
    if webhook is not None and not isinstance(webhook, str):
        raise Refused(422, "invalid_parameter", "webhook: must be a URL string", "webhook")
    if reserved := sorted(set(fields) & RESERVED):
        raise Refused(422, "invalid_parameter", f"{reserved[0]}: is not a parameter svdq knows", reserved[0])
    try:
        # A key is the caller's own: another caller's same key names another job.
        job = await client_of(request).submit(
            image,
            priority=priority,
            webhook=webhook,
            owner=stored(owner),
            idempotency_key=f"{owner}:{key}" if key else None,
            **fields,
        )
    except KeyConflict as exc:  # the IETF Idempotency-Key draft's answer to a key reused for another request
        raise Refused(422, "idempotency_key_reused", f"Idempotency-Key: {exc.message}", "Idempotency-Key") from None
    except InvalidParameter as exc:
        if exc.param == "image" and "larger than" in exc.message:
            raise Refused(413, "too_large", exc.message, "image") from None
        param = "image_url" if exc.param == "image" and isinstance(image, str) else exc.param  # as the caller sent it
        raise Refused(422, "invalid_parameter", f"{param}: {for_callers(exc.message)}", param) from None
    record = await read_and_index(request, owner, job.id)
    if record.owner != stored(owner):  # a key that a producer outside the gateway used
        await client_of(request).redis.zrem(keys.owner_index(owner), job.id)
        raise Refused(409, "idempotency_conflict", "this Idempotency-Key names a job this API key did not submit")
    return JSONResponse(job_json(record), status_code=201, headers={"Location": links(job.id)["self"]})


async def read_and_index(request: Request, owner: str, job_id: str) -> JobRecord:
    """The job's record, and the job added to the caller's list (GET /v1/jobs), trimmed of what has expired
    since: one round trip. (The list shows only the caller's own records, so an entry is harmless until a
    conflict takes it out again.)"""
    index, now = keys.owner_index(owner), time.time()
    pipe = client_of(request).redis.pipeline(transaction=False)
    pipe.hgetall(keys.job(job_id))
    pipe.zadd(index, {job_id: now}, nx=True)
    pipe.zremrangebyscore(index, "-inf", now - request.app.state.settings.result_ttl)
    raw, _, _ = await pipe.execute()
    if not raw:
        raise JobNotFound(job_id)
    return parse_record(job_id, raw)


@router.get("/v1/jobs")
async def list_jobs(
    request: Request, state: str | None = None, limit: int = 20, cursor: float | None = None
) -> dict[str, Any]:
    """The caller's jobs, newest first, `limit` (1-100) a page; `next_cursor` fetches the page after."""
    owner = await caller(request)
    if state is not None and state not in {s.value for s in JobState}:
        raise Refused(422, "invalid_parameter", f"state: one of {', '.join(s.value for s in JobState)}", "state")
    if not 1 <= limit <= 100:
        raise Refused(422, "invalid_parameter", "limit: must be 1 to 100", "limit")
    if cursor is not None and not math.isfinite(cursor):  # Redis refuses "(nan" (which read as an outage)
        raise Refused(422, "invalid_parameter", "cursor: must be a next_cursor this API returned", "cursor")
    redis_client = client_of(request).redis
    top = f"({cursor}" if cursor is not None else "+inf"
    page = await redis_client.zrevrangebyscore(
        keys.owner_index(owner), top, "-inf", start=0, num=limit, withscores=True
    )
    records = await client_of(request).records.get_many([as_text(member) for member, _ in page])
    jobs = [
        job_json(r)
        for r in records.values()
        if r is not None and r.owner == stored(owner) and state in (None, r.state.value)
    ]
    return {"jobs": jobs, "next_cursor": page[-1][1] if len(page) == limit else None}


@router.get("/v1/jobs/{job_id}")
async def get_job(request: Request, job_id: str) -> dict[str, Any]:
    _, record = await owned(request, job_id)
    return job_json(record)


@router.delete("/v1/jobs/{job_id}")
async def cancel(request: Request, job_id: str) -> dict[str, Any]:
    job, _ = await owned(request, job_id)
    try:
        return job_json(await job.cancel())
    except NotCancelable as exc:
        raise Refused(409, "already_ended", str(exc)) from None


@router.get("/v1/jobs/{job_id}/events")
async def events(request: Request, job_id: str) -> StreamingResponse:
    job, _ = await owned(request, job_id)
    seen = request.headers.get("last-event-id")
    return StreamingResponse(
        sse(job, request.app.state.hub, request.is_disconnected, seen),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


@router.get("/v1/jobs/{job_id}/video", response_model=None)
async def video(request: Request, job_id: str, redirect: bool = True) -> Response:
    """`?redirect=0`: the presigned URL as JSON (`{"url"}`) instead of a 302, for a page to hand to <video>."""
    job, record = await owned(request, job_id)
    if record.result is None:
        raise Refused(409, "no_video", f"job {job_id} is {record.state.value}: no video (yet)")
    # Presigned now, not when the job ended (that URL expires long before the record); a file store's URL is a
    # path on this server: the file is served instead, with Range requests (for players that resume or seek).
    store = client_of(request).store
    if isinstance(store, FileStore):
        if not (path := store.local_path(record.result.key)).is_file():
            raise Refused(404, "no_video", f"job {job_id}'s video is no longer in the store")
        return FileResponse(path, media_type=f"video/{record.result.format}")
    url = await asyncio.to_thread(store.public_url, record.result.key)
    if url and url.startswith(("http://", "https://")):
        return RedirectResponse(url, status_code=302) if redirect else JSONResponse({"url": url})
    return Response(await job.video_bytes(), media_type=f"video/{record.result.format}")


def page() -> tuple[str, str]:
    """The page at `/` and its Content-Security-Policy: its one inline script and one style block allowed by
    hash, nothing else inline or from elsewhere; media from anywhere (a presigned URL is on the store's host)
    and blob: URLs."""
    html = resources.files("producer").joinpath("page.html").read_text()

    def digest(tag: str) -> str:
        block = html.split(f"<{tag}>", 1)[1].split(f"</{tag}>", 1)[0]
        return "'sha256-" + base64.b64encode(hashlib.sha256(block.encode()).digest()).decode() + "'"

    policy = (
        f"default-src 'none'; script-src {digest('script')}; style-src {digest('style')}; connect-src 'self'; "
        "media-src 'self' blob: http: https:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )
    return html, policy


PAGE, PAGE_POLICY = page()


@router.get("/", include_in_schema=False)
async def index() -> HTMLResponse:
    return HTMLResponse(PAGE, headers={"Content-Security-Policy": PAGE_POLICY, "X-Content-Type-Options": "nosniff"})


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(request: Request) -> JSONResponse:
    client = client_of(request)
    try:
        await asyncio.wait_for(client.redis.ping(), 3)
        await asyncio.wait_for(asyncio.to_thread(client.store.exists, "svdq-readyz-probe"), 5)
    except (redis.RedisError, StorageUnavailable, TimeoutError, OSError) as exc:
        return Refused(503, "unavailable", f"not ready: {type(exc).__name__}", Retry_After=RETRY_AFTER).response()
    return JSONResponse({"status": "ready"})


def check_length(request: Request, limit: int) -> None:
    """Only a declared length caps what the server reads (h11 would take a chunked body beside one): none, or
    any transfer coding, is refused before a byte of the body is read, and so is one over `limit`."""
    length = request.headers.get("content-length")
    if "transfer-encoding" in request.headers or length is None or not length.isdigit():
        raise Refused(411, "length_required", "send the body with a Content-Length header (not chunked)")
    if int(length) > limit:
        raise Refused(413, "too_large", f"the request is larger than {limit} bytes", "image")


async def read_submission(request: Request, max_image_bytes: int) -> tuple[bytes | str, dict[str, Any]]:
    """The image (bytes, or a URL/store reference the worker reads) and the other fields of a POST."""
    check_length(request, limit=max_image_bytes * 4 // 3 + 64 * 1024)  # base64 and the other fields
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        return await _read_form(request, max_image_bytes)
    try:
        fields = json.loads(await request.body())
    except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: arrays nested 100,000 deep
        raise Refused(422, "invalid_json", "the body must be a JSON object (or multipart/form-data)") from None
    if not isinstance(fields, dict):
        raise Refused(422, "invalid_json", "the body must be a JSON object")
    url, encoded = fields.pop("image_url", None), fields.pop("image", None)
    if (url is None) == (encoded is None):
        raise Refused(422, "invalid_parameter", "image: give exactly one of image_url and image (base64)", "image")
    if url is not None:
        # Only the web: store references (s3://, file://, a key) would let one API key read another's images.
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise Refused(422, "invalid_parameter", "image_url: must be an http(s) URL", "image_url")
        return url, fields
    try:
        return base64.b64decode(str(encoded), validate=True), fields
    except (binascii.Error, ValueError):
        raise Refused(422, "invalid_parameter", "image: not valid base64", "image") from None


async def _read_form(request: Request, max_image_bytes: int) -> tuple[bytes, dict[str, Any]]:
    async with request.form(max_files=1, max_fields=32) as form:  # its spooled files go when it closes
        upload = form.get("image")
        if upload is None or isinstance(upload, str):
            raise Refused(422, "invalid_parameter", "image: a file part named `image` is required", "image")
        data = await upload.read(max_image_bytes + 1)
        return data, {k: value_from_text(v) for k, v in form.items() if k != "image" and isinstance(v, str)}


class EventHub:
    """One Redis subscription per gateway process, for all its open event streams: a stream per subscription
    would hold a Redis connection (and a file descriptor) each, and run out of both at a few hundred streams.
    Every job's events come in on one pattern subscription; each open stream waits on its job's `asyncio.Event`.
    """

    def __init__(self, client: redis.asyncio.Redis):
        self.pubsub = client.pubsub(ignore_subscribe_messages=True)
        self.waiting: dict[str, set[asyncio.Event]] = {}
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.task = asyncio.create_task(self._run())

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        await self.pubsub.aclose()

    async def _run(self) -> None:
        prefix = keys.events("")
        while True:
            try:
                if not self.pubsub.subscribed:
                    await self.pubsub.psubscribe(keys.events("*"))
                message = await self.pubsub.get_message(timeout=1.0)
            except redis.RedisError:  # Redis away: streams re-read every second meanwhile; try again
                await asyncio.sleep(1.0)
                continue
            if message is not None and message.get("type") == "pmessage":
                for changed in self.waiting.get(as_text(message["channel"]).removeprefix(prefix), ()):
                    changed.set()

    @contextlib.asynccontextmanager
    async def watch(self, job_id: str) -> AsyncIterator[asyncio.Event]:
        changed = asyncio.Event()
        self.waiting.setdefault(job_id, set()).add(changed)
        try:
            yield changed
        finally:
            watchers = self.waiting.get(job_id, set())
            watchers.discard(changed)
            if not watchers:
                self.waiting.pop(job_id, None)


def event_id(record: JobRecord) -> str:
    """The id of the event carrying `record`: a digest of what it says, so that any gateway process, given it
    back as Last-Event-ID, knows whether the client has seen the record as it is now."""
    return hashlib.blake2b(json.dumps(job_json(record), sort_keys=True).encode(), digest_size=8).hexdigest()


async def sse(
    job: AsyncJob, hub: EventHub, disconnected: Callable[[], Awaitable[bool]], seen: str | None = None
) -> AsyncIterator[str]:
    """One event per change of the record, named by its state; a comment every KEEP_ALIVE_SECONDS while
    nothing changes; the stream ends after the final state (at once, for a job that has ended). The record is
    re-read at each of its job's events and at least every second, so a missed event only delays.

    Events are snapshots, each superseding the last: a client resuming with Last-Event-ID `seen` gets the
    record at once if it changed since (what it missed is in it), else the next change; a client that has
    seen the final state gets an empty stream."""
    last_sent, last = time.monotonic(), None
    async with hub.watch(job.id) as changed:
        while not await disconnected():
            changed.clear()  # before the read: an event after it wakes the wait below
            record = await job.status()
            if record != last:
                last, eid = record, event_id(record)
                if eid != seen:
                    last_sent = time.monotonic()
                    yield f"id: {eid}\nevent: {record.state.value}\ndata: {json.dumps(job_json(record))}\n\n"
                if record.state.is_terminal():
                    return
            elif time.monotonic() - last_sent >= KEEP_ALIVE_SECONDS:
                last_sent = time.monotonic()
                yield ": keep-alive\n\n"
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), timeout=1.0)


def serve(host: str, port: int, workers: int, unsafe_no_auth: bool) -> None:
    """Run the gateway under uvicorn (in this process with one worker; forked workers otherwise)."""
    import os
    import resource

    import uvicorn

    # Each open event stream is a socket: the usual soft limit of 1,024 descriptors would cap a process near
    # 1,000 streams, so take what the hard limit allows.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else 65536, hard))

    if workers > 1:
        os.environ["SVDQ_GATEWAY_UNSAFE_NO_AUTH"] = "1" if unsafe_no_auth else ""
        uvicorn.run(
            "producer.gateway:app_from_env", factory=True, host=host, port=port, workers=workers, log_level="info"
        )
        return
    uvicorn.run(create_app(Settings(), unsafe_no_auth=unsafe_no_auth), host=host, port=port, log_level="info")


def app_from_env() -> FastAPI:
    import os

    return create_app(Settings(), unsafe_no_auth=os.environ.get("SVDQ_GATEWAY_UNSAFE_NO_AUTH") == "1")
