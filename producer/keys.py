"""Every Redis key svdq writes, in one place (Celery's own broker keys are Celery's)."""

PREFIX = "svdq"


def job(job_id: str) -> str:
    """Hash holding one job's record (see producer.contract.JobRecord)."""
    return f"{PREFIX}:job:{job_id}"


JOB_PATTERN = f"{PREFIX}:job:*"

# Sorted set per state: job ids scored by the time they entered it. Listing reads these, never SCAN.
STATE_INDEX_PREFIX = f"{PREFIX}:state:"


def state_index(state: str) -> str:
    return f"{STATE_INDEX_PREFIX}{state}"


def events(job_id: str) -> str:
    """Pub/sub channel carrying one job's state and progress changes."""
    return f"{PREFIX}:events:{job_id}"


# A stream of every job's events, capped at about EVENTS_STREAM_LENGTH entries.
EVENTS_STREAM = f"{PREFIX}:events"
EVENTS_STREAM_LENGTH = 10_000


IDEMPOTENCY_PREFIX = f"{PREFIX}:idempotency:"


def idempotency(key: str) -> str:
    """String holding the job id submitted under a client's idempotency key."""
    return f"{IDEMPOTENCY_PREFIX}{key}"


def lease(job_id: str) -> str:
    """String naming the worker process running the job; expires unless its heartbeat renews it."""
    return f"{PREFIX}:lease:{job_id}"


def stopping(worker: str) -> str:
    """String set when a worker node begins a warm shutdown: the epoch second its grace period ends."""
    return f"{PREFIX}:stopping:{worker}"


def recovering(job_id: str) -> str:
    """Short lock held by the worker putting a dead worker's job back on its queue."""
    return f"{PREFIX}:recovering:{job_id}"


def sweep_turn(lease_ttl: float) -> str:
    """String held by the one worker whose turn it is to sweep for dead workers' jobs. Per lease setting: a
    sweeper looks for leases older than its own, so sweepers set up differently do not stand in for each other."""
    return f"{PREFIX}:sweep-turn:{lease_ttl:g}"


# Sorted set of the jobs waiting out a retry's backoff, scored by the epoch second each is due: the workers'
# sweepers send each one's message when it is. (Celery's countdown messages were held in the memory of whichever
# worker fetched them: a Redis restart could end that worker with the message in hand, for an hour.)
RETRY_DUE = f"{PREFIX}:retry-due"


def worker(name: str) -> str:
    """Hash describing a live worker node (model, device, queues); expires unless its main process refreshes it."""
    return f"{PREFIX}:worker:{name}"


# Sorted set of the worker nodes' names, scored by when each one's hash expires: `svdq top` finds the nodes
# here, where a SCAN for their hashes walked every key in Redis (every job's) on each refresh.
WORKERS = f"{PREFIX}:workers"


def owner_index(name: str) -> str:
    """Sorted set of the job ids an API key submitted through the gateway, scored by submission time."""
    return f"{PREFIX}:owner:{name}"


def rate(name: str, window: int) -> str:
    """Counter of an API key's gateway requests in one window of its rate limit; expires with the window."""
    return f"{PREFIX}:rate:{name}:{window}"
