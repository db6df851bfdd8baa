"""Hashing and atomic writes: the one copy for the whole package.

Atomic means a reader sees the old content or the new, never a half-written file: the data
goes to a temporary file in the same directory (same filesystem), is flushed to disk, then
``os.replace``-d over the target.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

__all__ = ["atomic_write_bytes", "atomic_write_text", "read_reference", "sha256_file"]

#: Bytes read per step while hashing: big enough to be fast, small enough for a 1 GB file.
_HASH_CHUNK = 1 << 20


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file's content, read in 1 MiB chunks.

    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "x"
    >>> _ = p.write_bytes(b"abc")
    >>> sha256_file(p)[:16]
    'ba7816bf8f01cfea'
    """
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(_HASH_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def atomic_write_bytes(path: str | Path, data: bytes, *, fsync: bool = True) -> Path:
    """Write ``data`` to ``path`` atomically (creating parent directories); returns the path.

    ``fsync=False`` skips the flush to disk for small state files that are rewritten often
    and cheap to lose on a power cut (routes, server state): atomicity still holds.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str, *, fsync: bool = True) -> Path:
    """:func:`atomic_write_bytes` for UTF-8 text."""
    return atomic_write_bytes(path, text.encode("utf-8"), fsync=fsync)


def read_reference(ref: str, what: str) -> bytes:
    """The secret a config key points at: ``env:NAME`` (the variable's value) or ``file:PATH``.

    ``what`` names the key in the errors (a :class:`~kubeml.errors.ConfigError`): an unset
    variable, an unreadable file, or a value that is not a reference at all.
    """
    from kubeml.errors import ConfigError

    if ref.startswith("env:"):
        name = ref[len("env:"):]
        value = os.environ.get(name)
        if not value:
            raise ConfigError(f"{what} {ref!r}: environment variable {name} is not set")
        return value.encode()
    if ref.startswith("file:"):
        path = Path(ref[len("file://"):] if ref.startswith("file://") else ref[len("file:"):])
        try:
            return path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"{what} {ref!r}: cannot read {path}: {exc.strerror}") from None
    raise ConfigError(f"{what} {ref!r}: give a reference, file:PATH or env:NAME (never the secret itself)")
