"""The lease rules in the status store, on a real Redis: one live worker per job, fenced writes,
takeover of a dead worker's job, the poison cap, and recovery from the record."""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from producer import keys
from producer.contract import JobState
from producer.local_redis import LocalRedis
from producer.status import AttemptsExhausted, Leased, StatusStore, Superseded
from worker.heartbeat import Heartbeat
from worker.recovery import Recovery, Sweeper

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


def abandoned_job(store: StatusStore) -> str:
    job_id = new_job(store)
    store.claim(job_id, "a/1", lease_seconds=0.1, worker="a")
    time.sleep(0.25)
    return job_id


def recovery_sending_to(store: StatusStore, sent: list[Any], **options: Any) -> Recovery:
    return Recovery(store, lambda *m: sent.append(m), lease_ttl=0.1, max_attempts=3, default_queue="unused", **options)


def test_a_job_another_sweeper_is_recovering_is_left_to_it(store: StatusStore) -> None:
    job_id = abandoned_job(store)
    other: list[Any] = []
    mine: list[Any] = []
    assert recovery_sending_to(store, other).fleet.lock_recovery(job_id, 30)  # another host's sweep holds it
    assert recovery_sending_to(store, mine).recover(job_id) is None
    assert mine == [] and store.get(job_id).state is JobState.STARTED


def test_a_job_claimed_during_its_recovery_stays_with_the_worker_that_claimed_it(store: StatusStore) -> None:
    """The job's redelivered message reaches a live worker between the sweeper's read and its write: the
    sweeper's write is fenced out, and its own message will be dropped by the claim (the lease is held)."""
    job_id = abandoned_job(store)
    sent: list[Any] = []

    def send(*message: Any) -> None:
        sent.append(message)
        store.claim(job_id, "b/2", lease_seconds=30, worker="b")

    recovery = Recovery(store, send, lease_ttl=0.1, max_attempts=3, default_queue="unused")
    assert recovery.recover(job_id) is None
    record = store.get(job_id)
    assert (record.state, record.attempts, record.worker, record.error) == (JobState.STARTED, 2, "b", None)
    assert len(sent) == 1 and store.holder(job_id) == "b/2"
    with pytest.raises(Leased):  # what the claim does with the sweeper's message when it comes up
        store.claim(job_id, "c/3", lease_seconds=30)


def test_a_lease_whose_record_is_gone_is_skipped_and_the_sweep_goes_on(store: StatusStore) -> None:
    gone, next_one = abandoned_job(store), abandoned_job(store)
    store.redis.delete(keys.job(gone))  # expired, or deleted by an operator
    sent: list[Any] = []
    done = recovery_sending_to(store, sent).sweep()
    assert (next_one, "requeued") in done and all(job_id != gone for job_id, _ in done)
    sent_ids = [m[0] for m in sent]  # (other tests' abandoned jobs on this Redis may be swept too)
    assert next_one in sent_ids and gone not in sent_ids
    # Its index entry goes too: every worker's sweep looked at it again every few seconds, for ever.
    assert store.redis.zscore(keys.state_index(JobState.STARTED.value), gone) is None


def test_a_sweeper_that_hits_an_error_logs_it_and_sweeps_again(
    store: StatusStore, caplog: pytest.LogCaptureFixture
) -> None:
    job_id = abandoned_job(store)
    sent: list[Any] = []
    calls: list[int] = []

    def presence() -> None:  # the sweeper's other duty fails once (a bug, a bad record)
        calls.append(1)
        if len(calls) == 1:
            raise ValueError("presence failed once")

    sweeper = Sweeper(recovery_sending_to(store, sent), interval=0.1, also=presence).start()
    try:
        deadline = time.monotonic() + 10
        while not sent:
            assert time.monotonic() < deadline, "the sweeper stopped after its error"
            time.sleep(0.05)
    finally:
        sweeper.stop()
    assert sent[0][0] == job_id and "presence failed once" in caplog.text


def test_a_fleet_sweeps_once_per_interval_however_many_workers_it_has(store: StatusStore) -> None:
    """Each sweep reads the lease of every running job: with every worker sweeping each interval, a fleet of W
    workers read W x W leases a round."""
    sweeps: list[str] = []

    class Counted(Recovery):
        def __init__(self, name: str):
            # A lease setting of its own: no other test's sweeper on this Redis shares these turns.
            super().__init__(store, lambda *m: None, lease_ttl=0.0123, max_attempts=3, default_queue="unused")
            self.name = name

        def sweep(self) -> list[tuple[str, str]]:
            sweeps.append(self.name)
            return []

    sweepers = [Sweeper(Counted(f"w{i}"), interval=0.2).start() for i in range(4)]
    time.sleep(3)
    for sweeper in sweepers:
        sweeper.stop()
    # One sweep a round (about 15-19 here), where every one of the four sweepers swept before (about 60).
    assert 8 <= len(sweeps) <= 25, len(sweeps)


def test_a_sweeper_that_cannot_send_a_job_back_leaves_the_turn_to_another(store: StatusStore) -> None:
    """Its broker connection is broken, say: were it to keep the turn, no job would be recovered."""
    job_id = abandoned_job(store)
    sent: list[Any] = []

    def broken(*message: Any) -> None:
        raise ConnectionError("the broker is unreachable from this worker")

    stuck = Recovery(store, broken, lease_ttl=0.1, max_attempts=3, default_queue="unused")
    sweepers = [Sweeper(stuck, interval=0.2).start()]
    time.sleep(0.1)  # it takes the first turn
    sweepers.append(Sweeper(recovery_sending_to(store, sent), interval=0.2).start())
    try:
        deadline = time.monotonic() + 10  # its lock on the job holds one second after each failed try
        while job_id not in [m[0] for m in sent]:
            assert time.monotonic() < deadline, "the stuck sweeper kept the turn"
            time.sleep(0.05)
    finally:
        for sweeper in sweepers:
            sweeper.stop()
    assert store.get(job_id).state is JobState.QUEUED


def test_a_canceled_job_s_lease_is_logged_once_as_a_cancel_not_a_loss(
    store: StatusStore, caplog: pytest.LogCaptureFixture
) -> None:
    """A layer can take minutes on a CPU: the heartbeat meets the canceled job's ended lease meanwhile, and said
    "lease lost ... its result will be dropped" every beat."""
    canceled, lost = new_job(store), new_job(store)
    heartbeat = Heartbeat(store, lease_ttl=0.3)  # beats every 0.1 s
    try:
        for job_id in (canceled, lost):
            store.claim(job_id, f"{job_id}/1", lease_seconds=0.3)
            heartbeat.hold(job_id, f"{job_id}/1", "w@test")
        with caplog.at_level(logging.INFO, logger="worker.heartbeat"):
            store.transition(canceled, JobState.CANCELED)
            store.redis.delete(keys.lease(lost))  # as if it lapsed
            time.sleep(0.6)
    finally:
        heartbeat.close()
    said = [r.getMessage() for r in caplog.records]
    assert said.count(f"job {canceled}: canceled; its render stops at the next check") == 1
    assert said.count(f"job {lost}: lease lost (expired or taken over); its result will be dropped") == 1
    assert not any(canceled in m and "lease lost" in m for m in said)


@pytest.fixture
def own_store(tmp_path: Any) -> Iterator[StatusStore]:
    """On a Redis of its own: no other test's worker sends these jobs' messages meanwhile."""
    server = LocalRedis(tmp_path / "redis")
    client = redis.Redis.from_url(server.start())
    yield StatusStore(client, result_ttl=60)
    client.close()
    server.stop()


def scheduled_job(store: StatusStore, due_in: float) -> str:
    """A job sent back to its queue, its retry due in `due_in` seconds (as worker.render schedules it)."""
    job_id = new_job(store)
    store.claim(job_id, "a/1", lease_seconds=30)
    store.transition(job_id, JobState.QUEUED, fence=1, stage="retrying", due=store.server_time() + due_in)
    return job_id


def test_a_scheduled_retry_is_sent_once_when_due_and_not_after_a_cancel(own_store: StatusStore) -> None:
    store = own_store
    recovery = Recovery(store, lambda *m: None, lease_ttl=30, max_attempts=3, default_queue="unused")
    later, canceled = scheduled_job(store, 3600), scheduled_job(store, 0)
    store.transition(canceled, JobState.CANCELED)
    due = scheduled_job(store, 0)
    recovery.release_due()
    recovery.release_due()  # another worker's sweeper, a moment later
    sent = [json.loads(m)["headers"]["id"] for m in store.redis.lrange("q-test", 0, -1)]
    assert sent == [due]  # once; not the canceled one, nor the one due in an hour
    assert store.redis.zscore(keys.RETRY_DUE, later) is not None
    assert store.redis.zscore(keys.RETRY_DUE, canceled) is None and store.redis.zscore(keys.RETRY_DUE, due) is None


def test_a_due_job_seen_otherwise_but_queued_by_then_keeps_its_place(own_store: StatusStore) -> None:
    """A sweeper read it as not queued (claimed by a duplicate message, say); by its release it was handed back:
    taking it off the schedule without its message would leave it queued for ever."""
    job_id = scheduled_job(own_store, 0)
    assert own_store.release(job_id, "", "", own_store.server_time()) is False
    assert own_store.redis.zscore(keys.RETRY_DUE, job_id) is not None
