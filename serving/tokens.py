"""Bearer tokens in files: the credentials of kubeml's model servers and routers.

Where it sits: in ``kubeml.serving``, below the servers (``kubeml.serving.server``, the
rollout router) that check tokens and the clients (``ServingManager``, the rollout's local
backend, ``ModelClient``) that send them. No web framework.

A token file holds one token per line (blank lines and ``#`` comments ignored), the shape
of a Kubernetes Secret key mounted as a file; several lines let a new token be rolled out
before the old one is removed. :class:`TokenFile` re-reads the file when it changes
(checked at most once a second), so a Secret update takes effect without a restart; a
file that becomes empty or unreadable refuses every token (fail closed).
"""

from __future__ import annotations

import hmac
import logging
import os
import secrets
import threading
import time
from pathlib import Path

from kubeml.errors import ConfigError

__all__ = ["MIN_TOKEN_CHARS", "TokenFile", "bearer", "first_token", "write_token_file"]

log = logging.getLogger("kubeml.serving")

#: Shortest token accepted: 16 characters of a URL-safe alphabet is ~96 bits.
MIN_TOKEN_CHARS = 16
#: Seconds between checks of a token file for changes (a stat, not a read).
RELOAD_CHECK_S = 1.0


def bearer(header: str | None) -> str | None:
    """The token of an ``Authorization: Bearer TOKEN`` value, or None.

    >>> bearer("Bearer abc"), bearer("bearer  abc "), bearer("Basic abc"), bearer(None)
    ('abc', 'abc', None, None)
    """
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


class TokenFile:
    """The tokens in ``path``, re-read when the file changes.

    Raises :class:`~kubeml.errors.ConfigError` at construction when the file is missing,
    empty or holds a token shorter than :data:`MIN_TOKEN_CHARS`: a server must not start
    believing it is protected when it is not.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._checked = 0.0
        self._stamp: tuple | None = None
        try:
            self._tokens = self._read()
        except OSError as exc:
            raise ConfigError(f"token file {self.path}: {exc.strerror or exc}") from exc
        if not self._tokens:
            raise ConfigError(f"token file {self.path} holds no token; write one per line")
        self._stamp = self._stat()

    def _stat(self) -> tuple | None:
        try:
            st = os.stat(self.path)  # follows the symlinks a mounted Secret swaps atomically
        except OSError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def _read(self) -> tuple[str, ...]:
        lines = self.path.read_text().splitlines()
        tokens = tuple(t for t in (line.strip() for line in lines) if t and not t.startswith("#"))
        short = [t for t in tokens if len(t) < MIN_TOKEN_CHARS]
        if short:
            raise ConfigError(
                f"token file {self.path}: {len(short)} token(s) shorter than {MIN_TOKEN_CHARS} "
                "characters; generate them with e.g. `openssl rand -hex 32`"
            )
        return tokens

    def tokens(self) -> tuple[str, ...]:
        now = time.monotonic()
        if now - self._checked < RELOAD_CHECK_S:
            return self._tokens
        with self._lock:
            self._checked = now
            stamp = self._stat()
            if stamp != self._stamp:
                self._stamp = stamp
                try:
                    self._tokens = self._read()
                except (OSError, ConfigError) as exc:
                    self._tokens = ()
                    log.error("token file %s unusable, refusing every request: %s", self.path, exc)
                else:
                    log.info("token file %s reloaded: %d token(s)", self.path, len(self._tokens))
        return self._tokens

    def accepts(self, token: str | None) -> bool:
        """True when ``token`` is one of the file's tokens (constant time per token)."""
        if not token:
            return False
        given = token.encode()
        # No early exit: the time taken does not tell which token matched.
        return sum(hmac.compare_digest(given, t.encode()) for t in self.tokens()) > 0


def write_token_file(path: str | Path) -> Path:
    """A new random token (256 bits) in ``path``, readable by this user only (0600).

    The file is created afresh (``O_EXCL`` after removing any old one), so a copy left
    with wider permissions is never reused.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(secrets.token_urlsafe(32) + "\n")
    return path


def first_token(path: str | Path) -> str:
    """The first token of a token file: what a client sends (ConfigError if none)."""
    return TokenFile(path).tokens()[0]
