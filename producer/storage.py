"""Where input images and finished videos live: any S3-compatible store, or a local folder.

Names given to a store are relative to its prefix (`inputs/<sha256>.png`, `<job id>/video.mp4`);
references in requests are full URLs (`s3://bucket/key`, `file:///path`) or such names.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import unquote, urlsplit

from producer.settings import Settings


class StorageUnavailable(RuntimeError):
    """The store could not be reached or refused a well-formed request; worth retrying later."""


class ObjectNotFound(LookupError):
    pass


class InvalidReference(ValueError):
    """A reference this store will not read (wrong scheme, or a path outside the store)."""


@dataclass(frozen=True)
class Stored:
    key: str  # the object's key in its bucket, or its path under the store's root
    ref: str  # a URL any svdq process can read it back from


def content_name(data: bytes, suffix: str) -> str:
    """Content-addressed name for an input, so the same image is stored once."""
    return f"inputs/{hashlib.sha256(data).hexdigest()}{suffix}"


class ObjectStore(Protocol):
    url: str

    def put(self, name: str, data: bytes, content_type: str) -> Stored: ...
    def exists(self, name: str) -> bool: ...
    def ref(self, name: str) -> str: ...
    def read(self, ref: str) -> bytes: ...
    def read_key(self, key: str) -> bytes: ...
    def public_url(self, key: str) -> str | None: ...


class FileStore:
    """A folder on one machine: the embedded default, for a producer and workers on the same host."""

    def __init__(self, root: Path):
        self.root = root.resolve()
        self.url = self.root.as_uri()

    def _path(self, name: str) -> Path:
        path = (self.root / name).resolve()
        if not path.is_relative_to(self.root):
            raise InvalidReference(f"{name!r} is outside the store")
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
        return self._path(name).is_file()

    def ref(self, name: str) -> str:
        return self._path(name).as_uri()

    def read(self, ref: str) -> bytes:
        parts = urlsplit(ref)
        if parts.scheme == "file":
            path = Path(unquote(parts.path)).resolve()
            if not path.is_relative_to(self.root):
                raise InvalidReference("file:// images must be inside the configured store")
        elif parts.scheme:
            raise InvalidReference(f"{parts.scheme}:// images need an s3:// SVDQ_STORAGE_URL")
        else:
            path = self._path(ref)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise ObjectNotFound(f"no image at {ref}") from None

    def read_key(self, key: str) -> bytes:
        return self.read(key)

    def public_url(self, key: str) -> str | None:
        return (self.root / key).as_uri()


class S3Store:
    """Any S3-compatible store through boto3: AWS, MinIO, R2, moto."""

    def __init__(self, client: Any, bucket: str, prefix: str = "", presign_ttl: int = 3600):
        self.s3 = client
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.presign_ttl = presign_ttl
        self.url = f"s3://{bucket}/{self.prefix}"

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

    def read(self, ref: str) -> bytes:
        parts = urlsplit(ref)
        if parts.scheme == "s3":
            bucket, key = parts.netloc, parts.path.lstrip("/")
        elif parts.scheme:
            raise InvalidReference(f"{parts.scheme}:// images are not read by an s3:// store")
        else:
            bucket, key = self.bucket, self._key(ref)
        with _s3_errors(key):
            return self.s3.get_object(Bucket=bucket, Key=key)["Body"].read()

    def read_key(self, key: str) -> bytes:
        return self.read(f"s3://{self.bucket}/{key}")

    def public_url(self, key: str) -> str | None:
        return self.s3.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=self.presign_ttl
        )


@contextmanager
def _s3_errors(key: str) -> Iterator[None]:
    """Turn botocore's exceptions into the store's three kinds: missing, refused, unreachable."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        yield
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in {"404", "NoSuchKey", "NotFound"}:
            raise ObjectNotFound(f"no object {key}") from None
        raise StorageUnavailable(f"storage refused {key}: {code}") from None
    except BotoCoreError as exc:
        raise StorageUnavailable(f"storage unreachable: {type(exc).__name__}") from None


def make_s3_client(settings: Settings) -> Any:
    import boto3
    from botocore.config import Config

    # Short connect timeout so an outage is reported, not waited out; path-style for MinIO and friends.
    config = Config(
        connect_timeout=5,
        read_timeout=60,
        retries={"max_attempts": 3, "mode": "standard"},
        s3={"addressing_style": "path"} if settings.s3_endpoint_url else {},
        # SigV4 for presigned URLs too: boto3 would otherwise sign them with SigV2, which newer AWS regions
        # and R2 refuse, and which carries no expiry of its own (X-Amz-Expires).
        signature_version="s3v4",
    )
    return boto3.client("s3", endpoint_url=settings.s3_endpoint_url, config=config)


def open_store(settings: Settings, s3_client: Any | None = None) -> ObjectStore:
    parts = urlsplit(settings.storage_url)
    if parts.scheme == "s3" and parts.netloc:
        client = s3_client if s3_client is not None else make_s3_client(settings)
        return S3Store(client, parts.netloc, parts.path, settings.presign_ttl)
    if parts.scheme == "file" and parts.path.startswith("/"):
        return FileStore(Path(unquote(parts.path)))
    raise ValueError(f"SVDQ_STORAGE_URL must be s3://BUCKET[/PREFIX] or file:///ABS/PATH, not {settings.storage_url!r}")
