"""The odd-image corpus through submit and through a real worker: every job ends, the worker lives."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from celery import Celery

from producer.client import Client
from producer.contract import InvalidParameter, JobState
from tests.integration.conftest import BUCKET, PREFIX, SMALL
from tests.odd_images import corpus

pytestmark = pytest.mark.integration
MAX_BYTES = 200_000  # the corpus's "huge-file" is a 400x400 noise PNG, about 480 kB


def test_odd_images_through_submit_and_the_worker(
    svdq_env: dict[str, str], start_worker: Any, s3: Any, celery_control: Celery, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(svdq_env, "SVDQ_MAX_IMAGE_BYTES", str(MAX_BYTES))
    monkeypatch.setenv("SVDQ_MAX_IMAGE_BYTES", str(MAX_BYTES))
    fresh = start_worker()
    jobs = {}
    with Client.from_env(queue=fresh.queue) as client:
        for name, (data, renders) in corpus().items():
            # The producer checks what it can: bad images never reach a GPU from submit.
            if renders:
                jobs[f"{name} (submit)"] = (client.submit(data, **SMALL), True)
            else:
                with pytest.raises(InvalidParameter) as err:
                    client.submit(data, **SMALL)
                assert err.value.param == "image", name
            # The worker checks everything, for messages that come by URL or from other clients.
            key = f"{PREFIX}/odd/{uuid.uuid4().hex}-{name}"
            s3.put_object(Bucket=BUCKET, Key=key, Body=data)
            jobs[f"{name} (url)"] = (client.submit(f"s3://{BUCKET}/{key}", **SMALL), renders)

        for label, (job, renders) in jobs.items():
            record = job.wait(timeout=120)
            if renders:
                assert record.state is JobState.SUCCEEDED, (label, record.error)
            else:
                assert record.state is JobState.FAILED, label
                assert record.error is not None and record.error.code == "invalid_input", (label, record.error)
                assert record.attempts == 1, label

    assert celery_control.control.ping(destination=[fresh.hostname], timeout=2.0) == [{fresh.hostname: {"ok": "pong"}}]
    assert fresh.proc.poll() is None
    assert (
        "ForkPoolWorker" not in fresh.log_text().split("exited with")[0][-200:] or "exited with" not in fresh.log_text()
    )
