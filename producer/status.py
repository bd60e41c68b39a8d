"""Job records in Redis. Every change of state goes through `transition`, checked atomically in Lua.

A record is one hash: `state` is stored raw so the Lua check can compare it, every other field is
JSON so numbers, nulls and nested objects come back as they went in. The same script that writes a
change keeps the per-state indexes (for listing) and publishes the event (pub/sub per job, plus one
capped stream of all events), so none of them can disagree with the record.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import redis

from producer import keys
from producer.contract import JobRecord, JobState, sources_of

Clock = Callable[[], datetime]

# KEYS: the job hash, its event channel, the event stream.
# ARGV[1]: control JSON {new, sources ("-" = no record), ttl, incr, now, id, event, maxlen, index_prefix,
#          idem_key, idem_ttl}; ARGV[2..]: field, value pairs.
# Returns {1, new} when applied, {0, current state} when the table refuses it, and for a creation under
# an idempotency key already taken, {2, the job id holding it}.
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
redis.call('HSET', KEYS[1], 'state', ctl.new)
for i = 2, #ARGV, 2 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
end
if ctl.incr ~= '' then redis.call('HINCRBY', KEYS[1], ctl.incr, 1) end
if ctl.idem_key ~= '' then redis.call('SET', ctl.idem_key, ctl.id, 'EX', ctl.idem_ttl) end
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
return {1, ctl.new}
"""

# KEYS: the job hash, its event channel, the event stream. ARGV[1]: control JSON {state, event, maxlen};
# ARGV[2..]: field, value pairs. Written only while the job is still in `state`, so a late update can
# never touch a record that was canceled or finished meanwhile. Returns 1 if written.
_UPDATE_LUA = """
local ctl = cjson.decode(ARGV[1])
if redis.call('HGET', KEYS[1], 'state') ~= ctl.state then return 0 end
for i = 2, #ARGV, 2 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
end
redis.call('PUBLISH', KEYS[2], ctl.event)
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ctl.maxlen, '*', 'event', ctl.event)
return 1
"""

# Fields that travel in events, besides id, state and time.
_EVENT_FIELDS = ("stage", "progress", "step", "total_steps", "error", "result")


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def iso(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class JobNotFound(LookupError):
    def __init__(self, job_id: str):
        self.job_id = job_id
        super().__init__(f"no job {job_id!r} (unknown id, or its record expired)")


class InvalidTransition(RuntimeError):
    def __init__(self, job_id: str, current: JobState | None, new: JobState):
        self.job_id = job_id
        self.current = current
        self.new = new
        now = current.value if current else "absent"
        super().__init__(f"job {job_id}: cannot go from {now} to {new.value}")


class DuplicateKey(Exception):
    """A creation whose idempotency key already names a job: `job_id` is that job."""

    def __init__(self, job_id: str):
        self.job_id = job_id
        super().__init__(f"idempotency key already used by job {job_id}")


def _encode(fields: dict[str, Any]) -> list[str]:
    flat: list[str] = []
    for name, value in fields.items():
        flat += [name, json.dumps(value, separators=(",", ":"))]
    return flat


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class StatusStore:
    def __init__(self, client: redis.Redis, *, result_ttl: int, clock: Clock = utcnow):
        self.redis = client
        self.result_ttl = result_ttl
        self.clock = clock
        self._transition = client.register_script(_TRANSITION_LUA)
        self._update = client.register_script(_UPDATE_LUA)

    def now(self) -> str:
        return iso(self.clock())

    def _event(self, job_id: str, state: str, fields: dict[str, Any]) -> str:
        event = {"id": job_id, "state": state, "at": self.now()}
        event.update((name, fields[name]) for name in _EVENT_FIELDS if name in fields)
        return json.dumps(event, separators=(",", ":"))

    def create(
        self,
        job_id: str,
        request: dict[str, Any],
        *,
        idempotency_key: str | None = None,
        priority: str = "normal",
        webhook: str | None = None,
    ) -> bool:
        """Write a `queued` record; False (and nothing written) if the job already has one.

        With `idempotency_key`, raises DuplicateKey naming the job that already holds the key.
        """
        fields = {"id": job_id, "created_at": self.now(), "request": request, "progress": 0.0, "attempts": 0,
                  "priority": priority, "webhook": webhook}  # fmt: skip
        try:
            self.transition(job_id, JobState.QUEUED, idempotency_key=idempotency_key, **fields)
        except InvalidTransition:
            return False
        return True

    def transition(
        self,
        job_id: str,
        new: JobState,
        *,
        count_attempt: bool = False,
        idempotency_key: str | None = None,
        **fields: Any,
    ) -> JobState:
        """Move a job to `new` if the transition table allows it, writing `fields` with it."""
        if new.is_terminal():
            fields.setdefault("finished_at", self.now())
        if idempotency_key:
            fields["idempotency_key"] = idempotency_key
        control = {
            "new": new.value,
            "sources": " ".join(s.value if s else "-" for s in sources_of(new)),
            "ttl": self.result_ttl if new.is_terminal() else 0,
            "incr": "attempts" if count_attempt else "",
            "now": self.clock().timestamp(),
            "id": job_id,
            "event": self._event(job_id, new.value, fields),
            "maxlen": keys.EVENTS_STREAM_LENGTH,
            "index_prefix": keys.STATE_INDEX_PREFIX,
            "idem_key": keys.idempotency(idempotency_key) if idempotency_key else "",
            "idem_ttl": self.result_ttl,
            "idem_prefix": keys.IDEMPOTENCY_PREFIX,
        }
        applied, current = self._transition(
            keys=[keys.job(job_id), keys.events(job_id), keys.EVENTS_STREAM],
            args=[json.dumps(control), *_encode(fields)],
        )
        if applied == 2:
            raise DuplicateKey(_text(current))
        if not applied:
            cur = _text(current)
            raise InvalidTransition(job_id, None if cur == "-" else JobState(cur), new)
        return new

    def update(self, job_id: str, *, only_in: JobState = JobState.STARTED, **fields: Any) -> bool:
        """Write progress fields while the job is in `only_in`; False if it has moved on."""
        control = {"state": only_in.value, "event": self._event(job_id, only_in.value, fields),
                   "maxlen": keys.EVENTS_STREAM_LENGTH}  # fmt: skip
        written = self._update(
            keys=[keys.job(job_id), keys.events(job_id), keys.EVENTS_STREAM],
            args=[json.dumps(control), *_encode(fields)],
        )
        return bool(written)

    def state(self, job_id: str) -> JobState | None:
        """The job's state alone (one HGET), None if it has no record."""
        raw = self.redis.hget(keys.job(job_id), "state")
        return None if raw is None else JobState(_text(raw))

    def get(self, job_id: str) -> JobRecord:
        raw = self.redis.hgetall(keys.job(job_id))
        if not raw:
            raise JobNotFound(job_id)
        return _record(raw)

    def list(self, state: JobState | None = None, limit: int = 20) -> list[JobRecord]:
        """The most recent jobs, newest first, from the per-state indexes (no key scan)."""
        states = [state] if state else list(JobState)
        scored: list[tuple[float, str]] = []
        for s in states:
            for member, score in self.redis.zrevrange(keys.state_index(s.value), 0, limit - 1, withscores=True):
                scored.append((score, _text(member)))
        scored.sort(reverse=True)
        pipe = self.redis.pipeline(transaction=False)
        for _, job_id in scored[:limit]:
            pipe.hgetall(keys.job(job_id))
        return [_record(raw) for raw in pipe.execute() if raw]  # an expired record is simply skipped


def _record(raw: dict[Any, Any]) -> JobRecord:
    data: dict[str, Any] = {}
    for name, value in raw.items():
        name, value = _text(name), _text(value)
        data[name] = value if name == "state" else json.loads(value)
    return JobRecord.model_validate(data)
