"""No credential in logs, task messages, status records, events or error messages.

A worker against a password-protected Redis, with S3 credentials, runs a good job and a failing one;
then every place a secret could leak is searched for the password and the AWS secret key.
"""

from __future__ import annotations

import base64
import json
import secrets
import urllib.parse
import urllib.request
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

from producer import keys
from producer.client import Client, producer_celery
from producer.contract import JobState
from producer.local_redis import LocalRedis
from producer.settings import Settings
from producer.storage import open_store
from tests.integration.conftest import SMALL, _start_worker, _stop_worker

pytestmark = pytest.mark.integration


def test_secrets_stay_out_of_logs_messages_and_records(
    svdq_env: dict[str, str], tmp_path: Path, image_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    password = "pw-" + secrets.token_hex(12)
    server = LocalRedis(tmp_path / "redis", password=password)
    url = server.start()
    env = {**svdq_env, "SVDQ_REDIS_URL": url}
    monkeypatch.setenv("SVDQ_REDIS_URL", url)
    aws_secret = env["AWS_SECRET_ACCESS_KEY"]
    control: Celery = producer_celery(Settings(redis_url=url))
    worker = _start_worker(env, tmp_path, control, f"q-{uuid.uuid4().hex[:6]}")
    try:
        with Client.from_env(queue=worker.queue) as client:
            good = client.submit(image_file, **SMALL).wait(timeout=120)
            bad = client.submit("s3://svdq-test/renders/no-such-image.png", **SMALL).wait(timeout=120)
            assert good.state is JobState.SUCCEEDED and bad.state is JobState.FAILED
            # A message as it sits in the broker, taken from a queue no worker reads.
            with Client.from_env(queue="nobody-reads-this") as parked:
                parked.submit(image_file, **SMALL)
                message = client.redis.lindex("nobody-reads-this", 0)
            records = [client.job(good.id).status(), client.job(bad.id).status()]
            events = client.redis.xrange(keys.EVENTS_STREAM)
    finally:
        _stop_worker(worker)
        control.close()
        server.stop()

    places: dict[str, Any] = {
        "worker log": worker.log_text(),
        "task message": message.decode(),
        "records": json.dumps([r.to_json_dict() for r in records]),
        "events": str(events),
        "error message": bad.error.message if bad.error else "",
    }
    assert message and "svdq.generate_video" in places["task message"]
    for place, text in places.items():
        assert password not in text, f"the Redis password leaked into the {place}"
        assert aws_secret not in text, f"the AWS secret key leaked into the {place}"
    assert "redis://:**@" in places["worker log"] or "redis://:***@" in places["worker log"]


def test_presigned_result_urls_carry_the_configured_expiry(svdq_env: dict[str, str]) -> None:
    # SigV4 URLs whose expiry is signed in (X-Amz-Date + X-Amz-Expires). Enforcing it is the S3 server's
    # job: AWS, MinIO and R2 do; moto, the server under test here, does not, so that part is not tested.
    store = open_store(Settings(presign_ttl=90))
    stored = store.put(f"presign-{uuid.uuid4().hex}/video.mp4", b"not really a video", "video/mp4")
    url = store.public_url(stored.key)
    assert url is not None
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)
    assert query["X-Amz-Algorithm"] == ["AWS4-HMAC-SHA256"] and query["X-Amz-Expires"] == ["90"]
    signed_at = datetime.strptime(query["X-Amz-Date"][0], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
    assert abs((datetime.now(UTC) - signed_at).total_seconds()) < 60
    assert svdq_env["AWS_SECRET_ACCESS_KEY"] not in url
    with urllib.request.urlopen(url, timeout=5) as response:
        assert response.read() == b"not really a video"


def test_result_urls_are_signed_for_the_public_endpoint(svdq_env: dict[str, str]) -> None:
    # svdq reaches the store as 127.0.0.1, users as localhost (compose: http://minio:9000 inside, a public
    # name outside): the URL names the public address, and the object is read through it.
    inside = svdq_env["SVDQ_S3_ENDPOINT_URL"]
    outside = inside.replace("127.0.0.1", "localhost")
    assert outside != inside
    store = open_store(Settings(s3_public_endpoint_url=outside))
    stored = store.put(f"public-{uuid.uuid4().hex}/video.mp4", b"seen from outside", "video/mp4")
    url = store.public_url(stored.key)
    assert url is not None and url.startswith(f"{outside}/"), url
    with urllib.request.urlopen(url, timeout=5) as response:
        assert response.read() == b"seen from outside"
    assert store.read_key(stored.key) == b"seen from outside"  # svdq itself still uses the inside address


def test_an_image_url_s_signature_is_in_the_message_body_only(client: Client) -> None:
    """A presigned image URL's query is a bearer credential for the image: Flower (and Celery's log lines) showed
    it, from the message's `kwargsrepr`. Only the worker, reading the body, needs it."""
    from producer import wire
    from producer.client import send_job

    queue = f"signed-{uuid.uuid4().hex[:8]}"
    signature = "X-Amz-Signature=" + secrets.token_hex(16)
    request = {"image": f"https://images.example/cat.png?X-Amz-Credential=AKIA%2Fx&{signature}", "num_frames": 4}
    send_job(client.celery, "signed-1", request, queue)  # how recovery sends (through Celery)
    client.redis.lpush(queue, wire.message("signed-2", request, queue))  # how producers send
    for raw in client.redis.lrange(queue, 0, -1):
        message = json.loads(raw)
        assert signature not in json.dumps(message["headers"]) and signature not in json.dumps(message["properties"])
        assert "https://images.example/cat.png?(query not shown)" in message["headers"]["kwargsrepr"]
        assert json.loads(base64.b64decode(message["body"]))[1]["request"] == request
