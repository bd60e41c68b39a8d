"""The job record's rules on a real Redis: only the transition table's moves, and keys that expire once a job
ends."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import redis

from producer import keys
from producer.client import Client
from producer.contract import JobState
from producer.fleet import LOADING_TTL, FleetStore
from producer.status import AttemptsExhausted, DuplicateKey, StatusStore
from tests.integration.conftest import SMALL, WorkerProcess
from worker.errors import JobCanceled
from worker.outcome import Attempt
from worker.progress import Progress

pytestmark = pytest.mark.integration


def test_status_store_enforces_the_transition_table(redis_url: str) -> None:
    store = StatusStore(redis.Redis.from_url(redis_url), result_ttl=60)
    job_id = uuid.uuid4().hex
    assert store.create(job_id, {"image": "x"}) is True
    assert store.create(job_id, {"image": "y"}) is False
    with pytest.raises(Exception, match="cannot go from queued to succeeded"):
        store.transition(job_id, JobState.SUCCEEDED)
    assert store.update(job_id, progress=0.5) is False  # not started: progress is not written
    store.claim(job_id, "test/1", lease_seconds=60)
    assert store.update(job_id, progress=0.5, stage="denoise") is True
    store.transition(job_id, JobState.CANCELED)
    with pytest.raises(Exception, match="cannot go from canceled to started"):
        store.claim(job_id, "test/1", lease_seconds=60)
    record = store.get(job_id)
    assert (record.state, record.attempts, record.progress, record.request) == (
        JobState.CANCELED,
        1,
        0.5,
        {"image": "x"},
    )
    assert record.finished_at is not None


def test_terminal_records_expire(client: Client, worker: WorkerProcess, image_file: Path) -> None:
    job = client.submit(image_file, **SMALL)
    job.wait(timeout=120)
    ttl = client.redis.ttl(keys.job(job.id))
    assert 0 < ttl <= client.settings.result_ttl


def test_an_idempotency_key_lives_while_its_job_waits_and_expires_with_its_record(redis_url: str) -> None:
    """The key once took SVDQ_RESULT_TTL from its creation: a job still queued after that lost it, and a re-run
    of the same bulk submitted the job again."""
    store = StatusStore(redis.Redis.from_url(redis_url), result_ttl=1)
    job_id, key = uuid.uuid4().hex, f"order-{uuid.uuid4().hex}"
    assert store.create(job_id, {"image": "x"}, idempotency_key=key) is True
    time.sleep(1.5)  # past the TTL, still queued
    with pytest.raises(DuplicateKey):
        store.create(uuid.uuid4().hex, {"image": "x"}, idempotency_key=key)
    store = StatusStore(store.redis, result_ttl=60)
    store.transition(job_id, JobState.CANCELED)
    record_ms, key_ms = store.redis.pttl(keys.job(job_id)), store.redis.pttl(keys.idempotency(key))
    assert record_ms > 59_000 and abs(record_ms - key_ms) < 500, (record_ms, key_ms)


def test_the_state_index_forgets_jobs_that_ended_longer_than_the_ttl_ago(redis_url: str) -> None:
    now = [datetime(2026, 1, 1, tzinfo=UTC)]
    store = StatusStore(redis.Redis.from_url(redis_url), result_ttl=60, clock=lambda: now[0])
    old, new = uuid.uuid4().hex, uuid.uuid4().hex
    canceled = keys.state_index(JobState.CANCELED.value)
    for job_id in (old, new):
        store.create(job_id, {"image": "x"})
    store.transition(old, JobState.CANCELED)
    assert store.redis.zscore(canceled, old) is not None
    now[0] += timedelta(seconds=61)  # past the old job's TTL: its record is gone, so is its entry
    store.transition(new, JobState.CANCELED)
    assert store.redis.zscore(canceled, old) is None and store.redis.zscore(canceled, new) is not None


def test_progress_is_written_at_most_every_interval_and_a_cancel_is_seen_at_the_next_call(redis_url: str) -> None:
    store = StatusStore(redis.Redis.from_url(redis_url), result_ttl=60)
    job_id = uuid.uuid4().hex
    store.create(job_id, {"image": "x"})
    now = [0.0]
    progress = Progress(store, Attempt(job_id, store.claim(job_id, "w/1", 30), "w/1"), clock=lambda: now[0])
    written = []
    for at, fraction in ((0.0, 0.1), (0.1, 0.2), (0.2, 0.3), (0.3, 0.4)):  # the default interval is 0.25 s
        now[0] = at
        progress("denoise", fraction)
        written.append(store.get(job_id).progress)
    assert written == [0.1, 0.1, 0.1, 0.4]
    now[0] = 0.31
    progress("upload", 0.95, force=True)  # a stage's start is always written
    assert (store.get(job_id).stage, store.get(job_id).progress) == ("upload", 0.95)
    store.transition(job_id, JobState.CANCELED)
    now[0] = 0.32  # within the interval: nothing to write, but the record is read
    with pytest.raises(JobCanceled):
        progress("upload", 0.96)


def test_a_handed_back_execution_is_not_counted_against_the_cap_and_the_cap_s_refusal_fences_on_every_one(
    redis_url: str,
) -> None:
    """The claim of a dead worker's job is refused once it has used SVDQ_MAX_ATTEMPTS, counting attempts less
    handbacks; the refusal carries the raw attempt number, which the job's final write is fenced on (with the
    counted one it was refused as superseded, and the job stayed started until a sweep)."""
    store = StatusStore(redis.Redis.from_url(redis_url), result_ttl=60)
    job_id = uuid.uuid4().hex
    store.create(job_id, {"image": "x"})
    assert store.claim(job_id, "w1/1", lease_seconds=60, max_attempts=1) == 1
    store.transition(job_id, JobState.QUEUED, fence=1, handback=True)  # a stopping worker's hand-back
    assert store.claim(job_id, "w2/1", lease_seconds=60, max_attempts=1) == 2  # still its first counted attempt
    store.redis.delete(keys.lease(job_id))  # w2 died: its lease lapsed
    with pytest.raises(AttemptsExhausted, match="it has used its 1 attempts") as refused:
        store.claim(job_id, "w3/1", lease_seconds=60, max_attempts=1)
    assert refused.value.attempts == 2
    store.transition(job_id, JobState.FAILED, fence=refused.value.attempts, unleased=True)
    record = store.get(job_id)
    assert (record.state, record.attempts, record.handbacks) == (JobState.FAILED, 2, 1)


def test_the_fleet_s_nodes_are_found_without_a_scan_of_every_key(redis_url: str) -> None:
    """`svdq top` found the nodes with SCAN, which walks every key in Redis (every job's) on each refresh: at a
    fleet's half a million records, seconds of Redis's one thread a refresh."""
    client = redis.Redis.from_url(redis_url)
    fleet = FleetStore(client)
    alive, failed, gone = (f"{what}-{uuid.uuid4().hex[:6]}@test" for what in ("alive", "failed", "gone"))
    fleet.present(alive, {"model": "tiny", "pid": 1}, ttl=30, device="cpu")
    fleet.failed(failed, "tiny", "OSError: no weights")
    fleet.present(gone, {"model": "tiny", "pid": 2}, ttl=30, device="cpu")
    fleet.gone(gone)
    scans = client.info("commandstats").get("cmdstat_scan", {}).get("calls", 0)
    nodes = fleet.nodes()
    assert client.info("commandstats").get("cmdstat_scan", {}).get("calls", 0) == scans
    assert nodes[alive]["device"] == "cpu" and nodes[failed]["error"] == "OSError: no weights" and gone not in nodes
    client.delete(keys.worker(alive))  # expired: not listed, and its index entry goes once it is old
    assert alive not in fleet.nodes()


def test_a_loading_node_keeps_the_device_its_pool_process_already_wrote_and_loses_a_past_error(
    redis_url: str,
) -> None:
    """The pool process starts loading before the main process says the node is loading: a fast load's
    `loaded_on` can come first, and the loading presence must not erase it (`svdq top` showed "auto")."""
    fleet = FleetStore(redis.Redis.from_url(redis_url))
    name = f"race-{uuid.uuid4().hex[:6]}@test"
    fleet.failed(name, "tiny", "OSError: no weights")  # the previous run
    fleet.loaded_on(name, "cpu")
    fleet.loading(name, "tiny", ["q", "q.high"])
    assert fleet.node(name)["device"] == "cpu" and "error" not in fleet.node(name)
    loading = fleet.loading_nodes()[name]
    assert (loading.model, loading.queues) == ("tiny", ("q", "q.high")) and 0 <= loading.seconds < 5
    fleet.started(name)
    assert name not in fleet.loading_nodes() and fleet.node(name)["device"] == "cpu"


def test_a_loading_presence_lapses_unless_renewed_and_a_malformed_one_is_skipped(redis_url: str) -> None:
    """A node killed while loading drops out within LOADING_TTL; fields anyone with Redis access can write never
    stop `svdq top` or a wait (they read loading_nodes)."""
    client = redis.Redis.from_url(redis_url)
    fleet = FleetStore(client)
    name = f"ttl-{uuid.uuid4().hex[:6]}@test"
    fleet.loading(name, "tiny", ["q"])
    assert 0 < client.ttl(keys.worker(name)) <= LOADING_TTL
    client.expire(keys.worker(name), 2)
    fleet.still_loading(name)
    assert client.ttl(keys.worker(name)) > LOADING_TTL - 5
    bad = {
        "since-not-a-number": {"loading_since": "x"},
        "since-infinite": {"loading_since": "-inf"},
        "queues-not-json": {"loading_since": "1", "queues": "{bad"},
        "queues-not-a-list": {"loading_since": "1", "queues": '"q"'},
        "queues-not-names": {"loading_since": "1", "queues": "[[1]]"},
    }
    for tag, fields in bad.items():
        client.hset(keys.worker(f"{tag}@{name}"), mapping={"model": "tiny", **fields})
        client.zadd(keys.WORKERS, {f"{tag}@{name}": time.time() + 30})
    listed = fleet.loading_nodes()
    for tag in bad:
        fleet.gone(f"{tag}@{name}")
    assert name in listed and not any(f"{tag}@{name}" in listed for tag in bad)
