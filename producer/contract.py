"""The contract between producers and workers: job states, the request, the record, task names.

Anything a backend in another language needs to talk to svdq is defined here, so the README's
message format and this module cannot drift apart.
"""

from __future__ import annotations

import enum
import json
import re
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

TASK_NAME = "svdq.generate_video"
# Celery's own default queue name, so a plain `send_task(TASK_NAME, ...)` from any Celery client
# reaches svdq workers with no routing configuration.
DEFAULT_QUEUE = "celery"


# Job ids name Redis keys, storage keys, log lines and lease holders: one grammar, checked wherever an id
# enters (the client, the worker's task, every store path built from one). Ours are 128 random bits in hex (32
# characters: uuid4's, or os.urandom's in submit_many).
JOB_ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")


def check_job_id(value: object) -> str:
    """The id itself if it is a string of 1-64 of A-Z, a-z, 0-9, _ and -; else InvalidParameter("job_id")."""
    if isinstance(value, str) and JOB_ID_PATTERN.fullmatch(value):
        return value
    raise InvalidParameter("job_id", f"must be 1-64 characters of A-Z, a-z, 0-9, _ and - (got {shown(value)})")


def shown(value: object, limit: int = 80) -> str:
    """An untrusted value for a log line or a message: repr (newlines and control characters escaped), cut."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """Text from a record or a worker's presence, as a terminal shows it: control characters as \\xNN. A record
    holds what image hosts, raw messages and anyone with Redis put there, and an escape sequence in it would
    retitle, clear or rewrite the reader's terminal."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def has_control(text: str) -> bool:
    """Whether `printable` would change it: a NUL, an escape, a newline... in a name, a URL or a key."""
    return _CONTROL.search(text) is not None


def renamed(message: str, names: dict[str, str]) -> str:
    """`message` with the parameters it names called as the user called them (a flag, a manifest's column): a
    check of two parameters names the other one too. Only names with "_": no English word in a message has one."""
    for param, name in names.items():
        if "_" in param:
            message = re.sub(rf"\b{param}\b", name, message)
    return message


def result_name(job_id: str, fmt: str = "mp4") -> str:
    """Where a job's video lives, relative to the store's prefix."""
    return f"{check_job_id(job_id)}/video.{fmt}"


class JobState(str, enum.Enum):
    QUEUED = "queued"
    STARTED = "started"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"

    def is_terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELED})


class Stage(enum.StrEnum):
    """Where a job is within its state: the record's `stage` (README: "The job record" lists these)."""

    FETCH = "fetch"  # started: reading the input image
    COMPILE = "compile"  # started: compiling the UNet for a shape the warm-up did not (SVDQ_WARMUP=0)
    DENOISE = "denoise"
    DECODE = "decode"  # VAE decode, streamed into the encoder
    UPLOAD = "upload"
    UPLOAD_PENDING = "upload_pending"  # started: the video waits in the worker's spool for storage
    DONE = "done"  # succeeded
    RETRYING = "retrying"  # queued again after a transient failure
    RECOVERED = "recovered"  # queued again: its worker died
    HANDED_BACK = "handed_back"  # queued again: its worker stopped
    LOST = "lost"  # failed: its worker died on every attempt
    REVOKED = "revoked"  # canceled by Celery's revoke (Flower's Revoke or Terminate)


# The one table that decides what may follow what. `None` is "no record yet".
# queued -> failed covers a message that cannot even be parsed; started -> queued is a retry, a job handed
# back at shutdown, or one recovered from a dead worker; started -> started is a takeover of a job whose
# worker died (its lease expired, see producer.status). Leaving `started` needs the lease's conditions too.
TRANSITIONS: dict[JobState | None, frozenset[JobState]] = {
    None: frozenset({JobState.QUEUED}),
    JobState.QUEUED: frozenset({JobState.STARTED, JobState.FAILED, JobState.CANCELED}),
    JobState.STARTED: frozenset(
        {JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELED, JobState.QUEUED, JobState.STARTED}
    ),
    JobState.SUCCEEDED: frozenset(),
    JobState.FAILED: frozenset(),
    JobState.CANCELED: frozenset(),
}


def sources_of(state: JobState) -> list[JobState | None]:
    """The states from which `state` may be entered."""
    return [src for src, targets in TRANSITIONS.items() if state in targets]


class ErrorCode(str, enum.Enum):
    INVALID_INPUT = "invalid_input"
    STORAGE_UNAVAILABLE = "storage_unavailable"
    OUT_OF_MEMORY = "out_of_memory"
    # Written by producers before a record and its message were created in one script; kept for their records.
    ENQUEUE_FAILED = "enqueue_failed"
    # The job's worker died (killed, out of host memory, host lost) SVDQ_MAX_ATTEMPTS times.
    WORKER_LOST = "worker_lost"
    # Storage was unreachable after the render and the worker's local upload spool had no room for it.
    SPOOL_FULL = "spool_full"
    # The attempt ran past its worker's SVDQ_JOB_TIMEOUT (stopped at a check, or its stuck process killed).
    TIMEOUT = "timeout"
    INTERNAL = "internal"


class InvalidParameter(ValueError):
    """A request parameter is out of bounds; raised at submit, before anything is stored or enqueued."""

    def __init__(self, param: str, message: str):
        self.param = param
        self.message = message
        super().__init__(f"{param}: {message}")


# Priority is a queue: workers read `{queue}.high`, then `{queue}`, then `{queue}.low`, in that fixed
# order (kombu's Redis transport with queue_order_strategy="priority"). Normal is the plain queue, so a
# plain Celery client that names no priority gets normal.
PRIORITIES = ("high", "normal", "low")


def queue_for(base: str, priority: str) -> str:
    if priority not in PRIORITIES:
        raise InvalidParameter("priority", f"must be one of {', '.join(PRIORITIES)} (got {priority!r})")
    return base if priority == "normal" else f"{base}.{priority}"


def priority_queues(base: str) -> list[str]:
    """The queues a worker for `base` reads, most urgent first."""
    return [queue_for(base, p) for p in PRIORITIES]


# Models are routed by queue too: a job naming a model goes to `{queue}@{model}` (and its .high/.low), read
# only by workers serving that model; a job naming none goes to the plain queues, which every worker reads.
MODEL_NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,63}$"
MODEL_NAME_RULE = "1 to 64 of a-z, 0-9, '-' and '_', starting with a letter or digit"  # the pattern, in words


def model_queue(base: str, model: str | None) -> str:
    return f"{base}@{model}" if model else base


def worker_queues(base: str, model: str | None) -> list[str]:
    """What a worker serving `model` reads, in order: each priority level for its model and for any model."""
    levels = zip(priority_queues(model_queue(base, model)), priority_queues(base), strict=True)
    return list(dict.fromkeys(q for level in levels for q in level))


class JobParams(BaseModel):
    """Render parameters, named as diffusers' StableVideoDiffusionPipeline names them.

    Defaults are SVD-XT's. Bounds are what the model and a single GPU can sensibly do.
    """

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    num_frames: int = Field(25, ge=1, le=128)
    num_inference_steps: int = Field(25, ge=1, le=200)
    fps: int = Field(7, ge=1, le=60)
    motion_bucket_id: int = Field(127, ge=0, le=255)
    noise_aug_strength: float = Field(0.02, ge=0.0, le=1.0)
    min_guidance_scale: float = Field(1.0, ge=0.0, le=20.0)
    max_guidance_scale: float = Field(3.0, ge=0.0, le=20.0)
    width: int = Field(1024, ge=64, le=2048, multiple_of=8)
    height: int = Field(576, ge=64, le=2048, multiple_of=8)
    # Frames the VAE decodes at once. "auto": the worker's choice from its decode profile and memory budget.
    # None: the worker's SVDQ_DECODE_CHUNK_SIZE (itself "auto" unless set).
    decode_chunk_size: Annotated[int, Field(ge=1, le=128)] | Literal["auto"] | None = None
    format: Literal["mp4", "webm", "gif"] = "mp4"
    # None: the worker draws one and records it in the result, so every video can be made again.
    seed: int | None = Field(None, ge=0, le=2**32 - 1)
    # The model to render with, by the name its workers serve (SVDQ_MODEL_NAME); None: any worker's.
    model: str | None = Field(None, pattern=MODEL_NAME_PATTERN)

    @model_validator(mode="after")
    def _guidance_order(self) -> JobParams:
        if self.max_guidance_scale < self.min_guidance_scale:
            raise ValueError(
                f"max_guidance_scale must be >= min_guidance_scale (got {self.max_guidance_scale:g}; "
                f"min_guidance_scale is {self.min_guidance_scale:g})"
            )
        return self


def check_caps(params: JobParams, *, max_frames: int, max_pixels: int, max_steps: int) -> None:
    """The operator's limits (SVDQ_MAX_FRAMES, SVDQ_MAX_PIXELS, SVDQ_MAX_STEPS), below the contract's own bounds:
    they keep any one job's GPU time, and so a cancel's wait for the next step, bounded."""
    if params.num_frames > max_frames:
        raise InvalidParameter("num_frames", f"{params.num_frames} is over this service's SVDQ_MAX_FRAMES={max_frames}")
    if params.width * params.height > max_pixels:
        raise InvalidParameter(
            "width",
            f"{params.width}x{params.height} is {params.width * params.height:,} pixels, "
            f"over this service's SVDQ_MAX_PIXELS={max_pixels:,}",
        )
    if params.num_inference_steps > max_steps:
        raise InvalidParameter(
            "num_inference_steps", f"{params.num_inference_steps} is over this service's SVDQ_MAX_STEPS={max_steps}"
        )


# The longest image reference (a URL or a store key) a request carries; netguard holds every URL to it too.
MAX_REFERENCE = 2048


class JobRequest(JobParams):
    """What travels in the Celery message: parameters plus where the input image is.

    `image` is an `s3://BUCKET/KEY` or `file://` URL, or a key in the configured store.
    """

    image: str = Field(min_length=1, max_length=MAX_REFERENCE)


def bounds(param: str) -> str | None:
    """A parameter's range in words ("1 to 128", "64 to 2048, a multiple of 8"), None when it has none."""
    field = JobParams.model_fields[param]
    found = {
        kind: getattr(item, kind)
        for item in field.metadata
        for kind in ("ge", "le", "multiple_of")
        if hasattr(item, kind)
    }
    if param == "decode_chunk_size":
        return "1 to 128, or auto"
    if "ge" not in found or "le" not in found:
        return None
    text = f"{found['ge']!s} to {found['le']!s}"
    return text + (f", a multiple of {found['multiple_of']}" if "multiple_of" in found else "")


_OUT_OF_BOUNDS = {"greater_than_equal", "less_than_equal", "multiple_of"}


def _first_error(exc: ValidationError) -> InvalidParameter:
    err = exc.errors()[0]
    loc = str(err["loc"][0]) if err["loc"] else ""  # later parts name union members, not parameters
    if not loc:  # model-level check: the message begins with the parameter's name
        param, _, message = str(err["msg"]).removeprefix("Value error, ").partition(" ")
        return InvalidParameter(param, message)
    if err["type"] == "extra_forbidden":  # a name the sender chose: cut and escaped like a value
        return InvalidParameter(shown(loc, 66).strip("'\""), "is not a parameter svdq knows")
    got = shown(err.get("input"), 200)  # a sender's value (megabytes, once) goes into records and logs
    if err["type"] in _OUT_OF_BOUNDS and loc in JobParams.model_fields and (allowed := bounds(loc)):
        return InvalidParameter(loc, f"must be {allowed} (got {got})")
    if err["type"] == "string_pattern_mismatch" and loc == "model":  # a regular expression says little to a user
        return InvalidParameter(loc, f"must be a model name: {MODEL_NAME_RULE} (got {got})")
    return InvalidParameter(loc, f"{err['msg']} (got {got})")


Checked = TypeVar("Checked", bound=JobParams)


def check_inputs(data: dict[str, Any], kind: type[Checked] = JobParams) -> Checked:
    """Validate render parameters (or, with kind=JobRequest, a whole message body as a worker receives it),
    raising InvalidParameter that names the first bad one."""
    try:
        return kind.model_validate(data)
    except ValidationError as exc:
        raise _first_error(exc) from None


class JobError(BaseModel):
    code: str
    message: str


class JobResult(BaseModel):
    key: str
    format: str = "mp4"
    url: str | None
    bytes: int
    frames: int
    width: int
    height: int
    fps: int
    seed: int


class MemoryReport(BaseModel):
    """What the worker did about memory for one job."""

    decode_chunk_size: int  # the chunk finally used
    decode_chunk_halvings: int = 0  # times a decode ran out of memory and was retried with half
    forward_chunking: bool = False  # whether the denoise needed the UNet's feed-forward chunking
    peak_bytes: int | None = None  # device memory peak during the job (CUDA only)


class JobRecord(BaseModel):
    """A job's status as kept in Redis and printed by `svdq status --json`."""

    id: str
    state: JobState
    stage: str | None = None
    progress: float = 0.0
    step: int | None = None  # denoising steps done, while denoising
    total_steps: int | None = None
    attempts: int = 0
    handbacks: int = 0  # of those, executions a stopping worker handed back: not counted against the cap
    created_at: str | None = None
    started_at: str | None = None
    finished_at: str | None = None
    worker: str | None = None
    error: JobError | None = None
    result: JobResult | None = None
    timings: dict[str, float] = Field(default_factory=dict)
    memory: MemoryReport | None = None
    request: dict[str, Any] = Field(default_factory=dict)
    priority: str = "normal"
    queue: str | None = None  # the Celery queue its message went to (a recovered job goes back there)
    idempotency_key: str | None = None
    webhook: str | None = None
    webhook_error: str | None = None  # why the job's webhook is not called, when a worker knows it cannot
    owner: str | None = None  # the gateway's API key name that submitted it (never the key)

    def to_json_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def value_from_text(value: str) -> Any:
    """A parameter given as text (a CSV cell, a form field) as JSON would have it: 14 an int, 0.02 a float;
    anything else stays text ("auto", "webm")."""
    try:
        return json.loads(value)
    except (ValueError, RecursionError):  # RecursionError: "[[[[..." nested deeper than the parser goes
        return value
