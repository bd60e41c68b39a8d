"""Where input images and finished videos live: any S3-compatible store, or a local folder.

Names given to a store are relative to its prefix (`inputs/<sha256>.png`, `<job id>/video.mp4`);
references in requests are full URLs (`s3://bucket/key`, `file:///path`) or such names.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import unquote, urlsplit

from producer.settings import ConfigurationError, Settings

# A file:// store's errors that only someone can fix; others (EIO, ENOSPC, a stale NFS handle) may pass.
FOLDER_REFUSED = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EISDIR, errno.ELOOP, errno.ENAMETOOLONG}


class StorageUnavailable(RuntimeError):
    """The store could not be reached or refused a well-formed request; worth retrying later."""


class StorageRefused(StorageUnavailable):
    """The store answered and said no (credentials, permissions, no such bucket). A job retries it (an operator
    may fix it meanwhile); a worker that meets it at start does not start (worker.startup.check_storage)."""

    def __init__(self, message: str, code: str, status: int | None = None):
        super().__init__(message)
        self.code, self.status = code, status

    def __reduce__(self) -> tuple[Any, ...]:  # crosses process boundaries (Celery's pool) whole
        return (type(self), (str(self), self.code, self.status))

    @property
    def busy(self) -> bool:
        """The store is there but failing on its side, or asks to slow down: an outage, not a refusal."""
        return (self.status or 0) >= 500 or self.status == 429 or self.code in _BUSY


class ObjectNotFound(LookupError):
    pass


class InvalidReference(ValueError):
    """A reference this store will not read (wrong scheme, or a path outside the store)."""


def not_readable(ref: str) -> ObjectNotFound:
    """One answer for "outside the places this service reads" and "not there", so neither reveals the other."""
    return ObjectNotFound(f"no image at {ref.split('?', 1)[0]} that this service may read")


_RESULT = re.compile(r"[A-Za-z0-9_-]{1,64}/video\.(mp4|webm|gif)")


def is_result(name: str) -> bool:
    """Whether a name relative to the store is a job's video (contract.result_name): never another job's input,
    or one user could feed another's video through the pipeline."""
    return bool(_RESULT.fullmatch(name))


def _loops(path: str) -> bool:
    """Whether `path` (from os.path.realpath, which leaves a symlink loop in place) ends in a loop."""
    try:
        os.stat(path)
    except OSError as exc:
        return exc.errno == errno.ELOOP
    return False


def _inside(path: str, folder: str) -> bool:
    """Whether resolved `path` is `folder` or under it."""
    return path == folder or path.startswith(folder if folder.endswith(os.sep) else folder + os.sep)


def parse_allow(spec: str) -> list[str]:
    """SVDQ_INPUT_ALLOW: `s3://BUCKET[/PREFIX]` and `file:///ABS/PATH` entries, comma-separated."""
    entries = [e.strip() for e in spec.split(",") if e.strip()]
    for entry in entries:
        parts = urlsplit(entry)
        if not ((parts.scheme == "s3" and parts.netloc) or (parts.scheme == "file" and parts.path.startswith("/"))):
            raise ConfigurationError(f"SVDQ_INPUT_ALLOW: {entry!r} is not s3://BUCKET[/PREFIX] or file:///ABS/PATH")
    return entries


@dataclass(frozen=True)
class Stored:
    key: str  # the object's key in its bucket, or its path under the store's root
    ref: str  # a URL any svdq process can read it back from


def content_name(data: bytes, suffix: str) -> str:
    """Content-addressed name for an input, so the same image is stored once."""
    return f"inputs/{hashlib.sha256(data).hexdigest()}{suffix}"


class ObjectStore(Protocol):
    url: str
    # An input of more bytes than this is looked for (`exists`) before it is written; a smaller one is written
    # straight away, where asking costs about what writing does (content-addressed: the same bytes, the same name).
    ask_first_above: int

    def put(self, name: str, data: bytes, content_type: str) -> Stored: ...
    def exists(self, name: str) -> bool: ...
    def may_read(self, ref: str) -> bool: ...
    def ref(self, name: str) -> str: ...
    def read(self, ref: str, limit: int | None = None) -> bytes: ...  # an input image (at most limit + 1 bytes)
    def read_key(self, key: str) -> bytes: ...  # what this store wrote under `key` (a job's video)
    def public_url(self, key: str) -> str | None: ...


class FileStore:
    """A folder on one machine: the embedded default, for a producer and workers on the same host."""

    ask_first_above = 0  # asking is one lstat: always ask

    def __init__(self, root: Path, allow: list[str] | None = None):
        self.root = root.resolve()
        self.url = self.root.as_uri()
        # Besides the store itself, folders images may be read from (SVDQ_INPUT_ALLOW's file:// entries).
        self.readable = [
            self.root,
            *(Path(unquote(urlsplit(a).path)).resolve() for a in allow or [] if a.startswith("file://")),
        ]

    def _path(self, name: str) -> Path:
        root = str(self.root)
        if (plain := self._plain(root, name)) is not None:
            return Path(plain)
        try:  # on strings: every submit resolves a name or two
            path = os.path.realpath(os.path.join(root, name))
        except ValueError:  # an embedded NUL byte
            raise InvalidReference(f"{name!r} is not a valid name") from None
        if _loops(path):
            raise InvalidReference(f"{name!r} is not a valid name")
        if not _inside(path, root):
            raise InvalidReference(f"{name!r} is outside the store")
        return Path(path)

    @staticmethod
    def _plain(root: str, name: str) -> str | None:
        """`root/name` when that is already resolved: a relative name of plain parts, none of them a link (the
        root is resolved once, at start). Two lstat calls for `inputs/HASH.png` instead of one per folder from
        /; None when realpath must decide."""
        parts = name.split("/")
        if not name or "\0" in name or any(p in ("", ".", "..") for p in parts):
            return None
        path = root
        for part in parts:
            path += "/" + part
            try:
                if stat.S_ISLNK(os.lstat(path).st_mode):
                    return None
            except FileNotFoundError:  # nothing below it exists either: no link to follow
                return f"{root}/{name}"
            except OSError:
                return None
        return path

    def put(self, name: str, data: bytes, content_type: str) -> Stored:
        path = self._path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Write beside and rename, so a reader never sees half a file.
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".part-")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return Stored(key=str(path.relative_to(self.root)), ref=path.as_uri())

    def exists(self, name: str) -> bool:
        try:
            return self._path(name).is_file()
        except OSError:  # a name over the file system's limit
            return False

    def may_read(self, ref: str) -> bool:
        """Whether `ref` is somewhere this store reads images from (not whether it exists). On strings rather
        than Paths, which cost three times as much: submit_many checks one reference per job."""
        parts = urlsplit(ref)
        if parts.scheme not in ("", "file"):
            return False
        root = str(self.root)
        try:
            if parts.scheme:
                path = os.path.realpath(unquote(parts.path))
                if _loops(path):
                    return False
            else:  # a bare name is a name in the store (never an absolute path, nor a way out of it)
                path = str(self._path(ref))
        except (ValueError, InvalidReference):  # an embedded NUL byte, outside the store, a loop
            return False
        if _inside(path, root) and is_result(path[len(root) + 1 :]):
            return False
        return any(_inside(path, str(folder)) for folder in self.readable)

    def ref(self, name: str) -> str:
        return self._path(name).as_uri()

    def read(self, ref: str, limit: int | None = None) -> bytes:
        parts = urlsplit(ref)
        if parts.scheme == "file":
            if not self.may_read(ref):
                raise not_readable(ref)
            path = Path(unquote(parts.path)).resolve()
        elif parts.scheme:
            raise InvalidReference(f"{parts.scheme}:// images need an s3:// SVDQ_STORAGE_URL")
        elif not self.may_read(ref):  # outside the store, a result, or not a name at all
            raise not_readable(ref)
        else:
            path = self._path(ref)
        return _read_file(path, ref, limit)

    def read_key(self, key: str) -> bytes:
        try:
            path = self._path(key)
        except InvalidReference:
            raise not_readable(key) from None
        return _read_file(path, key)

    def public_url(self, key: str) -> str | None:
        return (self.root / key).as_uri()

    def local_path(self, key: str) -> Path:
        """Where this store keeps `key` (inside it, or InvalidReference): for a server to send the file itself."""
        return self._path(key)


class S3Store:
    """Any S3-compatible store through boto3: AWS, MinIO, R2, moto."""

    # A HEAD is a round trip and about a millisecond of boto3's CPU, as a small PUT is: for a new image (the usual
    # case) asking first doubles both, for one seen before it saves only the bytes.
    ask_first_above = 256 * 1024

    def __init__(
        self,
        client: Any,
        bucket: str,
        prefix: str = "",
        presign_ttl: int = 3600,
        allow: list[str] | None = None,
        presigner: Any | None = None,
    ):
        self.s3 = client
        self.presigner = presigner if presigner is not None else client  # signs for the public endpoint
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.presign_ttl = presign_ttl
        self.url = f"s3://{bucket}/{self.prefix}"
        # (bucket, key prefix) pairs images may be read from: the store, and SVDQ_INPUT_ALLOW's s3:// entries.
        # A prefix ends at a "/", so s3://b/public does not open s3://b/publicity.
        self.readable = [(bucket, self.prefix)] + [
            (urlsplit(a).netloc, urlsplit(a).path.strip("/") + "/" if urlsplit(a).path.strip("/") else "")
            for a in allow or []
            if a.startswith("s3://")
        ]

    def allows(self, bucket: str, key: str) -> bool:
        if ".." in key.split("/") or (bucket == self.bucket and is_result(key.removeprefix(self.prefix))):
            return False
        return any(bucket == b and key.startswith(p) for b, p in self.readable)

    def may_read(self, ref: str) -> bool:
        """Whether `ref` is somewhere this store reads images from (not whether it exists)."""
        parts = urlsplit(ref)
        if parts.scheme == "s3":
            return self.allows(parts.netloc, parts.path.lstrip("/"))
        return not parts.scheme and not ref.startswith("/") and self.allows(self.bucket, self._key(ref))

    def _key(self, name: str) -> str:
        return self.prefix + name

    def put(self, name: str, data: bytes, content_type: str) -> Stored:
        key = self._key(name)
        with _s3_errors(key):
            self.s3.put_object(Bucket=self.bucket, Key=key, Body=data, ContentType=content_type)
        return Stored(key=key, ref=f"s3://{self.bucket}/{key}")

    def exists(self, name: str) -> bool:
        try:
            with _s3_errors(self._key(name)):
                self.s3.head_object(Bucket=self.bucket, Key=self._key(name))
        except ObjectNotFound:
            return False
        return True

    def ref(self, name: str) -> str:
        return f"s3://{self.bucket}/{self._key(name)}"

    def read(self, ref: str, limit: int | None = None) -> bytes:
        parts = urlsplit(ref)
        if parts.scheme == "s3":
            bucket, key = parts.netloc, parts.path.lstrip("/")
            if not self.allows(bucket, key):
                raise not_readable(ref)  # never asked of S3: the worker's credentials may reach other buckets
        elif parts.scheme:
            raise InvalidReference(f"{parts.scheme}:// images are not read by an s3:// store")
        elif not self.may_read(ref):
            raise not_readable(ref)
        else:
            bucket, key = self.bucket, self._key(ref)
        return self._get(bucket, key, limit, denied_is_missing=True)

    def read_key(self, key: str) -> bytes:
        return self._get(self.bucket, key)

    def _get(self, bucket: str, key: str, limit: int | None = None, *, denied_is_missing: bool = False) -> bytes:
        """The object's bytes, at most `limit` + 1 of them (enough to tell it is over). `denied_is_missing`: an
        input the worker may not read is a job's bad input, not an outage to wait out (S3 answers 403 for a
        missing key to credentials without s3:ListBucket)."""
        with _s3_errors(key, reading=True, denied_is_missing=denied_is_missing):
            body = self.s3.get_object(Bucket=bucket, Key=key)["Body"]
            try:
                return body.read() if limit is None else body.read(limit + 1)
            finally:
                body.close()

    def public_url(self, key: str) -> str | None:
        return self.presigner.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=self.presign_ttl
        )


# Answers to a read that no retry can change: the input is wrong, not the store away.
_MISSING = {"404", "NoSuchKey", "NotFound", "NoSuchBucket"}
_INVALID = {"InvalidBucketName", "KeyTooLongError", "InvalidArgument", "InvalidURI", "400"}
# Refusals that pass: a store starting up or overloaded, a clock not yet synchronised (the code sometimes comes
# without its HTTP status, which says the rest: 5xx, 429).
_BUSY = {"InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout", "RequestTimeTooSkewed", "Throttling"}


def _read_file(path: Path, ref: str, limit: int | None = None) -> bytes:
    try:
        with path.open("rb") as fh:
            return fh.read() if limit is None else fh.read(limit + 1)
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError):
        raise not_readable(ref) from None
    except OSError as exc:
        if exc.errno == errno.ENAMETOOLONG:  # permanent: retrying cannot shorten it
            raise not_readable(ref) from None
        raise


@contextmanager
def _s3_errors(key: str, *, reading: bool = False, denied_is_missing: bool = False) -> Iterator[None]:
    """Turn botocore's exceptions into the store's kinds: missing, invalid (reads), refused, unreachable."""
    from botocore.exceptions import (
        BotoCoreError,
        ClientError,
        NoCredentialsError,
        ParamValidationError,
        PartialCredentialsError,
    )

    try:
        yield
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if denied_is_missing and code in ("AccessDenied", "403"):
            raise not_readable(key) from None
        if code in _MISSING and reading:
            raise not_readable(key) from None
        if code in _MISSING and code != "NoSuchBucket":  # a write to no bucket: the operator's to fix
            raise ObjectNotFound(f"no object {key}") from None
        if reading and code in _INVALID:
            raise InvalidReference(f"not a readable object name ({code})") from None
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        raise StorageRefused(f"storage refused {key}: {code}", code, status) from None
    except (NoCredentialsError, PartialCredentialsError) as exc:  # nothing to retry until someone sets them
        raise StorageRefused(f"storage refused {key}: {exc}", type(exc).__name__) from None
    except ParamValidationError as exc:  # rejected by boto3 before sending: a bad bucket name, say
        raise InvalidReference(f"not a valid object reference: {exc}") from None
    except BotoCoreError as exc:
        raise StorageUnavailable(f"storage unreachable: {type(exc).__name__}") from None


def make_s3_client(settings: Settings, endpoint_url: str | None = None) -> Any:
    import boto3
    from botocore.config import Config

    # Short connect timeout so an outage is reported, not waited out; path-style for MinIO and friends.
    config = Config(
        connect_timeout=5,
        read_timeout=60,
        retries={"max_attempts": 3, "mode": "standard"},
        s3={"addressing_style": "path"} if (endpoint_url or settings.s3_endpoint_url) else {},
        # SigV4 for presigned URLs too: boto3 would otherwise sign them with SigV2, which newer AWS regions
        # and R2 refuse, and which carries no expiry of its own (X-Amz-Expires).
        signature_version="s3v4",
    )
    return boto3.client("s3", endpoint_url=endpoint_url or settings.s3_endpoint_url, config=config)


def open_store(settings: Settings, s3_client: Any | None = None) -> ObjectStore:
    parts = urlsplit(settings.storage_url)
    allow = parse_allow(settings.input_allow)
    if parts.scheme == "s3" and parts.netloc:
        client = s3_client if s3_client is not None else make_s3_client(settings)
        # Presigning is local (no request): a second client only to sign URLs for the address users reach.
        public = settings.s3_public_endpoint_url
        presigner = make_s3_client(settings, public) if public else None
        return S3Store(client, parts.netloc, parts.path, settings.presign_ttl, allow, presigner)
    # A file:// URL names no host: file://tmp/x (or file://~/x) would be the folder /x on host "tmp".
    if parts.scheme == "file" and parts.path.startswith("/") and parts.netloc in ("", "localhost"):
        return FileStore(Path(unquote(parts.path)), allow)
    raise ConfigurationError(
        f"SVDQ_STORAGE_URL must be s3://BUCKET[/PREFIX] or file:///ABS/PATH (three slashes, an absolute path), "
        f"not {settings.storage_url!r}"
    )
