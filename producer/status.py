"""Job records in Redis. Every change of state goes through `transition`, checked atomically in Lua.

A record is one hash: `state` is stored raw so the Lua check can compare it, every other field is
JSON so numbers, nulls and nested objects come back as they went in.
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

# KEYS[1]: the job hash.
# ARGV[1]: new state; ARGV[2]: space-separated states it may follow ("-" means no record yet);
# ARGV[3]: TTL in seconds, 0 to leave it; ARGV[4]: field to increment by one, or "";
# ARGV[5..]: field, value pairs to write with the state.
# Returns {1, new} when applied, {0, current} when the table refuses it.
_TRANSITION_LUA = """
local cur = redis.call('HGET', KEYS[1], 'state') or '-'
local allowed = false
for s in string.gmatch(ARGV[2], '%S+') do
  if s == cur then allowed = true end
end
if not allowed then return {0, cur} end
redis.call('HSET', KEYS[1], 'state', ARGV[1])
for i = 5, #ARGV, 2 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
end
if ARGV[4] ~= '' then redis.call('HINCRBY', KEYS[1], ARGV[4], 1) end
if tonumber(ARGV[3]) > 0 then redis.call('EXPIRE', KEYS[1], ARGV[3]) end
return {1, ARGV[1]}
"""

# KEYS[1]: the job hash; ARGV[1]: the state the job must be in; ARGV[2..]: field, value pairs.
# Progress is written only while the job is still in that state, so a late update can never
# touch a record that was canceled or finished meanwhile.
_UPDATE_LUA = """
if redis.call('HGET', KEYS[1], 'state') ~= ARGV[1] then return 0 end
for i = 2, #ARGV, 2 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
end
return 1
"""


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


def _encode(fields: dict[str, Any]) -> list[str]:
    flat: list[str] = []
    for name, value in fields.items():
        flat += [name, json.dumps(value, separators=(",", ":"))]
    return flat


class StatusStore:
    def __init__(self, client: redis.Redis, *, result_ttl: int, clock: Clock = utcnow):
        self.redis = client
        self.result_ttl = result_ttl
        self.clock = clock
        self._transition = client.register_script(_TRANSITION_LUA)
        self._update = client.register_script(_UPDATE_LUA)

    def now(self) -> str:
        return iso(self.clock())

    def create(self, job_id: str, request: dict[str, Any]) -> bool:
        """Write a `queued` record; False (and nothing written) if the job already has one."""
        fields = {"id": job_id, "created_at": self.now(), "request": request, "progress": 0.0, "attempts": 0}
        try:
            self.transition(job_id, JobState.QUEUED, **fields)
        except InvalidTransition:
            return False
        return True

    def transition(self, job_id: str, new: JobState, *, count_attempt: bool = False, **fields: Any) -> JobState:
        """Move a job to `new` if the transition table allows it, writing `fields` with it."""
        sources = " ".join(s.value if s else "-" for s in sources_of(new))
        ttl = self.result_ttl if new.is_terminal() else 0
        if new.is_terminal():
            fields.setdefault("finished_at", self.now())
        args = [new.value, sources, ttl, "attempts" if count_attempt else "", *_encode(fields)]
        applied, current = self._transition(keys=[keys.job(job_id)], args=args)
        if not applied:
            cur = current.decode() if isinstance(current, bytes) else current
            raise InvalidTransition(job_id, None if cur == "-" else JobState(cur), new)
        return new

    def update(self, job_id: str, *, only_in: JobState = JobState.STARTED, **fields: Any) -> bool:
        """Write progress fields while the job is in `only_in`; False if it has moved on."""
        return bool(self._update(keys=[keys.job(job_id)], args=[only_in.value, *_encode(fields)]))

    def get(self, job_id: str) -> JobRecord:
        raw = self.redis.hgetall(keys.job(job_id))
        if not raw:
            raise JobNotFound(job_id)
        data: dict[str, Any] = {}
        for name, value in raw.items():
            name = name.decode() if isinstance(name, bytes) else name
            value = value.decode() if isinstance(value, bytes) else value
            data[name] = value if name == "state" else json.loads(value)
        return JobRecord.model_validate(data)
