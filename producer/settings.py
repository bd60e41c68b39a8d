"""Producer settings: everything a process that submits jobs needs, from `SVDQ_*` variables."""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from producer.contract import DEFAULT_QUEUE, JobParams, check_caps


class ConfigurationError(ValueError):
    """A setting that cannot work (a malformed SVDQ_STORAGE_URL, say): the operator's to fix, not a bug."""


def default_storage_url() -> str:
    return (Path.home() / ".cache" / "svdq" / "store").as_uri()


class Settings(BaseSettings):
    # An empty variable counts as unset: compose's `${SVDQ_WEBHOOK_SECRET:-}` passes "" for "not given", which
    # read literally is a secret that fails its check (a worker in a restart loop) or an endpoint URL of "".
    model_config = SettingsConfigDict(env_prefix="SVDQ_", extra="ignore", env_ignore_empty=True)

    def check_caps(self, params: JobParams) -> None:
        check_caps(params, max_frames=self.max_frames, max_pixels=self.max_pixels, max_steps=self.max_steps)

    # Broker and status records share one Redis; `rediss://` and passwords work from the URL, and
    # `sentinel://HOST:26379;sentinel://HOST2:26379/DB` finds the master through Redis Sentinel.
    redis_url: str = "redis://localhost:6379/0"
    sentinel_master: str = "mymaster"
    # Seconds before the broker hands an unacknowledged message to another worker. Leases already keep a
    # job from running twice; set this above the longest job so its message is not redelivered needlessly.
    # Every Celery client restores overdue messages (kombu), `svdq ping` and `top` too: all must agree on it.
    visibility_timeout: Annotated[int, Field(ge=1)] = 3600

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, url: str) -> str:
        """Checked here so a typo is one line naming the variable, not redis-py's traceback at first use."""
        for part in url.split(";") if is_sentinel(url) else [url]:
            parts = urlsplit(part)
            if parts.scheme == "unix":  # redis-py would take it, but Celery's broker has no transport for it
                raise ValueError("a unix socket is not a broker Celery can use: listen on TCP, redis://HOST:PORT/DB")
            if parts.scheme not in ("redis", "rediss", "sentinel"):
                raise ValueError("must be redis://HOST:PORT/DB (or rediss://, sentinel://)")
            try:
                parts.port  # noqa: B018  (raises on a port that is not a number or out of range)
            except ValueError as exc:
                raise ValueError(f"bad port: {exc}") from None
            database = parts.path.strip("/")
            if database and not database.isdigit():  # not repeated: with a slash missing, it holds the password
                raise ValueError("the database (after the last /) must be a number")
        return url if is_sentinel(url) else _credentials_in_userinfo(url)

    # `s3://BUCKET[/PREFIX]` or `file:///ABS/PATH` (one machine only).
    storage_url: str = default_storage_url()
    s3_endpoint_url: str | None = None
    # The endpoint that result URLs are presigned for, when users reach the store by another address than
    # svdq does (MinIO in compose is `http://minio:9000` inside, `https://media.example.com` outside).
    s3_public_endpoint_url: str | None = None

    @field_validator("s3_endpoint_url", "s3_public_endpoint_url")
    @classmethod
    def _endpoint(cls, url: str | None) -> str | None:
        """Checked here: botocore's "Invalid endpoint" came as a traceback from the first command that used it."""
        if url:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError("must be http(s)://HOST[:PORT] (MinIO's or the S3 service's address)")
        return url

    # Where else images may be read from, besides the store: `s3://BUCKET[/PREFIX]`, `file:///ABS/PATH`, comma-
    # separated. Any other s3:// or file:// reference is refused as "not found", whether or not it exists.
    input_allow: str = ""
    queue: str = DEFAULT_QUEUE
    # Terminal records expire after this many seconds.
    result_ttl: Annotated[int, Field(ge=1)] = 7 * 24 * 3600
    # Presigned result URLs expire after this many seconds (S3 allows at most 7 days).
    presign_ttl: Annotated[int, Field(ge=1, le=7 * 24 * 3600)] = 24 * 3600
    # Operator caps on one job, checked at submit and again by the worker (the contract allows up to 128 frames,
    # 2048x2048 and 200 steps): they bound a job's GPU time, and so how long a cancel waits for the next step.
    max_frames: Annotated[int, Field(ge=1)] = 64
    max_pixels: Annotated[int, Field(ge=1)] = 1024 * 1024
    max_steps: Annotated[int, Field(ge=1)] = 100
    max_image_bytes: Annotated[int, Field(ge=1)] = 50 * 1024 * 1024
    # Larger images are refused from their header (decompression bombs); SVD renders at most 2048x2048.
    max_image_pixels: Annotated[int, Field(ge=1)] = 40_000_000
    # Webhooks to loopback and private networks are refused unless this is set (trusted networks, tests).
    webhook_allow_private: bool = False
    # Likewise for http(s) image URLs, which workers fetch.
    allow_private_urls: bool = False
    # `user:password[,user2:password2]` for `svdq flower` (Flower's own FLOWER_BASIC_AUTH works too).
    flower_basic_auth: SecretStr | None = None
    # `svdq gateway`'s API keys: `name:key[,name2:key2]` (or bare keys, named key1, key2...). A caller sends
    # `Authorization: Bearer KEY`; each job records its key's name, and a key sees only its own jobs.
    api_keys: SecretStr | None = None
    # Requests per API key, shared by every gateway process: `20/s`, `600/m`, `10000/h`; unset: no limit.
    rate_limit: str | None = None


def settings_error(exc: ValidationError) -> str:
    """A settings class's refusal in one line, naming the variable: `SVDQ_MAX_FRAMES: ... (got 'lots')`."""
    err = exc.errors()[0]
    field = str(err["loc"][0]) if err["loc"] else ""
    name = "SVDQ_" + field.upper() if field else "a setting"
    value = err.get("input")
    if any(word in field for word in _SECRET_WORDS):  # never repeated: it is, or holds, a secret
        got = ""
    elif isinstance(value, str) and "url" in field:  # a password inside
        got = f" (got {redact_url(value)!r})"
    else:
        got = f" (got {value!r})"
    return f"{name}: {err['msg'].removeprefix('Value error, ')}{got}"


# Settings whose value is a secret or holds one (SVDQ_API_KEYS, SVDQ_WEBHOOK_SECRET, SVDQ_FLOWER_BASIC_AUTH...).
_SECRET_WORDS = ("key", "secret", "auth", "password", "token", "credential")


def is_sentinel(url: str) -> bool:
    return url.startswith("sentinel://")


def parse_sentinel_url(url: str) -> tuple[list[tuple[str, int]], str | None, int]:
    """`sentinel://[:PASSWORD@]HOST[:PORT][;sentinel://...][/DB]` (kombu's form) -> nodes, password, db."""
    nodes, password, db = [], None, 0
    for part in url.split(";"):
        parts = urlsplit(part)
        nodes.append((parts.hostname or "localhost", parts.port or 26379))
        password = parts.password or password
        if parts.path.strip("/"):
            db = int(parts.path.strip("/"))
    return nodes, password, db


def sentinel_options(settings: Settings) -> dict[str, str]:
    """kombu's transport options for a Sentinel broker URL (none for a plain one)."""
    return {"master_name": settings.sentinel_master} if is_sentinel(settings.redis_url) else {}


def broker_transport_options(settings: Settings) -> dict[str, Any]:
    """kombu's options every svdq Celery client shares: a producer's or `svdq ping`'s app also restores
    messages unacknowledged past the visibility timeout (with kombu's default of an hour, a render running
    longer than that was redelivered whatever SVDQ_VISIBILITY_TIMEOUT said). A socket timeout as svdq's own Redis
    clients have: kombu's default is none, so a publish to a broker that vanished without closing the connection
    (a failover, a NAT timeout) waited for ever, past any retry policy."""
    return {
        **sentinel_options(settings),
        "visibility_timeout": settings.visibility_timeout,
        "socket_timeout": 30,
        "socket_connect_timeout": 10,
    }


def _credentials_in_userinfo(url: str) -> str:
    """redis-py reads `?username=` and `?password=`, but Celery's broker (kombu) fails on them ("dict() got multiple
    values for keyword argument 'password'", a worker's traceback at start): moved into the URL's userinfo, which
    both read."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    given = {k: v for k, v in query if k in ("username", "password")}
    if not given:
        return url
    if "@" in parts.netloc:
        raise ValueError("give the credentials once: in the URL (redis://USER:PASSWORD@HOST...) or as ?password=")
    userinfo = quote(given.get("username", ""), safe="")
    if "password" in given:
        userinfo += ":" + quote(given["password"], safe="")
    rest = urlencode([(k, v) for k, v in query if k not in given])
    return urlunsplit((parts.scheme, f"{userinfo}@{parts.netloc}", parts.path, rest, parts.fragment))


def redact_url(url: str) -> str:
    """The URL with any password replaced, for logs and messages (each part of a Sentinel list). Safe on any
    text: a URL too malformed to split is not shown at all."""
    if ";" in url:
        return ";".join(redact_url(part) for part in url.split(";"))
    try:
        parts = urlsplit(url)
    except ValueError:
        return "(a malformed URL, not shown)"
    if "@" in url and not parts.netloc:  # no // after the scheme: what comes before the @ may be a password
        return "(a malformed URL, not shown)"
    if parts.query:  # redis-py reads ?password=...; other stores put tokens there
        parts = parts._replace(query="***")
    userinfo, at, hostport = parts.netloc.rpartition("@")
    if not at or ":" not in userinfo:
        return urlunsplit(parts)
    user = userinfo.split(":", 1)[0]
    return urlunsplit((parts.scheme, f"{user}:***@{hostport}", parts.path, parts.query, parts.fragment))


# The worker's own settings (worker.settings.WorkerSettings; a test keeps this equal to its fields: producer never
# imports worker) and what svdq's processes pass their children. With Settings's fields, every SVDQ_ name read.
WORKER_SETTINGS = frozenset(
    {
        "attention", "channels_last", "compile", "compile_backend", "compile_cache_dir", "compile_shapes",
        "compile_vae", "decode_chunk_size", "device", "dtype", "fetch_timeout", "fetch_wait", "job_timeout",
        "lease_ttl", "load_timeout", "low_vram", "max_attempts", "max_vram_gib", "metrics_port", "model", "model_name",
        "model_variant", "retry_backoff", "retry_backoff_max", "spool_dir", "spool_max_bytes", "stop_grace",
        "warmup", "webhook_max_attempts", "webhook_secret", "webhook_timeout", "x264_crf",
        "x264_params", "x264_preset",
    }
)  # fmt: skip
_INTERNAL = frozenset({"SVDQ_LOAD_ERROR_FILE", "SVDQ_WORKER_MAIN_PID", "SVDQ_GATEWAY_UNSAFE_NO_AUTH"})


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """A line for each SVDQ_ variable no svdq process reads (a typo: SVDQ_REDIS_ULR would leave the default
    Redis in use, silently), with the name it was probably meant to be."""
    known = {"SVDQ_" + name.upper() for name in (*Settings.model_fields, *WORKER_SETTINGS)} | _INTERNAL
    lines = []
    for name in sorted(n for n in environ if n.startswith("SVDQ_") and n not in known):
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.75)
        hint = f" (did you mean {close[0]}?)" if close else ""
        lines.append(f"{name} is not a setting svdq knows{hint}; it is ignored")
    return lines
