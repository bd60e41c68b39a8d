"""`svdq gateway` as a web backend in another language meets it: a real uvicorn process, HTTP from urllib,
real Redis, the S3 server and the session's real worker."""

from __future__ import annotations

import base64
import http.client
import io
import json
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import imageio_ffmpeg
import pytest
import redis

from producer import keys
from producer.client import Client
from producer.local_redis import LocalRedis, free_port
from tests.integration.conftest import SMALL, SVDQ, WorkerProcess

pytestmark = pytest.mark.integration

KEYS = "alice:key-alice-1234567890,bob:key-bob-0987654321"
ALICE, BOB = "key-alice-1234567890", "key-bob-0987654321"
PARAMS = {
    "width": SMALL["width"],
    "height": SMALL["height"],
    "num_frames": SMALL["num_frames"],
    "num_inference_steps": SMALL["num_inference_steps"],
}


class Gateway:
    def __init__(self, env: dict[str, str], log: Path, *extra: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                [SVDQ, "gateway", "--port", str(self.port), *extra], env=env, stdout=out, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + 30
        while True:
            try:
                if self.call("GET", "/healthz")[0] == 200:
                    return
            except OSError:
                pass
            assert self.proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)

    def call(
        self,
        method: str,
        path: str,
        key: str | None = None,
        body: Any = None,
        headers: dict[str, str] | None = None,
        raw: bytes | None = None,
    ) -> tuple[int, dict[str, str], Any]:
        data = raw if raw is not None else None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method, headers=headers or {})
        if body is not None:
            request.add_header("Content-Type", "application/json")
        if key:
            request.add_header("Authorization", f"Bearer {key}")
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                content = response.read()
                status, got = response.status, dict(response.headers)
        except urllib.error.HTTPError as err:
            content, status, got = err.read(), err.code, dict(err.headers)
        kind = got.get("content-type", "")
        return status, got, json.loads(content) if kind.startswith("application/json") else content

    def events(self, job_id: str, key: str) -> list[tuple[str, dict[str, Any]]]:
        return [(event, data) for _, event, data in self.stream(job_id, key)]

    def stream(self, job_id: str, key: str, last_id: str | None = None) -> list[tuple[str, str, dict[str, Any]]]:
        """(id, event, data) of every event until the server ends the stream."""
        headers = {"Authorization": f"Bearer {key}", **({"Last-Event-ID": last_id} if last_id else {})}
        request = urllib.request.Request(f"{self.url}/v1/jobs/{job_id}/events", headers=headers)
        got, event_id, event = [], "", ""
        with urllib.request.urlopen(request, timeout=120) as stream:
            for raw in stream:
                line = raw.decode().rstrip("\n")
                if line.startswith("id: "):
                    event_id = line[4:]
                elif line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: "):
                    got.append((event_id, event, json.loads(line[6:])))
        return got

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=20)


@pytest.fixture(scope="module")
def gateway(svdq_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    g = Gateway({**svdq_env, "SVDQ_API_KEYS": KEYS}, tmp_path_factory.mktemp("gateway") / "gateway.log")
    yield g
    g.stop()


def png(shade: int = 90) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (shade, 40, 200)).save(buf, format="PNG")
    return buf.getvalue()


def test_post_then_events_until_it_succeeds_then_the_video(
    gateway: Gateway, worker: WorkerProcess, tmp_path: Path
) -> None:
    status, headers, job = gateway.call(
        "POST", "/v1/jobs", ALICE, {"image": base64.b64encode(png()).decode(), **PARAMS}
    )
    assert status == 201, job
    assert headers["location"] == f"/v1/jobs/{job['id']}" and job["links"]["events"].endswith("/events")
    assert job["state"] in ("queued", "started") and job["owner"] == "alice"  # a warm worker may be that quick
    seen = gateway.stream(job["id"], ALICE)
    states = [event for _, event, _ in seen]
    assert states[-1] == "succeeded" and "started" in states  # and the stream closed after it
    status, _, video = gateway.call("GET", f"/v1/jobs/{job['id']}/video", ALICE)  # 302 to S3, followed
    assert status == 200
    (tmp_path / "v.mp4").write_bytes(video)
    assert imageio_ffmpeg.count_frames_and_secs(str(tmp_path / "v.mp4"))[0] == SMALL["num_frames"]
    # A finished job's stream: its final state, then the end.
    assert [event for event, _ in gateway.events(job["id"], ALICE)] == ["succeeded"]
    # Last-Event-ID: a client that saw the final event gets nothing more; one cut off earlier gets the final state.
    assert gateway.stream(job["id"], ALICE, last_id=seen[-1][0]) == []
    assert [event for _, event, _ in gateway.stream(job["id"], ALICE, last_id=seen[0][0])] == ["succeeded"]


def test_a_key_sees_only_its_own_jobs(gateway: Gateway) -> None:
    status, _, job = gateway.call("POST", "/v1/jobs", ALICE, {"image": base64.b64encode(png(7)).decode(), **PARAMS})
    assert status == 201
    path = f"/v1/jobs/{job['id']}"
    for method, suffix in (("GET", ""), ("DELETE", ""), ("GET", "/events"), ("GET", "/video")):
        assert gateway.call(method, path + suffix, BOB)[0] == 404, (method, suffix)  # as if it did not exist
        status, headers, body = gateway.call(method, path + suffix)
        assert status == 401 and headers["www-authenticate"] == "Bearer" and body["error"]["code"] == "unauthorized"
        assert gateway.call(method, path + suffix, "key-alice-12345678901")[0] == 401  # close is not enough
    assert gateway.call("GET", "/v1/jobs/not..an..id", ALICE)[0] == 404
    status, _, canceled = gateway.call("DELETE", path, ALICE)
    assert status == 200 and canceled["state"] in ("canceled", "succeeded")
    if canceled["state"] == "canceled":
        assert gateway.call("DELETE", path, ALICE)[0] == 409  # already ended


def test_refusals_name_what_is_wrong_and_submit_nothing(gateway: Gateway, svdq_env: dict[str, str]) -> None:
    image = base64.b64encode(png(33)).decode()
    status, _, body = gateway.call("POST", "/v1/jobs", ALICE, {"image": image, **PARAMS, "width": 65})
    assert status == 422 and body["error"]["param"] == "width" and "multiple of 8" in body["error"]["message"]
    status, _, body = gateway.call("POST", "/v1/jobs", ALICE, {"image_url": "http://localhost:9/x.png", **PARAMS})
    assert status == 422 and body["error"]["param"] == "image_url"
    assert "not resolve to a public address" in body["error"]["message"]
    assert "127.0.0.1" not in body["error"]["message"]  # where a name resolves inside the network is not said
    for reference in (
        "s3://someone-elses/x.png",
        "s3://svdq-test/renders/inputs/x.png",
        "inputs/x.png",
        "file:///etc/passwd",
    ):
        status, _, body = gateway.call("POST", "/v1/jobs", ALICE, {"image_url": reference, **PARAMS})
        assert status == 422 and body["error"]["param"] == "image_url", reference  # the store is nobody's to name
    for field, value in (("owner", "bob"), ("idempotency_key", "x"), ("webhook", 5)):
        status, _, body = gateway.call("POST", "/v1/jobs", ALICE, {"image": image, **PARAMS, field: value})
        assert status == 422 and body["error"]["param"] == field, body
    status, _, body = gateway.call("POST", "/v1/jobs", ALICE, raw=b"not json", headers={"Content-Type": "text/plain"})
    assert status == 422 and body["error"]["code"] == "invalid_json"
    # A name that does not resolve reads like a private one: which internal names exist is not said either.
    status, _, body = gateway.call("POST", "/v1/jobs", ALICE, {"image_url": "http://intranet.invalid/x.png", **PARAMS})
    assert status == 422 and body["error"]["message"].endswith("intranet.invalid does not resolve to a public address")
    deep = b"[" * 100_000 + b"]" * 100_000  # past the JSON parser's recursion: a 422, not a 500
    status, _, body = gateway.call("POST", "/v1/jobs", ALICE, raw=deep, headers={"Content-Type": "application/json"})
    assert status == 422 and body["error"]["code"] == "invalid_json"
    long_url = "https://example.com/" + "a" * 2100  # the worker's limit: accepted, it would stay queued forever
    status, _, body = gateway.call("POST", "/v1/jobs", ALICE, {"image_url": long_url, **PARAMS})
    assert status == 422 and body["error"]["param"] == "image_url" and "over 2,048" in body["error"]["message"]
    assert gateway.call("GET", "/v1/jobs?cursor=nan", ALICE)[0] == 422  # not "Redis is unreachable"
    huge = gateway.call("POST", "/v1/jobs", ALICE, raw=b"x" * 10, headers={"Content-Length": str(10**9)})
    assert huge[0] == 413
    connection = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=30)
    connection.request(
        "POST",
        "/v1/jobs",
        body=iter([b'{"image_url": "s3://x/y.png"}']),
        encode_chunked=True,
        headers={"Authorization": f"Bearer {ALICE}", "Content-Type": "application/json"},
    )
    assert connection.getresponse().status == 411  # no declared length, no cap: refused before reading it
    connection.close()
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=30) as raw:  # a length *and* chunked
        raw.sendall(
            f"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ALICE}\r\nContent-Length: 5\r\n"
            "Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n".encode()
        )
        assert raw.recv(100).split(b" ")[1] in (b"400", b"411")


def test_an_idempotency_key_is_the_caller_s_own(gateway: Gateway) -> None:
    body, key = {"image": base64.b64encode(png(120)).decode(), **PARAMS}, {"Idempotency-Key": uuid.uuid4().hex}
    first = gateway.call("POST", "/v1/jobs", ALICE, body, headers=key)[2]["id"]
    assert gateway.call("POST", "/v1/jobs", ALICE, body, headers=key)[2]["id"] == first
    assert gateway.call("POST", "/v1/jobs", BOB, body, headers=key)[2]["id"] != first  # bob's key is his own
    # The same key for another render is refused (the IETF Idempotency-Key draft's 422), naming the header.
    status, _, reused = gateway.call("POST", "/v1/jobs", ALICE, {**body, "fps": 3}, headers=key)
    assert status == 422 and reused["error"]["code"] == "idempotency_key_reused" and "fps" in reused["error"]["message"]
    assert first not in json.dumps(reused)
    with Client.from_env() as client:  # a producer outside the gateway, whose key reads like one of alice's
        outside = client.submit(png(121), idempotency_key="alice:shared", **PARAMS)
        status, _, refused = gateway.call("POST", "/v1/jobs", ALICE, body, headers={"Idempotency-Key": "shared"})
        assert status == 409 and refused["error"]["code"] == "idempotency_conflict" and "id" not in refused
        assert client.redis.zscore(keys.owner_index("alice"), outside.id) is None  # not in alice's list either


def test_a_key_lists_its_own_jobs_newest_first_a_page_at_a_time(gateway: Gateway) -> None:
    mine = [
        gateway.call("POST", "/v1/jobs", ALICE, {"image": base64.b64encode(png(n)).decode(), **PARAMS})[2]["id"]
        for n in (150, 151, 152)
    ]
    theirs = gateway.call("POST", "/v1/jobs", BOB, {"image": base64.b64encode(png(153)).decode(), **PARAMS})[2]["id"]
    status, _, first = gateway.call("GET", "/v1/jobs?limit=2", ALICE)
    assert status == 200 and [j["id"] for j in first["jobs"]] == mine[::-1][:2]
    _, _, second = gateway.call("GET", f"/v1/jobs?limit=2&cursor={first['next_cursor']}", ALICE)
    assert mine[0] in [j["id"] for j in second["jobs"]] and theirs not in json.dumps([first, second])
    assert theirs in [j["id"] for j in gateway.call("GET", "/v1/jobs?limit=100", BOB)[2]["jobs"]]
    assert gateway.call("GET", "/v1/jobs?state=nonsense", ALICE)[2]["error"]["param"] == "state"
    assert gateway.call("GET", "/v1/jobs?limit=0", ALICE)[0] == 422


def test_open_streams_share_one_redis_subscription(gateway: Gateway, svdq_env: dict[str, str]) -> None:
    """A stream per Redis subscription would cost a Redis connection and a descriptor each: a few hundred
    streams would exhaust both. All of a process's streams wait on its one pattern subscription."""
    _, _, job = gateway.call("POST", "/v1/jobs", ALICE, {"image": base64.b64encode(png(77)).decode(), **PARAMS})
    streams: list[tuple[socket.socket, bytes]] = []
    for _ in range(20):
        sock = socket.create_connection(("127.0.0.1", gateway.port), timeout=30)
        sock.sendall(
            f"GET /v1/jobs/{job['id']}/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ALICE}\r\n\r\n".encode()
        )
        seen = b""
        while b"event: " not in seen:
            seen += sock.recv(65536)
        streams.append((sock, seen))
    r = redis.Redis.from_url(svdq_env["SVDQ_REDIS_URL"])
    try:
        assert r.pubsub_numsub(keys.events(job["id"])) == [(keys.events(job["id"]).encode(), 0)]
        assert r.pubsub_numpat() >= 1
    finally:
        r.close()
    gateway.call("DELETE", f"/v1/jobs/{job['id']}", ALICE)  # or it has ended meanwhile: either way, a final event
    for sock, seen in streams:
        while not seen.endswith(b"0\r\n\r\n") and (chunk := sock.recv(65536)):  # to the chunked body's end
            seen += chunk
        sock.close()
        assert b"event: canceled" in seen or b"event: succeeded" in seen, seen[-500:]


def test_a_multipart_upload(gateway: Gateway) -> None:
    boundary = uuid.uuid4().hex
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode() for k, v in PARAMS.items()
    ]
    parts.append(
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n'
        f"Content-Type: image/png\r\n\r\n".encode()
        + png(200)
        + b"\r\n"
    )
    raw = b"".join(parts) + f"--{boundary}--\r\n".encode()
    status, _, job = gateway.call(
        "POST", "/v1/jobs", ALICE, raw=raw, headers={"Content-Type": f"multipart/form-data; boundary={boundary}"}
    )
    assert status == 201 and job["request"]["num_frames"] == SMALL["num_frames"], job


def test_ready_only_with_redis_rate_limited_per_key_and_no_start_without_keys(
    svdq_env: dict[str, str], tmp_path: Path
) -> None:
    refused = subprocess.run(
        [SVDQ, "gateway", "--port", str(free_port())], env=svdq_env, capture_output=True, text=True, timeout=60
    )
    assert refused.returncode == 2 and "SVDQ_API_KEYS" in refused.stderr
    own = LocalRedis(tmp_path / "redis")
    own.start()
    gateway = Gateway(
        {**svdq_env, "SVDQ_REDIS_URL": own.url, "SVDQ_API_KEYS": KEYS, "SVDQ_RATE_LIMIT": "5/h"}, tmp_path / "g.log"
    )
    try:
        assert gateway.call("GET", "/readyz")[0] == 200
        assert [gateway.call("GET", "/v1/jobs", ALICE)[0] for _ in range(6)] == [200] * 5 + [429]  # 5/h
        status, headers, body = gateway.call("GET", "/v1/jobs", ALICE)
        assert status == 429 and 1 <= int(headers["retry-after"]) <= 3600 and body["error"]["code"] == "rate_limited"
        assert gateway.call("GET", "/v1/jobs", BOB)[0] == 200  # per key
        own.stop()
        status, headers, body = gateway.call("GET", "/readyz")
        assert status == 503 and headers["retry-after"] == "5" and body["error"]["code"] == "unavailable"
        status, headers, _ = gateway.call("POST", "/v1/jobs", ALICE, {"image": base64.b64encode(png()).decode()})
        assert status == 503 and headers["retry-after"] == "5"
    finally:
        gateway.stop()
