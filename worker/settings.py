"""Worker settings: the producer's, plus the model, the device and the encoder."""

from __future__ import annotations

import base64
import binascii
import re
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator

from producer.settings import Settings


class WorkerSettings(Settings):
    # A hub id or a local directory written by `save_pretrained` (`svdq make-tiny-model` makes one).
    model: str = "stabilityai/stable-video-diffusion-img2vid-xt"
    # e.g. "fp16" to fetch the half-size weights of the official checkpoints.
    model_variant: str | None = None
    # The name jobs use to ask for this model (`model` in a request); default: the last part of `model`,
    # e.g. stable-video-diffusion-img2vid-xt. The worker reads `{queue}@{name}` besides the plain queues.
    model_name: str | None = None
    # Serve Prometheus metrics on this port (from the process that runs the jobs); None: no metrics.
    metrics_port: Annotated[int, Field(ge=1, le=65535)] | None = None
    device: str = "auto"  # auto: cuda when available, else cpu
    dtype: Literal["auto", "float16", "half", "bfloat16", "float32", "float"] = "auto"  # auto: fp16 on cuda
    # Frames decoded by the VAE at once when a request does not say; memory grows with it. "auto": the
    # smallest chunk within 5% of the fastest decode measured at warm-up, within the memory budget (8 on a CPU).
    decode_chunk_size: Annotated[int, Field(ge=1, le=128)] | Literal["auto"] = "auto"  # a request's bounds
    # The most GPU memory a job may take, in GiB; unset: what its denoise needs, which the decode's chunk is then
    # sized to stay under (so svdq never takes more than stock diffusers, which decodes 8 frames at once).
    max_vram_gib: Annotated[float, Field(gt=0)] | None = None
    # Small GPUs: UNet feed-forward chunking, models on the GPU only while they run, decode chunks of 1-2.
    low_vram: bool = False
    # x264 for mp4: veryfast with the slowest analysis steps cut, which encodes 25 frames of 1024x576
    # over 3x faster than diffusers' export_to_video at the same file size (bench/encode.py).
    x264_preset: str = "veryfast"
    x264_crf: Annotated[int, Field(ge=0, le=51)] = 22
    x264_params: str = "subme=1:me=dia:trellis=0:ref=1:rc-lookahead=5"
    # torch.compile the UNet's repeated blocks; "auto": on CUDA. The compiled code is cached on disk
    # (SVDQ_COMPILE_CACHE_DIR, default svdq/compile under the user's cache dir), so only the first start on a
    # machine, and the first job at a new size, pay for compiling (`timings.compile` in the job's record).
    compile: bool | Literal["auto"] = "auto"
    # The VAE's decoder too ("auto": when the UNet is): on an H100 2.1x faster per frame, for one more compile
    # (37 s with a cold cache) of the decode chunk chosen at warm-up; other chunk sizes decode uncompiled.
    compile_vae: bool | Literal["auto"] = "auto"
    compile_backend: str = "inductor"
    compile_cache_dir: str | None = None
    # Shapes compiled at start-up besides the default 1024x576x25, `WIDTHxHEIGHTxFRAMES[,...]`. Jobs at other
    # shapes run uncompiled (no stall while compiling; slower denoise).
    compile_shapes: str = ""
    # channels_last on the UNet's 2-D convolution weights (docs/PERFORMANCE.md has what it measured).
    channels_last: bool = False
    # The SDPA kernel tried first: auto (the fastest exact one, timed at start-up), flash, cudnn, efficient, math.
    attention: Literal["auto", "flash", "cudnn", "efficient", "math"] = "auto"
    # Run one short render at start-up so the first real job is not the slow one.
    warmup: bool = True
    # Transient failures (storage unreachable) are retried: every execution counts as an attempt (but one a
    # stopping worker handed back), and
    # the wait before the next doubles from `retry_backoff` up to `retry_backoff_max`, with jitter.
    max_attempts: Annotated[int, Field(ge=1)] = 3
    retry_backoff: Annotated[float, Field(ge=0)] = 2.0
    retry_backoff_max: Annotated[float, Field(ge=0)] = 120.0
    # Before that, an attempt whose input store is unreachable waits this many seconds for it (not a URL's host),
    # as the spool waits on the way out: a short storage outage delays jobs instead of failing them.
    fetch_wait: Annotated[float, Field(ge=0)] = 60.0
    # The longest an image URL's download may take, whatever its host's pace (the GPU waits for it).
    fetch_timeout: Annotated[float, Field(gt=0)] = 60.0
    # Standard Webhooks secret, `whsec_` and base64; jobs with a webhook get no calls without it.
    webhook_secret: SecretStr | None = None
    webhook_timeout: Annotated[float, Field(gt=0)] = 10.0
    webhook_max_attempts: Annotated[int, Field(ge=1)] = 5
    # Seconds a worker process may spend loading the model before Celery gives up on it.
    load_timeout: Annotated[float, Field(gt=0)] = 900.0

    # Reliability (README "When things fail").
    # A running job holds a lease in Redis, renewed every third of `lease_ttl` seconds. When its worker
    # dies, the lease lapses and any live worker puts the job back on its queue (or fails it with
    # `worker_lost` once it has used SVDQ_MAX_ATTEMPTS), so a dead worker's job waits about this long.
    lease_ttl: Annotated[float, Field(ge=1)] = 30.0
    # The longest one attempt may run, from its claim until its video is encoded; past it the job fails `timeout`.
    # The render stops at its next check (as for a cancel); a process stuck where no check runs (a hung device
    # call) is killed by Celery's hard time limit, `time_limit()`, and the pool starts another. 0: no limit.
    job_timeout: Annotated[float, Field(ge=0)] = 1800.0
    # On SIGTERM the running job may finish for this many seconds; then it is handed back to its queue.
    stop_grace: Annotated[float, Field(ge=0)] = 300.0
    # Videos rendered while storage is down wait here (bounded) and are uploaded when it returns.
    spool_dir: str | None = None  # default: svdq-spool in the system's temporary directory
    spool_max_bytes: Annotated[int, Field(ge=0)] = 2 * 1024**3

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        """Checked at start: torch's own refusal came from the pool process, as "the model failed to load"."""
        if not re.fullmatch(r"auto|cpu|mps|(cuda|xpu)(:[0-9]+)?", value):
            raise ValueError("must be auto, cpu, cuda, cuda:N, mps or xpu")
        return value

    @field_validator("webhook_secret")
    @classmethod
    def _standard_webhooks_secret(cls, value: SecretStr | None) -> SecretStr | None:
        """Checked at start: a secret that does not decode would fail every delivery, in the sender thread."""
        if value is not None:
            try:
                text = value.get_secret_value().removeprefix("whsec_")
                key = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
            except (binascii.Error, ValueError):
                key = b""
            if len(key) < 16:
                raise ValueError(
                    "must be whsec_ and the base64 of at least 16 random bytes, as Standard Webhooks libraries make "
                    "them (python -c 'import base64,os; print(\"whsec_\" + base64.b64encode(os.urandom(24)).decode())')"
                )
        return value

    def time_limit(self) -> float | None:
        """Celery's hard time limit for a task: SVDQ_JOB_TIMEOUT plus a tenth (at least 10 s), so the render's
        own checks, which end the job cleanly and keep the process and its warm model, come first."""
        return self.job_timeout + max(10.0, self.job_timeout / 10) if self.job_timeout else None

    def served_model(self) -> str:
        if self.model_name:
            return self.model_name
        name = re.sub(r"[^a-z0-9_-]+", "-", self.model.rstrip("/").rsplit("/", 1)[-1].lower()).strip("-_")
        return name[:64] or "model"
