"""Artifact store: one small interface over ``file://`` and ``s3://``.

Datasets, checkpoints, model bundles, run ledgers and the KFP pipeline root all live in
the store named by ``artifact_store.uri``. Keys are ``/``-separated relative paths; a key
never escapes the store's root (``..`` and absolute keys are refused).

Writes are atomic on both backends: a file store writes to a temporary name and renames,
and an S3 PUT is atomic by nature. A reader never sees half an artifact.
"""

from __future__ import annotations

import os
import shutil
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse

from kubeml._files import atomic_write_bytes
from kubeml.errors import ArtifactError, ArtifactNotFound, ConfigError

__all__ = ["ArtifactStore", "FileStore", "S3Store", "open_store"]


def _clean_key(key: str) -> str:
    if not isinstance(key, str) or not key.strip("/"):
        raise ArtifactError(f"invalid artifact key {key!r}: must be a non-empty relative path")
    p = PurePosixPath(key)
    if p.is_absolute() or ".." in p.parts:
        raise ArtifactError(f"invalid artifact key {key!r}: absolute paths and '..' are not allowed")
    return str(p).strip("/")


def _confined(root: Path, key: str, relative: str) -> Path:
    """``root / relative``, refusing a path that would leave ``root`` (or go through a link out of it)."""
    parts = relative.split("/")
    if not relative or relative.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\x00" in relative:
        raise ArtifactError(f"refusing to download {key!r}: its path {relative!r} is not a plain relative path")
    target = root.joinpath(*parts)
    # resolve() follows links already present under root: one pointing outside is caught here.
    if not target.resolve().is_relative_to(root):
        raise ArtifactError(f"refusing to download {key!r}: {target} leads outside {root}")
    return target


class ArtifactStore(ABC):
    """A flat key -> bytes store with directory helpers."""

    uri: str
    """Root URI of the store (``file:///abs/path`` or ``s3://bucket/prefix``)."""

    def url(self, key: str) -> str:
        """Full URI of ``key``."""
        return f"{self.uri.rstrip('/')}/{_clean_key(key)}"

    @abstractmethod
    def put_bytes(self, key: str, data: bytes) -> str: ...

    @abstractmethod
    def get_bytes(self, key: str) -> bytes: ...

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """Keys under ``prefix`` (recursively), sorted."""

    @abstractmethod
    def delete(self, prefix: str) -> int:
        """Delete ``prefix`` and everything under it; returns the number of objects removed."""

    def put_file(self, key: str, path: str | Path) -> str:
        return self.put_bytes(key, Path(path).read_bytes())

    def get_file(self, key: str, dest: str | Path) -> Path:
        """Download ``key`` to ``dest`` atomically (a symlink at ``dest`` is replaced, never followed)."""
        return atomic_write_bytes(dest, self.get_bytes(key), fsync=False)

    def put_text(self, key: str, text: str) -> str:
        return self.put_bytes(key, text.encode())

    def get_text(self, key: str) -> str:
        return self.get_bytes(key).decode()

    def put_dir(self, prefix: str, directory: str | Path) -> str:
        """Upload every file under ``directory`` to ``prefix/``; returns the prefix URL."""
        directory = Path(directory)
        if not directory.is_dir():
            raise ArtifactError(f"{directory} is not a directory")
        prefix = _clean_key(prefix)
        entries = sorted(directory.rglob("*"))
        # A link would upload whatever it points at (a key file, /etc/shadow): refuse it.
        links = [str(f) for f in entries if f.is_symlink()]
        if links:
            raise ArtifactError(f"refusing to upload {directory}: it contains symbolic links ({', '.join(links[:3])})")
        for f in entries:
            if f.is_file():
                self.put_file(f"{prefix}/{f.relative_to(directory).as_posix()}", f)
        return self.url(prefix)

    def get_dir(self, prefix: str, dest: str | Path) -> Path:
        """Download everything under ``prefix/`` into ``dest``."""
        prefix = _clean_key(prefix)
        keys = self.list(prefix)
        if not keys:
            raise ArtifactNotFound(f"nothing stored under {self.url(prefix)}")
        dest = Path(dest)
        root = dest.resolve()
        # Every target is checked before anything is written: a hostile key (S3 keys may hold
        # "//", ".." or a leading "/") must not write one byte outside ``dest``.
        targets = [(k, _confined(root, k, k[len(prefix) + 1 :] if k != prefix else PurePosixPath(k).name))
                   for k in keys]
        for key, target in targets:
            self.get_file(key, target)
        return dest

    def walk(self, prefix: str = "") -> Iterator[str]:
        yield from self.list(prefix)

    def local_path(self, key: str) -> Path | None:
        """A local filesystem path for ``key`` if the store is local, else None."""
        return None


class FileStore(ArtifactStore):
    """Artifacts as files under a local directory (the default, ``.kubeml/artifacts``)."""

    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.uri = "file://" + str(self.root)

    def _path(self, key: str) -> Path:
        return self.root / _clean_key(key)

    def local_path(self, key: str) -> Path:
        return self._path(key)

    def put_bytes(self, key: str, data: bytes) -> str:
        atomic_write_bytes(self._path(key), data)
        return self.url(key)

    def get_bytes(self, key: str) -> bytes:
        path = self._path(key)
        if not path.is_file():
            raise ArtifactNotFound(f"no artifact at {self.url(key)}")
        return path.read_bytes()

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str = "") -> list[str]:
        base = self._path(prefix) if prefix.strip("/") else self.root
        if base.is_file():
            return [_clean_key(prefix)]
        if not base.is_dir():
            return []
        return sorted(
            f.relative_to(self.root).as_posix()
            for f in base.rglob("*")
            if f.is_file() and not f.name.endswith(".tmp")
        )

    def delete(self, prefix: str) -> int:
        path = self._path(prefix)
        if path.is_file():
            path.unlink()
            return 1
        if path.is_dir():
            n = sum(1 for f in path.rglob("*") if f.is_file())
            shutil.rmtree(path)
            return n
        return 0


class S3Store(ArtifactStore):
    """Artifacts as S3 objects under ``s3://bucket/prefix``.

    Credentials come from boto3's default chain: on EKS that is IRSA (the pod's service
    account web identity), on a laptop the usual profile or environment variables.
    ``endpoint_url`` points at an S3-compatible server (moto in tests, MinIO on-prem).
    """

    def __init__(self, uri: str, *, endpoint_url: str | None = None, sse_kms_key_id: str | None = None):
        import boto3
        from botocore.config import Config

        parsed = urlparse(uri)
        if parsed.scheme != "s3" or not parsed.netloc:
            raise ConfigError(f"invalid S3 URI {uri!r}; expected s3://BUCKET[/PREFIX]")
        self.bucket = parsed.netloc
        self.prefix = parsed.path.strip("/")
        self.uri = f"s3://{self.bucket}" + (f"/{self.prefix}" if self.prefix else "")
        self.endpoint_url = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3")
        self.sse_kms_key_id = sse_kms_key_id
        # Standard retry mode: S3 throttles (503 SlowDown) under load; 5 attempts with backoff.
        self._s3 = boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            config=Config(retries={"max_attempts": 5, "mode": "standard"}),
        )

    def _key(self, key: str) -> str:
        key = _clean_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _call(self, what: str, fn, **kwargs):
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(**kwargs)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("NoSuchKey", "404", "NotFound"):
                raise ArtifactNotFound(f"no artifact at s3://{self.bucket}/{kwargs.get('Key', '')}") from exc
            if code == "NoSuchBucket":
                raise ArtifactError(f"bucket {self.bucket!r} does not exist; create it or fix artifact_store.uri") from exc
            raise ArtifactError(f"S3 {what} failed ({code}): {exc}") from exc
        except BotoCoreError as exc:
            raise ArtifactError(f"S3 {what} failed: {exc}") from exc

    def put_bytes(self, key: str, data: bytes) -> str:
        extra = {}
        if self.sse_kms_key_id:
            extra = {"ServerSideEncryption": "aws:kms", "SSEKMSKeyId": self.sse_kms_key_id}
        self._call("put", self._s3.put_object, Bucket=self.bucket, Key=self._key(key), Body=data, **extra)
        return self.url(key)

    def get_bytes(self, key: str) -> bytes:
        resp = self._call("get", self._s3.get_object, Bucket=self.bucket, Key=self._key(key))
        return resp["Body"].read()

    def exists(self, key: str) -> bool:
        try:
            self._call("head", self._s3.head_object, Bucket=self.bucket, Key=self._key(key))
        except ArtifactNotFound:
            return False
        return True

    def list(self, prefix: str = "") -> list[str]:
        full = self._key(prefix) if prefix.strip("/") else self.prefix
        # A trailing slash keeps "runs/a" from matching "runs/ab/...".
        query = f"{full}/" if full else ""
        paginator = self._s3.get_paginator("list_objects_v2")
        keys = []
        from botocore.exceptions import ClientError

        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=query):
                keys.extend(o["Key"] for o in page.get("Contents", []))
        except ClientError as exc:
            raise ArtifactError(f"S3 list of s3://{self.bucket}/{query} failed: {exc}") from exc
        if full and self.exists(prefix):
            keys.append(full)
        strip = len(self.prefix) + 1 if self.prefix else 0
        return sorted(k[strip:] for k in keys)

    def delete(self, prefix: str) -> int:
        keys = self.list(prefix)
        # DeleteObjects takes at most 1000 keys per call.
        for i in range(0, len(keys), 1000):
            batch = [{"Key": self._key(k)} for k in keys[i : i + 1000]]
            self._call("delete", self._s3.delete_objects, Bucket=self.bucket, Delete={"Objects": batch})
        return len(keys)


def open_store(uri: str, *, endpoint_url: str | None = None, sse_kms_key_id: str | None = None) -> ArtifactStore:
    """Open the store for ``uri`` (``file://PATH`` or ``s3://BUCKET/PREFIX``).

    ``endpoint_url`` and ``sse_kms_key_id`` apply to S3 only: an S3-compatible endpoint, and
    the KMS key every object is written with (SSE-KMS).
    """
    if uri.startswith("file://"):
        if sse_kms_key_id:
            raise ConfigError("artifact_store.sse_kms_key_id applies to s3:// stores only; remove it for a file:// store")
        return FileStore(uri[len("file://") :])
    if uri.startswith("s3://"):
        return S3Store(uri, endpoint_url=endpoint_url, sse_kms_key_id=sse_kms_key_id)
    raise ConfigError(f"unsupported artifact store URI {uri!r}; allowed schemes: file://, s3://")
