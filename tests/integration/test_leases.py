"""The lease rules in the status store, on a real Redis: one live worker per job, fenced writes,
takeover of a dead worker's job, the poison cap, and recovery from the record."""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest
import redis

from producer import keys
from producer.contract import JobState
from producer.status import AttemptsExhausted, Leased, StatusStore, Superseded
from worker.recovery import Recovery

pytestmark = pytest.mark.integration


@pytest.fixture
def store(redis_url: str) -> StatusStore:
    return StatusStore(redis.Redis.from_url(redis_url), result_ttl=60)


def new_job(store: StatusStore) -> str:
    job_id = uuid.uuid4().hex
    store.create(job_id, {"image": "x"}, queue="q-test")
    return job_id


def test_a_leased_job_cannot_be_claimed_twice(store: StatusStore) -> None:
    job_id = new_job(store)
    assert store.claim(job_id, "a/1", lease_seconds=30) == 1
    with pytest.raises(Leased) as leased:
        store.claim(job_id, "b/2", lease_seconds=30)
    assert leased.value.holder == "a/1"
    assert store.get(job_id).attempts == 1 and store.holder(job_id) == "a/1"


def test_a_lapsed_lease_is_taken_over_and_the_old_attempt_is_fenced_out(store: StatusStore) -> None:
    job_id = new_job(store)
    store.claim(job_id, "a/1", lease_seconds=0.2)
    assert store.renew(job_id, "a/1", 0.2) is True and store.renew(job_id, "b/2", 0.2) is False
    time.sleep(0.3)
    assert store.claim(job_id, "b/2", lease_seconds=30) == 2
    # The first worker comes back to life: none of its writes may land.
    assert store.update(job_id, fence=1, progress=0.9) is False
    with pytest.raises(Superseded):
        store.transition(job_id, JobState.SUCCEEDED, fence=1)
    assert store.renew(job_id, "a/1", 30) is False
    store.transition(job_id, JobState.SUCCEEDED, fence=2)
    assert store.holder(job_id) is None  # leaving `started` drops the lease


def test_a_dead_worker_s_job_past_its_attempts_cannot_be_claimed(store: StatusStore) -> None:
    job_id = new_job(store)
    store.claim(job_id, "a/1", lease_seconds=0.1, max_attempts=1)
    time.sleep(0.2)
    with pytest.raises(AttemptsExhausted):
        store.claim(job_id, "b/2", lease_seconds=30, max_attempts=1)


def test_recovery_requeues_from_the_record_then_fails_worker_lost(store: StatusStore) -> None:
    sent: list[tuple[str, dict[str, Any], str]] = []
    recovery = Recovery(store, lambda *m: sent.append(m), lease_ttl=0.2, max_attempts=2, default_queue="unused")
    job_id = new_job(store)
    store.claim(job_id, "a/1", lease_seconds=0.2, worker="a")
    assert job_id not in store.abandoned(older_than=0.2)  # leased
    time.sleep(0.5)
    assert job_id in store.abandoned(older_than=0.2)
    assert recovery.recover(job_id) == "requeued"
    assert sent == [(job_id, {"image": "x"}, "q-test")]
    record = store.get(job_id)
    assert record.state is JobState.QUEUED and record.error is not None and record.error.code == "worker_lost"

    store.claim(job_id, "b/2", lease_seconds=0.2, max_attempts=2)
    time.sleep(0.5)
    store.redis.delete(keys.recovering(job_id))  # as if the first sweep's short lock had expired
    assert recovery.recover(job_id) == "failed"
    record = store.get(job_id)
    assert record.state is JobState.FAILED and record.attempts == 2
    assert record.error is not None and record.error.code == "worker_lost"
    assert len(sent) == 1


def test_a_second_create_never_touches_an_existing_record(store: StatusStore) -> None:
    # A redelivered message creates the record "if missing": it must not reset a running job.
    job_id = new_job(store)
    store.claim(job_id, "a/1", lease_seconds=30)
    assert store.create(job_id, {"image": "y"}) is False
    record = store.get(job_id)
    assert (record.state, record.attempts, record.request) == (JobState.STARTED, 1, {"image": "x"})
