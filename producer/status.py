"""Job records in Redis. Every change of state goes through `transition`, checked atomically in Lua.

A record is one hash: `state` is stored raw so the Lua check can compare it, every other field is
JSON so numbers, nulls and nested objects come back as they went in. The same script that writes a
change keeps the per-state indexes (for listing) and publishes the event (pub/sub per job, plus one
capped stream of all events), so none of them can disagree with the record.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import redis
from pydantic import ValidationError

from producer import keys
from producer.contract import JobRecord, JobState, shown, sources_of

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]

# KEYS: the job hash, its event channel, the event stream, its lease.
# ARGV[1]: control JSON {new, sources ("-" = no record), ttl, incr, handback, now, id, event, maxlen,
#          index_prefix, idem_key, fence, unleased, leased_by, holder, lease_ms, max_attempts, push, due, due_key};
#          ARGV[2]: a message LPUSHed onto the list `push` when the transition applies (a creation and its Celery
#          message land together or not at all); ARGV[3..]: field, value pairs. `due` (epoch seconds, 0: none) enters
#          the job in the retry schedule `due_key`, with the requeue that waits for it.
# Returns {1, new, attempts} when applied; {0, current state} when the table refuses it; {2, job id} for a
# creation under an idempotency key already taken; {3, holder} when the job is leased by a live worker (or, with
# `leased_by`, not by that holder: '' for nobody);
# {4, attempts, counted} for a claim of an abandoned job that has used all its attempts (handed-back executions
# do not count: `handbacks`, incremented by a transition with `handback`); {5, attempts} when the
# fence (the attempt number that may move a started job on) no longer matches.
_TRANSITION_LUA = """
local ctl = cjson.decode(ARGV[1])
if ctl.idem_key ~= '' then
  local holder = redis.call('GET', ctl.idem_key)
  if holder then return {2, holder} end
end
local cur = redis.call('HGET', KEYS[1], 'state') or '-'
local allowed = false
for s in string.gmatch(ctl.sources, '%S+') do
  if s == cur then allowed = true end
end
if not allowed then return {0, cur} end
local attempts = tonumber(redis.call('HGET', KEYS[1], 'attempts') or '0') or 0
if cur == 'started' then
  if ctl.fence >= 0 and attempts ~= ctl.fence then return {5, attempts} end
  if ctl.unleased then
    local holder = redis.call('GET', KEYS[4])
    if holder then return {3, holder} end
    local counted = attempts - (tonumber(redis.call('HGET', KEYS[1], 'handbacks') or '0') or 0)
    if ctl.new == 'started' and ctl.max_attempts > 0 and counted >= ctl.max_attempts then
      return {4, attempts, counted}
    end
  end
  if ctl.leased_by ~= '' then
    local holder = redis.call('GET', KEYS[4]) or ''
    if holder ~= ctl.leased_by then return {3, holder} end
  end
end
-- First of the writes: a script that fails midway keeps what it wrote, and this one can fail (a wrong type).
if ctl.push ~= '' then redis.call('LPUSH', ctl.push, ARGV[2]) end
if ctl.due > 0 then redis.call('ZADD', ctl.due_key, ctl.due, ctl.id) end
redis.call('HSET', KEYS[1], 'state', ctl.new, unpack(ARGV, 3))
if ctl.incr ~= '' then attempts = redis.call('HINCRBY', KEYS[1], ctl.incr, 1) end
if ctl.handback then redis.call('HINCRBY', KEYS[1], 'handbacks', 1) end
if ctl.new == 'started' then
  redis.call('SET', KEYS[4], ctl.holder, 'PX', ctl.lease_ms)
else
  redis.call('DEL', KEYS[4])
end
-- An idempotency key lives as long as its job: no TTL until the job ends (a 1M-row bulk run drains for weeks,
-- and a key that lapsed while its job waited let a re-run submit it again).
if ctl.idem_key ~= '' then redis.call('SET', ctl.idem_key, ctl.id) end
if cur ~= '-' then redis.call('ZREM', ctl.index_prefix .. cur, ctl.id) end
redis.call('ZADD', ctl.index_prefix .. ctl.new, ctl.now, ctl.id)
if ctl.ttl > 0 then
  -- Terminal: the record, its idempotency key and its index entries all go after `ttl`.
  redis.call('EXPIRE', KEYS[1], ctl.ttl)
  local idem = redis.call('HGET', KEYS[1], 'idempotency_key')
  if idem and idem ~= 'null' then
    redis.call('EXPIRE', ctl.idem_prefix .. cjson.decode(idem), ctl.ttl)
  end
  redis.call('ZREMRANGEBYSCORE', ctl.index_prefix .. ctl.new, '-inf', ctl.now - ctl.ttl)
end
redis.call('PUBLISH', KEYS[2], ctl.event)
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ctl.maxlen, '*', 'event', ctl.event)
return {1, ctl.new, attempts}
"""

# KEYS: the job hash, its event channel, the event stream. ARGV[1]: control JSON {state, fence, event,
# maxlen}; ARGV[2..]: field, value pairs. Written only while the job is still in `state` (and, with a fence,
# still in that attempt), so a late update never touches a record that was canceled, finished or taken
# over meanwhile. Returns 1 if written.
_UPDATE_LUA = """
local ctl = cjson.decode(ARGV[1])
if redis.call('HGET', KEYS[1], 'state') ~= ctl.state then return 0 end
if ctl.fence >= 0 and tonumber(redis.call('HGET', KEYS[1], 'attempts') or '0') ~= ctl.fence then return 0 end
for i = 2, #ARGV, 2 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
end
redis.call('PUBLISH', KEYS[2], ctl.event)
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ctl.maxlen, '*', 'event', ctl.event)
return 1
"""

# KEYS: a lease. ARGV: holder, milliseconds. Extends the lease only if `holder` still holds it.
_RENEW_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""

# KEYS: the retry schedule, the job hash, its queue. ARGV: job id, now (epoch seconds), its message. Once per
# due job, whoever asks: its message goes onto its queue if it is still `queued` (a cancel meanwhile: not),
# then it leaves the schedule. The push first: a script that fails midway (a refused LPUSH) keeps what it wrote.
_RELEASE_LUA = """
local due = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not due or tonumber(due) > tonumber(ARGV[2]) then return 0 end
local sent = 0
if redis.call('HGET', KEYS[2], 'state') == 'queued' then
  -- Queued after all (the caller saw it otherwise, moments ago): it stays for a caller with its message.
  if ARGV[3] == '' then return 0 end
  redis.call('LPUSH', KEYS[3], ARGV[3])
  sent = 1
end
redis.call('ZREM', KEYS[1], ARGV[1])
return sent
"""

# Fields that travel in events, besides id, state and time.
_EVENT_FIELDS = ("stage", "progress", "step", "total_steps", "error", "result")


def utcnow() -> datetime:
    return datetime.now(UTC)


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class JobNotFound(LookupError):
    def __init__(self, job_id: str):
        self.job_id = job_id
        super().__init__(f"no job {job_id!r} (unknown id, or its record expired)")


class MalformedRecord(ValueError):
    """A record that does not read as a JobRecord (written by hand, or by a bug): reported, never fatal."""

    def __init__(self, job_id: str, detail: str):
        self.job_id = job_id
        super().__init__(f"the record of job {shown(job_id)} is malformed ({detail}); delete it or fix it by hand")


class InvalidTransition(RuntimeError):
    def __init__(self, job_id: str, current: JobState | None, new: JobState):
        self.job_id = job_id
        self.current = current
        self.new = new
        now = current.value if current else "absent"
        super().__init__(f"job {job_id}: cannot go from {now} to {new.value}")


class Leased(InvalidTransition):
    """The job is `started` and its lease is held: a live worker runs it (`holder` names which)."""

    def __init__(self, job_id: str, new: JobState, holder: str):
        super().__init__(job_id, JobState.STARTED, new)
        self.holder = holder
        self.args = (f"job {job_id} is running on {holder}",)


class Superseded(InvalidTransition):
    """The attempt moving the job on is no longer its current one: its lease expired and it was taken over."""

    def __init__(self, job_id: str, new: JobState, attempts: int):
        super().__init__(job_id, JobState.STARTED, new)
        self.attempts = attempts
        self.args = (f"job {job_id} has moved on to attempt {attempts}",)


class AttemptsExhausted(InvalidTransition):
    """A claim of an abandoned job (its worker died) that has already used every attempt it had."""

    def __init__(self, job_id: str, attempts: int, counted: int):
        super().__init__(job_id, JobState.STARTED, JobState.STARTED)
        self.attempts = attempts  # every execution: the fence of the next write
        self.args = (f"job {job_id}: its worker was lost, and it has used its {counted} attempts",)


class DuplicateKey(Exception):
    """A creation whose idempotency key already names a job: `job_id` is that job."""

    def __init__(self, job_id: str):
        self.job_id = job_id
        super().__init__(f"idempotency key already used by job {job_id}")


# json.dumps with any option builds a new encoder per call: a record's fields are many small values.
_compact = json.JSONEncoder(separators=(",", ":")).encode


def _encode(fields: dict[str, Any]) -> list[str]:
    flat: list[str] = []
    for name, value in fields.items():
        flat += [name, _compact(value)]
    return flat


def as_text(value: Any) -> str:
    """A Redis reply (bytes, or str with decode_responses) as str."""
    return value.decode() if isinstance(value, bytes) else str(value)


class Records:
    """What a change to a record sends to Redis and what its answer means, without the I/O: shared by
    StatusStore (redis-py) and producer.aio's AsyncStatusStore (redis.asyncio), so both obey one table."""

    def __init__(self, *, result_ttl: int, clock: Clock = utcnow):
        self.result_ttl = result_ttl
        self.clock = clock

    def now(self) -> str:
        return iso(self.clock())

    def _event(self, job_id: str, state: str, fields: dict[str, Any]) -> str:
        event = {"id": job_id, "state": state, "at": self.now()}
        event.update((name, fields[name]) for name in _EVENT_FIELDS if name in fields)
        return _compact(event)

    def creation(
        self,
        job_id: str,
        request: dict[str, Any],
        *,
        priority: str = "normal",
        webhook: str | None = None,
        queue: str | None = None,
        owner: str | None = None,
    ) -> dict[str, Any]:
        """A new record's fields."""
        fields = {
            "id": job_id,
            "created_at": self.now(),
            "request": request,
            "progress": 0.0,
            "attempts": 0,
            "priority": priority,
            "webhook": webhook,
            "queue": queue,
        }
        if owner is not None:
            fields["owner"] = owner
        return fields

    def plan_transition(
        self,
        job_id: str,
        new: JobState,
        *,
        count_attempt: bool = False,
        handback: bool = False,
        idempotency_key: str | None = None,
        fence: int | None = None,
        unleased: bool = False,
        leased_by: str | None = None,
        lease: tuple[str, float] | None = None,
        max_attempts: int = 0,
        only_new: bool = False,
        push: tuple[str, str] | None = None,
        due: float | None = None,
        **fields: Any,
    ) -> tuple[list[str], list[str]]:
        """The transition script's keys and arguments (see StatusStore.transition)."""
        if new.is_terminal():
            fields.setdefault("finished_at", self.now())
        if idempotency_key:
            fields["idempotency_key"] = idempotency_key
        sources = " ".join(s.value if s else "-" for s in sources_of(new))
        control = {
            "new": new.value,
            "sources": "-" if only_new else JobState.STARTED.value if leased_by else sources,
            "ttl": self.result_ttl if new.is_terminal() else 0,
            "incr": "attempts" if count_attempt else "",
            "handback": handback,
            "now": self.clock().timestamp(),
            "id": job_id,
            "event": self._event(job_id, new.value, fields),
            "maxlen": keys.EVENTS_STREAM_LENGTH,
            "index_prefix": keys.STATE_INDEX_PREFIX,
            "idem_key": keys.idempotency(idempotency_key) if idempotency_key else "",
            "idem_prefix": keys.IDEMPOTENCY_PREFIX,
            "fence": -1 if fence is None else fence,
            "unleased": unleased or new is JobState.STARTED,  # one live worker per job
            "leased_by": leased_by or "",
            "holder": lease[0] if lease else "",
            "lease_ms": int(lease[1] * 1000) if lease else 0,
            "max_attempts": max_attempts,
            "push": push[0] if push else "",
            "due": due or 0,
            "due_key": keys.RETRY_DUE,
        }
        if new is JobState.STARTED and lease is None:
            raise ValueError("entering started needs a lease")
        return (
            [keys.job(job_id), keys.events(job_id), keys.EVENTS_STREAM, keys.lease(job_id)],
            [json.dumps(control), push[1] if push else "", *_encode(fields)],
        )

    @staticmethod
    def transition_outcome(job_id: str, new: JobState, answer: list[Any]) -> int:
        """`attempts` after an applied transition; the exception that says why it was not applied."""
        outcome, value, *rest = answer
        if outcome == 1:
            return int(rest[0])
        if outcome == 2:
            raise DuplicateKey(as_text(value))
        if outcome == 3:
            raise Leased(job_id, new, as_text(value))
        if outcome == 4:
            raise AttemptsExhausted(job_id, int(value), int(rest[0]))
        if outcome == 5:
            raise Superseded(job_id, new, int(value))
        cur = as_text(value)
        raise InvalidTransition(job_id, None if cur == "-" else JobState(cur), new)


class StatusStore(Records):
    def __init__(self, client: redis.Redis, *, result_ttl: int, clock: Clock = utcnow):
        super().__init__(result_ttl=result_ttl, clock=clock)
        self.redis = client
        self._transition = client.register_script(_TRANSITION_LUA)
        self._update = client.register_script(_UPDATE_LUA)
        self._renew = client.register_script(_RENEW_LUA)
        self._release = client.register_script(_RELEASE_LUA)

    def create(
        self,
        job_id: str,
        request: dict[str, Any],
        *,
        idempotency_key: str | None = None,
        priority: str = "normal",
        webhook: str | None = None,
        queue: str | None = None,
        push: tuple[str, str] | None = None,
    ) -> bool:
        """Write a `queued` record; False (and nothing written) if the job already has one.

        With `idempotency_key`, raises DuplicateKey naming the job that already holds the key. `push`: the
        (queue, message) enqueued in the same script, only if the record is written.
        """
        fields = self.creation(job_id, request, priority=priority, webhook=webhook, queue=queue)
        try:
            self.transition(
                job_id, JobState.QUEUED, idempotency_key=idempotency_key, only_new=True, push=push, **fields
            )
        except InvalidTransition:
            return False
        return True

    def create_many(
        self, creations: list[dict[str, Any]]
    ) -> list[InvalidTransition | DuplicateKey | redis.ResponseError | None]:
        """`create` for each of `creations` (its keyword arguments, with `job_id` and `request`, and `push`: the
        (queue, message) enqueued in the same script), in one round trip; for each, None when written, else why
        not (DuplicateKey naming the job holding its key, or Redis's error)."""
        pipe = self.redis.pipeline(transaction=False)
        for c in creations:
            fields = self.creation(
                c["job_id"],
                c["request"],
                priority=c.get("priority", "normal"),
                webhook=c.get("webhook"),
                queue=c.get("queue"),
            )
            script_keys, args = self.plan_transition(
                c["job_id"],
                JobState.QUEUED,
                only_new=True,
                idempotency_key=c.get("idempotency_key"),
                push=c.get("push"),
                **fields,
            )
            self._transition(keys=script_keys, args=args, client=pipe)
        outcomes: list[InvalidTransition | DuplicateKey | redis.ResponseError | None] = []
        for c, answer in zip(creations, pipe.execute(raise_on_error=False), strict=True):
            if isinstance(answer, redis.ResponseError):  # that job wrote nothing (see the script); the rest stand
                outcomes.append(answer)
                continue
            try:
                self.transition_outcome(c["job_id"], JobState.QUEUED, answer)
                outcomes.append(None)
            except DuplicateKey as exc:  # naming the job itself: a retried pipeline whose first reply was lost
                outcomes.append(None if exc.job_id == c["job_id"] else exc)
            except InvalidTransition as exc:  # already queued under its fresh id: the same retry, without a key
                outcomes.append(None if exc.current is JobState.QUEUED else exc)
        return outcomes

    def transition(self, job_id: str, new: JobState, **options: Any) -> int:
        """Move a job to `new` if the transition table allows it, writing the other keyword arguments as
        fields with it; returns `attempts`.

        Leaving `started` (or re-entering it) has two more conditions. `fence`: the record's `attempts`
        must still be this number, so a worker that lost its lease cannot finish over the attempt that took
        the job over. `unleased`: nobody may hold the job's lease (for recovering a dead worker's job).
        `leased_by`: the job must be `started` under this holder's lease (for a killed process's jobs).
        Entering `started` sets the lease to `lease` (holder, seconds); leaving it deletes the lease.
        `only_new`: applies only if the job has no record yet (creation). `push`: (list, message) to LPUSH
        when the transition applies, in the same script. `count_attempt`, `max_attempts` and
        `idempotency_key`: see `claim` and `create`. `handback`: this execution ends handed back by a stopping
        worker, and does not count against `max_attempts`. `due`: the epoch second a requeued job's retry is
        due; a worker's sweeper sends its message then (`release`).
        """
        script_keys, args = self.plan_transition(job_id, new, **options)
        return self.transition_outcome(job_id, new, self._transition(keys=script_keys, args=args))

    def claim(self, job_id: str, holder: str, lease_seconds: float, max_attempts: int = 0, **fields: Any) -> int:
        """Start a queued job, or take over a started one whose worker died; returns the attempt number.

        Raises Leased when a live worker runs it, AttemptsExhausted when a dead worker's job has used
        `max_attempts` (0: no cap), InvalidTransition when it was canceled, finished or never created.
        """
        return self.transition(
            job_id,
            JobState.STARTED,
            count_attempt=True,
            lease=(holder, lease_seconds),
            max_attempts=max_attempts,
            **fields,
        )

    def server_time(self) -> float:
        """Redis's clock, in epoch seconds: the retry schedule's, so that no worker's clock moves a retry."""
        seconds, micros = self.redis.time()
        return seconds + micros / 1e6

    def due(self, now: float, limit: int = 200) -> list[str]:
        """Jobs whose retry is due at `now` (server_time; the longest due first)."""
        return [as_text(m) for m in self.redis.zrangebyscore(keys.RETRY_DUE, "-inf", now, start=0, num=limit)]

    def release(self, job_id: str, queue: str, message: str, now: float) -> bool:
        """Send a due job's message onto `queue` and take it off the schedule, at most once across workers.
        With no message (the caller found it no longer queued): only taken off, if it is indeed not queued."""
        return bool(self._release(keys=[keys.RETRY_DUE, keys.job(job_id), queue], args=[job_id, now, message]))

    def renew(self, job_id: str, holder: str, lease_seconds: float) -> bool:
        """Extend the job's lease if `holder` still holds it; False when it was lost or released."""
        return bool(self._renew(keys=[keys.lease(job_id)], args=[holder, int(lease_seconds * 1000)]))

    def unindex(self, job_id: str, state: JobState) -> None:
        """Drop a job whose record is gone from a state's index (transitions keep it right while the record is
        there): every recovery sweep on every worker would otherwise look at it again, for ever."""
        self.redis.zrem(keys.state_index(state.value), job_id)

    def holder(self, job_id: str) -> str | None:
        """Who holds the job's lease now, if anyone."""
        raw = self.redis.get(keys.lease(job_id))
        return None if raw is None else as_text(raw)

    def abandoned(self, older_than: float) -> list[str]:
        """Jobs `started` over `older_than` seconds ago whose lease has lapsed: their worker died."""
        ceiling = self.clock().timestamp() - older_than
        ids = [as_text(m) for m in self.redis.zrangebyscore(keys.state_index(JobState.STARTED.value), "-inf", ceiling)]
        if not ids:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for job_id in ids:
            pipe.exists(keys.lease(job_id))
        return [job_id for job_id, leased in zip(ids, pipe.execute(), strict=True) if not leased]

    def held_by(self, holder: str) -> list[str]:
        """The `started` jobs whose lease `holder` holds now."""
        ids = [as_text(m) for m in self.redis.zrange(keys.state_index(JobState.STARTED.value), 0, -1)]
        pipe = self.redis.pipeline(transaction=False)
        for job_id in ids:
            pipe.get(keys.lease(job_id))
        return [job_id for job_id, raw in zip(ids, pipe.execute(), strict=True) if raw and as_text(raw) == holder]

    def update(
        self, job_id: str, *, only_in: JobState = JobState.STARTED, fence: int | None = None, **fields: Any
    ) -> bool:
        """Write progress fields while the job is in `only_in` (and attempt `fence`); False if it moved on."""
        control = {
            "state": only_in.value,
            "fence": -1 if fence is None else fence,
            "event": self._event(job_id, only_in.value, fields),
            "maxlen": keys.EVENTS_STREAM_LENGTH,
        }
        written = self._update(
            keys=[keys.job(job_id), keys.events(job_id), keys.EVENTS_STREAM],
            args=[json.dumps(control), *_encode(fields)],
        )
        return bool(written)

    def state(self, job_id: str) -> JobState | None:
        """The job's state alone (one HGET), None if it has no record."""
        raw = self.redis.hget(keys.job(job_id), "state")
        return None if raw is None else JobState(as_text(raw))

    def states(self, job_ids: list[str]) -> dict[str, JobState | None]:
        """Many jobs' states alone, in one round trip; None for a job with no record or an unknown state."""
        pipe = self.redis.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hget(keys.job(job_id), "state")
        found: dict[str, JobState | None] = {}
        for job_id, raw in zip(job_ids, pipe.execute(), strict=True):
            try:
                found[job_id] = None if raw is None else JobState(as_text(raw))
            except ValueError:  # a malformed record: get_many reports it
                found[job_id] = None
        return found

    def get(self, job_id: str) -> JobRecord:
        raw = self.redis.hgetall(keys.job(job_id))
        if not raw:
            raise JobNotFound(job_id)
        return parse_record(job_id, raw)

    def get_many(self, job_ids: list[str]) -> dict[str, JobRecord | None]:
        """Many records in one round trip; None for a job with no record (expired) or one that does not parse."""
        pipe = self.redis.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hgetall(keys.job(job_id))
        found: dict[str, JobRecord | None] = {}
        for job_id, raw in zip(job_ids, pipe.execute(), strict=True):
            try:
                found[job_id] = parse_record(job_id, raw) if raw else None
            except MalformedRecord as exc:
                log.warning("%s", exc)
                found[job_id] = None
        return found

    def list(self, state: JobState | None = None, limit: int = 20) -> list[JobRecord]:
        """The most recent jobs, newest first, from the per-state indexes (no key scan)."""
        states = [state] if state else list(JobState)
        scored: list[tuple[float, str]] = []
        for s in states:
            for member, score in self.redis.zrevrange(keys.state_index(s.value), 0, limit - 1, withscores=True):
                scored.append((score, as_text(member)))
        scored.sort(reverse=True)
        pipe = self.redis.pipeline(transaction=False)
        ids = [job_id for _, job_id in scored[:limit]]
        for job_id in ids:
            pipe.hgetall(keys.job(job_id))
        records = []
        for job_id, raw in zip(ids, pipe.execute(), strict=True):
            if not raw:  # expired meanwhile
                continue
            try:
                records.append(parse_record(job_id, raw))
            except MalformedRecord as exc:  # one bad record must not hide everyone's jobs
                log.warning("listing skips %s", exc)
        return records


def parse_record(job_id: str, raw: dict[Any, Any]) -> JobRecord:
    """A record from its Redis hash (HGETALL); MalformedRecord when it does not parse."""
    data: dict[str, Any] = {}
    try:
        for name, value in raw.items():
            name, value = as_text(name), as_text(value)
            data[name] = value if name == "state" else json.loads(value)
        return JobRecord.model_validate(data)
    except (ValueError, ValidationError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise MalformedRecord(job_id, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}") from None
