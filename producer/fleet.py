"""The fleet's state that is not a job record: which worker nodes are up (or failed), which are stopping, the
recovery lock, and how deep the queues are. Job records live in producer.status; every key in producer.keys.

Workers write it (worker.node, worker.heartbeat, worker.recovery, worker.startup); `svdq top` reads it.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from typing import Any

import redis

from producer import keys
from producer.contract import JobState
from producer.status import as_text

# How long `svdq top` keeps listing a worker whose model failed to load.
FAILED_TTL = 3600
# Index entries outlive their hash this long before they are trimmed: the hash is the truth, and hosts' clocks
# (which score the entries) may differ by this much from the reader's.
CLOCK_SLACK = 300


# How long a loading node is listed unless its main process says again that it is still loading.
LOADING_TTL = 30


@dataclass(frozen=True)
class Loading:
    model: str
    queues: tuple[str, ...]
    seconds: float  # loading for this long


def loading_of(info: dict[str, str], now: float) -> Loading | None:
    """A node's loading presence, or None: not loading, failed, or fields no worker wrote (anyone with access to
    Redis can write them, and a bad one must not stop `svdq top` or a wait)."""
    if "loading_since" not in info or "error" in info:
        return None
    try:
        since = float(info["loading_since"])
        queues = json.loads(info.get("queues") or "[]")
    except ValueError:  # json.JSONDecodeError is one
        return None
    if not math.isfinite(since) or not isinstance(queues, list) or not all(isinstance(q, str) for q in queues):
        return None
    return Loading(info.get("model", "?"), tuple(queues), max(0.0, now - since))


def _keep(pipe: redis.client.Pipeline, hostname: str, ttl: float) -> None:
    """The node's hash lives `ttl` seconds more, and the index that `nodes` reads says so."""
    pipe.expire(keys.worker(hostname), int(ttl))
    pipe.zadd(keys.WORKERS, {hostname: time.time() + ttl})


class FleetStore:
    def __init__(self, client: redis.Redis):
        self.redis = client

    def eviction_risk(self) -> str | None:
        """Why this Redis may drop svdq's keys by itself, or None. Capped (maxmemory) with any policy but
        noeviction, a full Redis evicts keys: a queued job's message, a record or a lease, i.e. lost jobs."""
        try:
            info = self.redis.info("memory")
        except redis.ResponseError:  # INFO refused (a managed service's ACL): nothing known, nothing said
            return None
        policy = as_text(info.get("maxmemory_policy", "noeviction"))
        if not int(info.get("maxmemory") or 0) or policy == "noeviction":
            return None
        return (
            f"Redis evicts keys when it is full (maxmemory-policy {policy}): a queued job, a record or a lease can "
            "vanish, and with it the job; set maxmemory-policy noeviction (README: When things fail)"
        )

    # -- presence: one hash per worker node, refreshed by its main process --------------------------------

    def present(self, hostname: str, info: dict[str, Any], ttl: int, *, device: str) -> None:
        """The node is up: `info` (model, pid) for `ttl` seconds unless refreshed. `device` is what the node was
        asked for ("auto", or its GPU's index): kept only until its worker process says what it loaded on."""
        pipe = self.redis.pipeline()
        pipe.hset(keys.worker(hostname), mapping=info)
        pipe.hsetnx(keys.worker(hostname), "device", device)
        _keep(pipe, hostname, ttl)
        pipe.execute()

    def loaded_on(self, hostname: str, device: str) -> None:
        """The node's model is loaded, on `device` ("cpu", "cuda:0 NVIDIA H100 ..."). Written before the node's
        first presence, maybe: the TTL keeps a node that dies before it from being listed for ever."""
        pipe = self.redis.pipeline()
        pipe.hset(keys.worker(hostname), "device", device)
        _keep(pipe, hostname, 120)  # the node's own refresh sets its TTL from then on
        pipe.execute()

    def loading(self, hostname: str, model: str, queues: list[str], owner: dict[str, Any] | None = None) -> None:
        """The node is loading its model, to read `queues` once loaded: it answers no ping until then (minutes on
        a GPU), so without this `svdq top` and a waiting job would say that no worker reads those queues. Kept
        LOADING_TTL seconds, renewed by `still_loading` while the load goes on: a node killed meanwhile drops
        out soon. `owner`: the node's pid and machine, which tell a later start of the name whether it is up."""
        key = keys.worker(hostname)
        pipe = self.redis.pipeline()
        # A previous run's error is not this run's. The device stays: this run's pool process, which started
        # loading before this was written, may already have said what it loaded on (FleetStore.loaded_on).
        pipe.hdel(key, "error", "failed_at")
        mapping = {"model": model, "queues": json.dumps(queues), "loading_since": str(time.time()), **(owner or {})}
        pipe.hset(key, mapping=mapping)
        _keep(pipe, hostname, LOADING_TTL)
        pipe.execute()

    def still_loading(self, hostname: str) -> None:
        pipe = self.redis.pipeline()
        _keep(pipe, hostname, LOADING_TTL)
        pipe.execute()

    def loading_nodes(self, nodes: dict[str, dict[str, str]] | None = None) -> dict[str, Loading]:
        """Nodes loading their model (of `nodes`, else of all the nodes now)."""
        now = time.time()
        found = ((name, loading_of(info, now)) for name, info in (self.nodes() if nodes is None else nodes).items())
        return {name: loading for name, loading in found if loading is not None}

    def failed(self, hostname: str, model: str, message: str) -> None:
        """The node's model could not load: listed with `message` for an hour, though it answers no ping."""
        key = keys.worker(hostname)
        pipe = self.redis.pipeline()
        pipe.delete(key)
        pipe.hset(key, mapping={"model": model, "error": message, "failed_at": str(int(time.time()))})
        _keep(pipe, hostname, FAILED_TTL)
        pipe.execute()

    def started(self, hostname: str) -> None:
        """A (re)started node: neither failed nor stopping, whatever its previous run left."""
        pipe = self.redis.pipeline()
        pipe.hdel(keys.worker(hostname), "error", "failed_at", "loading_since", "queues")
        pipe.delete(keys.stopping(hostname))
        pipe.execute()

    def gone(self, hostname: str) -> None:
        pipe = self.redis.pipeline()
        pipe.delete(keys.worker(hostname))
        pipe.zrem(keys.WORKERS, hostname)
        pipe.execute()

    def node(self, hostname: str) -> dict[str, str]:
        return {as_text(k): as_text(v) for k, v in self.redis.hgetall(keys.worker(hostname)).items()}

    def nodes(self) -> dict[str, dict[str, str]]:
        """Every node with a presence hash (up, or failed within the hour): two round trips, whatever else
        Redis holds."""
        pipe = self.redis.pipeline()
        pipe.zremrangebyscore(keys.WORKERS, "-inf", time.time() - CLOCK_SLACK)
        pipe.zrange(keys.WORKERS, 0, -1)
        names = [as_text(name) for name in pipe.execute()[1]]
        pipe = self.redis.pipeline()
        for name in names:
            pipe.hgetall(keys.worker(name))
        return {
            name: {as_text(k): as_text(v) for k, v in info.items()}
            for name, info in zip(names, pipe.execute(), strict=True)
            if info  # its hash expired: gone, until the index entry is trimmed
        }

    # -- a warm shutdown's deadline, read by the node's running job ----------------------------------------

    def stopping(self, hostname: str, deadline: float, grace: float) -> None:
        self.redis.set(keys.stopping(hostname), str(deadline), ex=int(grace) + 3600)

    def stop_deadline(self, hostname: str) -> float | None:
        raw = self.redis.get(keys.stopping(hostname))
        return None if raw is None else float(raw)

    # -- recovery ------------------------------------------------------------------------------------------

    def lock_recovery(self, job_id: str, seconds: float) -> bool:
        """One sweeper per abandoned job at a time, across hosts; the lock outlives a sweep, not the job."""
        return bool(self.redis.set(keys.recovering(job_id), "1", nx=True, ex=max(1, int(seconds))))

    def take_sweep_turn(self, lease_ttl: float, seconds: float) -> bool:
        """Whether the asking sweeper sweeps now: one sweep every `seconds` across the fleet. Each sweep reads
        every running job's lease, so W workers each sweeping read W x W leases a round."""
        return bool(self.redis.set(keys.sweep_turn(lease_ttl), "1", nx=True, px=max(1, int(seconds * 1000))))

    def give_back_sweep_turn(self, lease_ttl: float) -> None:
        self.redis.delete(keys.sweep_turn(lease_ttl))

    # -- queues --------------------------------------------------------------------------------------------

    def queues_of_waiting_jobs(self, limit: int = 200) -> set[str]:
        """The queues the newest waiting jobs were sent to."""
        pipe = self.redis.pipeline(transaction=False)
        for job_id in self.redis.zrevrange(keys.state_index(JobState.QUEUED.value), 0, limit - 1):
            pipe.hget(keys.job(as_text(job_id)), "queue")
        return {name for queue in pipe.execute() if queue and (name := json.loads(queue))}

    def depths(self, queues: list[str]) -> list[int]:
        """Messages waiting in each queue (kombu keeps a queue in a Redis list of the same name)."""
        pipe = self.redis.pipeline(transaction=False)
        for name in queues:
            pipe.llen(name)
        return [int(depth) for depth in pipe.execute()]

    def counts(self) -> dict[str, int]:
        """Jobs per state, from the state indexes."""
        pipe = self.redis.pipeline(transaction=False)
        for state in JobState:
            pipe.zcard(keys.state_index(state.value))
        return {state.value: int(n) for state, n in zip(JobState, pipe.execute(), strict=True)}
