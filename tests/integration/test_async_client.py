"""AsyncClient under a real asyncio HTTP server: concurrent requests each submit and wait on one event loop,
which keeps answering while they wait; cancel and events as an async iterator; the same refusals as Client."""

from __future__ import annotations

import asyncio
import io
import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from producer import keys
from producer.aio import AsyncClient, AsyncJob
from producer.client import Client
from producer.contract import DEFAULT_QUEUE, InvalidParameter, JobState
from tests.integration.conftest import SLOW, SMALL, WorkerProcess

pytestmark = pytest.mark.integration

Handler = Callable[[str, bytes], Awaitable[tuple[int, dict[str, Any]]]]


async def serve(handler: Handler) -> tuple[asyncio.Server, int]:
    """A minimal HTTP/1.1 server on asyncio streams: one request per connection."""

    async def on_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        request_line, *headers = head.decode().split("\r\n")
        length = next((int(h.split(":")[1]) for h in headers if h.lower().startswith("content-length")), 0)
        body = await reader.readexactly(length)
        status, payload = await handler(request_line.split()[1], body)
        data = json.dumps(payload).encode()
        writer.write(f"HTTP/1.1 {status} OK\r\ncontent-length: {len(data)}\r\nconnection: close\r\n\r\n".encode())
        writer.write(data)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(on_connection, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def http(port: int, path: str, body: bytes = b"") -> tuple[int, dict[str, Any]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"POST {path} HTTP/1.1\r\nhost: x\r\ncontent-length: {len(body)}\r\n\r\n".encode() + body)
    await writer.drain()
    raw = await reader.read()
    writer.close()
    head, _, payload = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(payload)


def png(shade: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (72, 64), (shade, 100, 200)).save(buf, format="PNG")
    return buf.getvalue()


def test_an_asyncio_server_renders_concurrent_requests_and_stays_responsive(worker: WorkerProcess) -> None:
    async def main() -> None:
        async with AsyncClient.from_env() as svdq:

            async def handler(path: str, body: bytes) -> tuple[int, dict[str, Any]]:
                if path == "/ping":
                    return 200, {"ok": True}
                try:
                    job = await svdq.submit(body, **SMALL)
                except InvalidParameter as exc:
                    return 400, {"param": exc.param, "message": exc.message}
                record = await job.wait(timeout=180)
                return 200, record.to_json_dict()

            server, port = await serve(handler)
            async with server:
                renders = [asyncio.create_task(http(port, "/render", png(shade))) for shade in (10, 60, 110, 160)]
                # While four requests wait on their jobs, the loop answers others at once.
                await asyncio.sleep(0.5)
                started = time.monotonic()
                assert await http(port, "/ping") == (200, {"ok": True})
                assert time.monotonic() - started < 1.0
                assert not all(task.done() for task in renders)
                answers = await asyncio.gather(*renders)
                refused = await http(port, "/render", b"not an image")
        assert {status for status, _ in answers} == {200}
        assert all(record["state"] == "succeeded" for _, record in answers), answers
        assert len({record["id"] for _, record in answers}) == 4
        assert refused[0] == 400 and refused[1]["param"] == "image"

    asyncio.run(main())


def test_events_cancel_and_the_same_refusals_as_the_sync_client(worker: WorkerProcess, image_file: Path) -> None:
    async def main() -> None:
        async with AsyncClient.from_env() as svdq:
            job = await svdq.submit(image_file, **SLOW)
            seen = []
            async for record in job.events():
                seen.append(record)
                if record.state is JobState.STARTED and (record.step or 0) >= 2:
                    canceled = await job.cancel()
                    assert canceled.state is JobState.CANCELED
            assert seen[-1].state is JobState.CANCELED
            assert JobState.STARTED in {r.state for r in seen} and len(seen) >= 3  # progress arrived as events
            assert (await svdq.job(job.id).wait(timeout=5)).state is JobState.CANCELED

            # Refused before anything is written, naming the parameter, exactly as Client refuses it.
            before = await svdq.redis.llen(DEFAULT_QUEUE)
            with pytest.raises(InvalidParameter) as refused:
                await svdq.submit(image_file, num_frames=0)
            with Client.from_env() as sync, pytest.raises(InvalidParameter) as sync_refused:
                sync.submit(image_file, num_frames=0)
            assert str(refused.value) == str(sync_refused.value)
            assert await svdq.redis.llen(DEFAULT_QUEUE) == before
            slow = await svdq.submit(image_file, **SLOW)
            with pytest.raises(TimeoutError):
                await slow.wait(timeout=0.5)
            assert (await slow.cancel()).state is JobState.CANCELED  # a wait that times out leaves the job be
            assert await svdq.redis.exists(keys.job(job.id))

    asyncio.run(main())


def test_a_wait_closes_its_subscription_before_it_returns(
    svdq_env: dict[str, str], image_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not later, when the garbage collector finds the events generator: at a thousand requests that waited,
    that would be a thousand Redis subscriptions left open meanwhile."""
    made: list[Any] = []
    events = AsyncJob.events

    def tracked(self: AsyncJob, **options: Any) -> Any:
        made.append(events(self, **options))
        return made[-1]

    monkeypatch.setattr(AsyncJob, "events", tracked)

    async def scenario() -> JobState:
        async with AsyncClient.from_env(queue=f"unread-{time.monotonic_ns()}") as client:
            job = await client.submit(image_file, **SMALL)
            await job.cancel()
            record = await job.wait(timeout=10)
            assert made[0].ag_frame is None  # closed, its `finally` (the unsubscribe) done
            return record.state

    assert asyncio.run(scenario()) is JobState.CANCELED
