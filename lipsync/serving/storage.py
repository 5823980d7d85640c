"""Where uploads and results live: a folder or an S3-compatible bucket.

Keys are ours (``uploads/<job id>/video.mp4``, ``results/<job id>.mp4``), one fixed key per job's
result, so a retried job writes the same object again instead of a second one.

* :class:`FileStorage` writes a temporary file beside the target, fsyncs it and renames it into
  place (then fsyncs the folder): readers see the whole object or none; a crash leaves at most a
  ``.tmp-`` file, never a partial object under the real key.
* :class:`S3Storage` (boto3): a PUT (or a completed multipart upload) is atomic in S3.

Uploads are stored before their job row is committed, so a job in the database always has its
inputs, whatever process restarts.
"""

from __future__ import annotations

import abc
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlsplit

from lipsync.errors import ConfigError, LipSyncError

CHUNK = 1024 * 1024


class StorageError(LipSyncError):
    """An object is missing or the store refused an operation."""


def _check_key(key: str) -> str:
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in key.split("/")):
        raise StorageError(f"invalid storage key {key!r}")
    return key


class Storage(abc.ABC):
    """The operations the service needs; keys are relative POSIX paths."""

    url: str

    @abc.abstractmethod
    def put_file(self, key: str, path: str | os.PathLike) -> None:
        """Store the file at ``path`` under ``key``, atomically (replaces an existing one)."""

    @abc.abstractmethod
    def put_fileobj(self, key: str, fileobj: BinaryIO) -> None:
        """Store a readable binary stream under ``key``, atomically."""

    @abc.abstractmethod
    def get_file(self, key: str, path: str | os.PathLike) -> None:
        """Copy the object to the local file ``path``."""

    @abc.abstractmethod
    def iter_chunks(self, key: str, chunk_size: int = CHUNK) -> Iterator[bytes]:
        """The object's bytes, streamed."""

    @abc.abstractmethod
    def size(self, key: str) -> int | None:
        """Bytes, or None if there is no such object."""

    def exists(self, key: str) -> bool:
        return self.size(key) is not None

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Remove the object (no error if it is absent)."""

    @abc.abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """All object names under ``prefix`` (temporary files included), sorted."""

    def local_path(self, key: str) -> Path | None:
        """A local path to read the object from directly, if the store has one."""
        return None

    def check(self) -> None:  # noqa: B027 - optional readiness probe
        """Raise if the store is unreachable."""


class FileStorage(Storage):
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.url = self.root.as_uri()

    def _path(self, key: str) -> Path:
        return self.root / _check_key(key)

    def _atomic(self, key: str, write) -> None:
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex}"
        try:
            with open(tmp, "wb") as out:
                write(out)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def put_file(self, key: str, path: str | os.PathLike) -> None:
        with open(path, "rb") as src:
            self._atomic(key, lambda out: shutil.copyfileobj(src, out, CHUNK))

    def put_fileobj(self, key: str, fileobj: BinaryIO) -> None:
        self._atomic(key, lambda out: shutil.copyfileobj(fileobj, out, CHUNK))

    def get_file(self, key: str, path: str | os.PathLike) -> None:
        src = self._path(key)
        if not src.is_file():
            raise StorageError(f"no object {key!r} in {self.url}")
        shutil.copyfile(src, path)

    def iter_chunks(self, key: str, chunk_size: int = CHUNK) -> Iterator[bytes]:
        path = self._path(key)
        try:
            f = open(path, "rb")  # noqa: SIM115 - closed by the generator
        except FileNotFoundError:
            raise StorageError(f"no object {key!r} in {self.url}") from None

        def gen() -> Iterator[bytes]:
            with f:
                while block := f.read(chunk_size):
                    yield block

        return gen()

    def size(self, key: str) -> int | None:
        try:
            return self._path(key).stat().st_size
        except FileNotFoundError:
            return None

    def delete(self, key: str) -> None:
        """Remove the object, and the folders it leaves empty (``uploads/<job id>/``)."""
        path = self._path(key)
        path.unlink(missing_ok=True)
        for folder in path.parents:
            if folder == self.root or self.root not in folder.parents:
                break
            try:
                folder.rmdir()
            except OSError:  # not empty (or already gone): the folders above are not empty
                break

    def list(self, prefix: str = "") -> list[str]:
        base = self.root
        out = []
        for path in base.rglob("*"):
            if path.is_file():
                rel = path.relative_to(base).as_posix()
                if rel.startswith(prefix):
                    out.append(rel)
        return sorted(out)

    def local_path(self, key: str) -> Path | None:
        return self._path(key)

    def check(self) -> None:
        if not os.access(self.root, os.W_OK):
            raise StorageError(f"storage folder is not writable: {self.root}")


def s3_client(endpoint_url: str | None = None, region: str = "us-east-1"):
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=endpoint_url,
        region_name=region,
        config=Config(retries={"max_attempts": 5, "mode": "standard"}),
    )


class S3Storage(Storage):
    def __init__(
        self, bucket: str, prefix: str = "", endpoint_url: str | None = None,
        region: str = "us-east-1", client=None,
    ):  # fmt: skip
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.client = client or s3_client(endpoint_url, region)
        self.url = f"s3://{bucket}/{self.prefix}"

    def _key(self, key: str) -> str:
        return self.prefix + _check_key(key)

    def put_file(self, key: str, path: str | os.PathLike) -> None:
        self.client.upload_file(str(path), self.bucket, self._key(key))

    def put_fileobj(self, key: str, fileobj: BinaryIO) -> None:
        self.client.upload_fileobj(fileobj, self.bucket, self._key(key))

    def get_file(self, key: str, path: str | os.PathLike) -> None:
        from botocore.exceptions import ClientError

        try:
            self.client.download_file(self.bucket, self._key(key), str(path))
        except ClientError as exc:
            raise StorageError(f"cannot read {key!r} from {self.url}: {exc}") from None

    def iter_chunks(self, key: str, chunk_size: int = CHUNK) -> Iterator[bytes]:
        from botocore.exceptions import ClientError

        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]
        except ClientError as exc:
            raise StorageError(f"cannot read {key!r} from {self.url}: {exc}") from None

        def gen() -> Iterator[bytes]:
            try:
                yield from body.iter_chunks(chunk_size)
            finally:
                body.close()

        return gen()

    def size(self, key: str) -> int | None:
        from botocore.exceptions import ClientError

        try:
            head = self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise
        return int(head["ContentLength"])

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def list(self, prefix: str = "") -> list[str]:
        out = []
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix + prefix):
            out += [o["Key"][len(self.prefix) :] for o in page.get("Contents", [])]
        return sorted(out)

    def check(self) -> None:
        self.client.head_bucket(Bucket=self.bucket)


def parse_s3_url(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    if parts.scheme != "s3" or not parts.netloc:
        raise ConfigError(f"not an s3:// URL: {url!r}")
    return parts.netloc, parts.path.lstrip("/")


def open_storage(settings) -> Storage:
    """The store named by ``settings.storage_url`` (``file://``, a path, or ``s3://``)."""
    url = settings.storage_url
    if url.startswith("s3://"):
        bucket, prefix = parse_s3_url(url)
        return S3Storage(bucket, prefix, settings.s3_endpoint_url, settings.s3_region)
    if url.startswith("file://"):
        parts = urlsplit(url)
        path = (parts.netloc + parts.path) if parts.netloc in ("", ".", "..") else parts.path
        return FileStorage(path or ".")
    if "://" in url:
        raise ConfigError(f"unsupported storage URL {url!r}: use file:///path or s3://bucket")
    return FileStorage(url)
