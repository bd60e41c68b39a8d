"""The file store, content addressing and URL handling (a temporary folder, no services)."""

from __future__ import annotations

import pickle
from pathlib import Path

import pydantic
import pytest
from botocore.exceptions import ClientError, NoCredentialsError

from producer.settings import ConfigurationError, Settings, redact_url, settings_error
from producer.storage import (
    FileStore,
    InvalidReference,
    ObjectNotFound,
    S3Store,
    StorageRefused,
    _s3_errors,
    content_name,
    open_store,
)


def test_content_name_is_stable_and_content_addressed() -> None:
    assert content_name(b"abc", ".png") == content_name(b"abc", ".png")
    assert content_name(b"abc", ".png") != content_name(b"abd", ".png")
    assert content_name(b"abc", ".png").startswith("inputs/") and content_name(b"abc", ".png").endswith(".png")


def test_file_store_round_trip(tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    stored = store.put("job1/video.mp4", b"data", "video/mp4")
    assert stored.key == "job1/video.mp4"
    assert store.exists("job1/video.mp4") and not store.exists("job2/video.mp4")
    assert store.read_key(stored.key) == b"data"  # a job's video is read back by its key
    with pytest.raises(ObjectNotFound):
        store.read(stored.ref)  # but never taken as another job's input
    assert list(tmp_path.rglob(".part-*")) == []


def test_file_store_refuses_paths_outside_it_as_if_they_did_not_exist(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "store")
    secret = tmp_path / "secret.txt"
    secret.write_text("no")
    answers = set()
    for ref in (secret.as_uri(), "../secret.txt", (tmp_path / "nothing.txt").as_uri(), "missing.png"):
        with pytest.raises(ObjectNotFound) as refused:
            store.read(ref)
        answers.add(str(refused.value).replace(ref, "REF"))
    assert answers == {"no image at REF that this service may read"}  # exists or not, outside: the same
    with pytest.raises(InvalidReference):
        store.read("s3://bucket/key")
    allowed = FileStore(tmp_path / "store", allow=[tmp_path.as_uri()])  # SVDQ_INPUT_ALLOW=file:///...
    assert allowed.read(secret.as_uri()) == b"no" and allowed.may_read(secret.as_uri())
    # A bare name is a name in the store: an absolute path, a way up or a link out is refused at submit as at
    # read, even into an allowed folder (the allowed folder is read by file:// URL).
    (tmp_path / "store" / "inputs").mkdir(parents=True)
    (tmp_path / "store" / "inputs" / "out").symlink_to(tmp_path)
    for ref in (str(secret), "../secret.txt", "inputs/out/secret.txt"):
        assert not allowed.may_read(ref), ref
        with pytest.raises(ObjectNotFound):
            allowed.read(ref)


def test_open_store_parses_urls(tmp_path: Path) -> None:
    assert isinstance(open_store(Settings(storage_url=tmp_path.as_uri())), FileStore)
    s3 = open_store(Settings(storage_url="s3://bucket/some/prefix/"), s3_client=object())
    assert isinstance(s3, S3Store) and s3.ref("a.png") == "s3://bucket/some/prefix/a.png"
    assert open_store(Settings(storage_url="s3://bucket"), s3_client=object()).ref("a") == "s3://bucket/a"
    with pytest.raises(ValueError, match="SVDQ_STORAGE_URL"):
        open_store(Settings(storage_url="ftp://x/y"))


def test_redact_url_hides_passwords() -> None:
    assert redact_url("redis://:hunter2@host:6380/1") == "redis://:***@host:6380/1"
    assert redact_url("rediss://user:pw@host/0") == "rediss://user:***@host/0"
    assert redact_url("redis://host:6379/0") == "redis://host:6379/0"


def test_unreadable_names_are_permanent_input_errors_not_outages(tmp_path: Path) -> None:
    """A NUL byte, a directory, a name over the file system's limit: refused as the job's input (never
    retried as `storage_unavailable`)."""
    from producer.contract import ErrorCode
    from worker.errors import JobFailed
    from worker.inputs import fetch_image

    store = FileStore(tmp_path)
    (tmp_path / "inputs").mkdir()
    cases = {
        "inputs/a\x00b.png": ObjectNotFound,
        "inputs": ObjectNotFound,
        "x" * 300 + ".png": ObjectNotFound,
        (tmp_path / "inputs").as_uri(): ObjectNotFound,
    }
    for ref, kind in cases.items():
        with pytest.raises(kind):
            store.read(ref)
        with pytest.raises(JobFailed) as failed:
            fetch_image(store, ref, max_bytes=1000)
        assert failed.value.code is ErrorCode.INVALID_INPUT, ref


def test_s3_allow_list_prefixes_end_at_a_slash_and_refuse_dot_dot() -> None:
    store = S3Store(object(), "svdq", "renders", allow=["s3://other/public", "s3://whole"])
    assert store.may_read("s3://svdq/renders/inputs/a.png") and store.may_read("inputs/a.png")
    assert store.may_read("s3://other/public/a.png") and store.may_read("s3://whole/any/key.png")
    for ref in (
        "s3://other/publicity/a.png",
        "s3://svdq/elsewhere/a.png",
        "s3://svdq/renders/../x.png",
        "../x.png",
        "s3://private/hr/scan.png",
        "/etc/passwd",
    ):
        assert not store.may_read(ref), ref
        with pytest.raises(ObjectNotFound, match="that this service may read"):
            store.read(ref)  # refused before any request (the client here is not even an S3 client)


def test_videos_are_never_inputs_and_odd_paths_are_not_readable(tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    victim = store.put("abc123/video.gif", b"GIF89a", "image/gif")
    for ref in ("abc123/video.gif", victim.ref, "a" * 300):
        assert not store.may_read(ref) or ref == "a" * 300  # a place it may read, but no file can have that name
        with pytest.raises(ObjectNotFound, match="that this service may read"):
            store.read(ref)
    (tmp_path / "loop1").symlink_to(tmp_path / "loop2")
    (tmp_path / "loop2").symlink_to(tmp_path / "loop1")
    assert not store.may_read("loop1/x.png") and not store.may_read((tmp_path / "loop1").as_uri())
    assert not store.exists("a" * 300)
    s3 = S3Store(object(), "svdq", "renders")
    assert not s3.may_read("s3://svdq/renders/abc123/video.mp4") and not s3.may_read("abc123/video.webm")
    assert s3.may_read("s3://svdq/renders/uploads/abc123/video.mp4")  # deeper: not a result's name


def test_a_malformed_setting_never_repeats_a_password_or_a_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    import pydantic

    from producer.settings import settings_error
    from worker.settings import WorkerSettings

    for url in (
        "redis://:S3cretPassw0rd@redis-host:6379/db0",  # a bad database
        "redis://:S3cretPassw0rd@redis-host:port/0",  # a bad port
        "rediss//:S3cretPassw0rd@redis-host/0",  # no scheme
        "redis://:S3cretPassw0rd@[::1/0",  # not even splittable
        "redis:/:S3cretPassw0rd@redis-host:6379/0",  # a slash missing: the "database" holds the password
        "redsi://redis-host/0?password=S3cretPassw0rd",  # redis-py reads a password from the query too
        "redis://:S3cretPassw0rd@redis-host/0?password=S3cretPassw0rd",  # given twice
    ):
        with pytest.raises(pydantic.ValidationError) as refused:
            Settings(redis_url=url)
        line = settings_error(refused.value)
        assert line.startswith("SVDQ_REDIS_URL: ") and "S3cretPassw0rd" not in line, line
    assert redact_url("redis://:S3cretPassw0rd@[::1/0") == "(a malformed URL, not shown)"
    # redis-py takes a unix socket, Celery's broker does not ("No such transport: unix" at first use).
    with pytest.raises(pydantic.ValidationError) as refused:
        Settings(redis_url="unix:///run/redis/redis.sock")
    assert settings_error(refused.value).startswith(
        "SVDQ_REDIS_URL: a unix socket is not a broker Celery can use: listen on TCP, redis://HOST:PORT/DB"
    )
    # A webhook secret that does not decode is refused at start (it failed every delivery, in a thread, silently),
    # and the line that says so does not repeat it.
    monkeypatch.setenv("SVDQ_WEBHOOK_SECRET", "whsec_abcde-NOT-BASE64")
    with pytest.raises(pydantic.ValidationError) as refused:
        WorkerSettings()
    line = settings_error(refused.value)
    assert line.startswith("SVDQ_WEBHOOK_SECRET: must be whsec_") and "NOT-BASE64" not in line


def test_inputs_are_read_up_to_the_limit_and_access_denied_is_the_job_s_input(tmp_path: Path) -> None:
    """A 5 MB file in a place inputs come from is refused after reading the limit, not all of it; S3's 403 for
    a missing key (to credentials without s3:ListBucket) is the job's bad input, not an outage to wait out."""
    import tracemalloc

    from botocore.exceptions import ClientError

    from producer.storage import StorageUnavailable, _s3_errors

    store = FileStore(tmp_path)
    (tmp_path / "inputs").mkdir()
    (tmp_path / "inputs" / "big.png").write_bytes(b"\0" * 5_000_000)
    tracemalloc.start()
    data = store.read("inputs/big.png", limit=1000)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(data) == 1001 and peak < 1_000_000
    denied = ClientError({"Error": {"Code": "AccessDenied", "Message": "Access Denied"}}, "GetObject")
    with pytest.raises(ObjectNotFound), _s3_errors("inputs/nope.png", reading=True, denied_is_missing=True):
        raise denied
    with pytest.raises(StorageUnavailable), _s3_errors("job/video.mp4", reading=True):  # our own key: an outage
        raise denied


HOLD_A_SPOOL = """
import sys
from pathlib import Path
from producer.storage import FileStore
from worker.spool import Spool
spool = Spool(FileStore(Path(sys.argv[1])), Path(sys.argv[2]), 10)
print(spool.dir, flush=True)
sys.stdin.read()
"""


def test_a_worker_s_spool_folder_goes_when_its_process_does_whatever_pid_it_is_named_after(tmp_path: Path) -> None:
    """Folders were named after their process's pid and kept while that pid was alive: in a container, whose
    restarted processes get the same small pids, a dead worker's folder then stayed for ever."""
    import os
    import subprocess
    import sys
    import time

    from worker.spool import Spool

    store, root = tmp_path / "store", tmp_path / "spool"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_A_SPOOL, str(store), str(root)], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    assert holder.stdout is not None
    live = Path(holder.stdout.readline().decode().strip())
    reused = root / f"{os.getpid()}-left-by-a-dead-worker"  # its pid is a live process's now: this one's
    reused.mkdir()
    (reused / ".owner").touch()
    (reused / "job.mp4").write_bytes(b"a video nobody will upload")
    unlocked = root / f"{os.getpid()}-left-by-an-older-svdq"  # no owner file, made an hour ago
    unlocked.mkdir()
    os.utime(unlocked, (time.time() - 3600, time.time() - 3600))
    just_made = root / f"{os.getpid()}-made-this-instant"  # its owner's lock not in place yet
    just_made.mkdir()

    Spool(FileStore(store), root, 10).close()
    assert live.is_dir() and just_made.is_dir() and not reused.exists() and not unlocked.exists()
    just_made.rmdir()
    holder.communicate(timeout=30)
    assert holder.returncode == 0
    Spool(FileStore(store), root, 10).close()  # the next start after that process ended
    assert not live.exists() and list(root.iterdir()) == []


def refusal(code: str, status: int | None) -> StorageRefused:
    with pytest.raises(StorageRefused) as caught, _s3_errors("renders/x"):
        raise ClientError({"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject")
    return caught.value


def test_a_store_s_refusal_says_whether_it_passes() -> None:
    """A worker does not start on a refusal (worker.startup.check_storage) but does on a busy store: MinIO while
    it starts, throttling, a clock not yet synchronised. The code is the body's, so the status decides too."""
    for code, status in [("AccessDenied", 403), ("NoSuchBucket", 404), ("InvalidAccessKeyId", 403)]:
        assert not refusal(code, status).busy, code
    for code, status in [("XMinioServerNotInitialized", 503), ("SlowDownWrite", 503), ("TooManyRequests", 429)]:
        assert refusal(code, status).busy, code
    assert refusal("RequestTimeTooSkewed", 403).busy and refusal("ServiceUnavailable", None).busy
    with pytest.raises(StorageRefused) as caught, _s3_errors("renders/x"):
        raise NoCredentialsError()  # not an outage: nothing changes until someone sets them
    assert not caught.value.busy and caught.value.code == "NoCredentialsError"
    copy = pickle.loads(pickle.dumps(refusal("AccessDenied", 403)))  # as Celery's pool hands it over
    assert (str(copy), copy.code, copy.status) == ("storage refused renders/x: AccessDenied", "AccessDenied", 403)


def test_a_redis_password_given_as_a_query_parameter_reaches_celery_s_broker_too() -> None:
    """redis-py reads `?password=`, so producers worked; kombu failed on it ("dict() got multiple values for keyword
    argument 'password'"), a traceback at every worker start."""
    from kombu import Connection
    from redis.connection import parse_url

    url = Settings(redis_url="redis://redis-host:6379/3?password=p%40ss:w&ssl_cert_reqs=none").redis_url
    assert url == "redis://:p%40ss%3Aw@redis-host:6379/3?ssl_cert_reqs=none"
    broker = Connection(url)
    assert (broker.hostname, broker.password, broker.virtual_host) == ("redis-host", "p@ss:w", "3")
    assert parse_url(url)["password"] == "p@ss:w"
    named = Settings(redis_url="rediss://redis-host:6380/0?username=svdq&password=pw").redis_url
    assert named == "rediss://svdq:pw@redis-host:6380/0" and Connection(named).userid == "svdq"


@pytest.mark.parametrize(
    ("variable", "value", "says"),
    [
        ("SVDQ_LEASE_TTL", "-1", "greater than or equal to 1"),  # Redis refused the lease mid-claim: a job stuck
        ("SVDQ_RESULT_TTL", "-5", "greater than or equal to 1"),
        ("SVDQ_MAX_FRAMES", "-1", "greater than or equal to 1"),  # every --frames was then "over" it
        ("SVDQ_MAX_ATTEMPTS", "0", "greater than or equal to 1"),
        ("SVDQ_PRESIGN_TTL", "0", "greater than or equal to 1"),
        ("SVDQ_METRICS_PORT", "99999", "less than or equal to 65535"),  # was "the model failed to load", exit 3
        ("SVDQ_DEVICE", "tpu", "must be auto, cpu, cuda, cuda:N, mps or xpu"),  # likewise
        ("SVDQ_DTYPE", "float99", "Input should be 'auto', 'float16'"),
        ("SVDQ_S3_ENDPOINT_URL", "not-a-url", "must be http(s)://HOST[:PORT]"),  # botocore's traceback at first use
    ],
)
def test_a_setting_out_of_its_range_is_one_line_naming_it(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, says: str
) -> None:
    from worker.settings import WorkerSettings

    monkeypatch.setenv(variable, value)
    with pytest.raises(pydantic.ValidationError) as refused:
        WorkerSettings()
    line = settings_error(refused.value)
    assert line.startswith(f"{variable}: ") and says in line and "\n" not in line, line


def test_a_bad_input_allow_entry_is_a_configuration_error() -> None:
    from producer.storage import parse_allow

    with pytest.raises(ConfigurationError, match="SVDQ_INPUT_ALLOW: 'http://x' is not s3://"):
        parse_allow("s3://ok/prefix, http://x")
