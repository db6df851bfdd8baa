"""A bounded on-disk spool for payload records that the sink could not take yet.

Where it sits: in ``kubeml.serving.telemetry``, used by :class:`~.payload.PayloadLogger`'s
Kafka writer. While the broker is down (or the client's buffer is full), records are
appended here instead of being dropped; once the broker answers again they are sent again
and a segment is deleted only after every record in it has been acknowledged, or put back
into the spool. The spool survives a restart of the server: a new logger on the same
directory sends what the previous one left. A crash between a record's acknowledgement
and its segment's deletion sends it twice (records carry their ``request_id`` for
de-duplication); nothing within the bound is lost.

Layout: ``DIR/NNNNNNNNNNNN.jsonl`` segments, one record (compact JSON) per line, oldest
first by number. The total size is bounded (``max_bytes``); a record that does not fit is
refused and the caller counts it as dropped. All methods are called from one thread (the
logger's writer), so the spool takes no locks.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

__all__ = ["PayloadSpool"]

log = logging.getLogger("kubeml.serving.telemetry")

_SUFFIX = ".jsonl"


class PayloadSpool:
    """Append-only segments of JSONL under ``directory``, at most ``max_bytes`` in all.

    >>> import tempfile
    >>> spool = PayloadSpool(tempfile.mkdtemp(), max_bytes=64)
    >>> spool.append(b'{"request_id":"a"}'), spool.append(b'{"request_id":"b"}'), spool.append(b"x" * 64)
    (True, True, False)
    >>> segment, records = spool.take()
    >>> records, spool.records
    ([b'{"request_id":"a"}', b'{"request_id":"b"}'], 2)
    >>> spool.waiting
    0
    >>> spool.done(segment); spool.records, spool.take()
    (0, None)
    """

    #: A segment is sealed (and may be replayed) once it holds this many bytes; replaying a
    #: segment puts all its records in the Kafka client's buffer at once.
    SEGMENT_BYTES = 256 * 1024

    def __init__(self, directory: str | Path, *, max_bytes: int):
        if max_bytes <= 0:
            raise ValueError(f"payload spool max_bytes must be positive, got {max_bytes}")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self._sizes: dict[Path, int] = {}
        self._counts: dict[Path, int] = {}
        self._taken: set[Path] = set()
        #: Records cut off a segment's end at start (a crash mid-write): lost, for the
        #: caller to count.
        self.torn = 0
        for path in sorted(self.directory.glob(f"*{_SUFFIX}")):
            self._recover(path)
        self._next = 1 + max((int(p.stem) for p in self._sizes if p.stem.isdigit()), default=0)
        self._current: Path | None = None
        self._out = None

    # -- state ------------------------------------------------------------------------------

    @property
    def bytes(self) -> int:
        """Bytes held, in every segment (taken ones too, until :meth:`done`)."""
        return sum(self._sizes.values())

    @property
    def records(self) -> int:
        """Records held, in every segment (taken ones too, until :meth:`done`)."""
        return sum(self._counts.values())

    @property
    def waiting(self) -> int:
        """Records held and not yet taken for sending."""
        return sum(n for p, n in self._counts.items() if p not in self._taken)

    # -- writing ----------------------------------------------------------------------------

    def append(self, value: bytes) -> bool:
        """Spool one record; False when it would take the spool over ``max_bytes``."""
        if b"\n" in value:
            raise ValueError("a spooled record must be one line of JSON")
        size = len(value) + 1
        if self.bytes + size > self.max_bytes:
            return False
        if self._out is None or self._sizes[self._current] >= self.SEGMENT_BYTES:
            self._open_segment()
        self._out.write(value + b"\n")
        self._sizes[self._current] += size
        self._counts[self._current] += 1
        return True

    def flush(self) -> None:
        """Hand appended records to the OS: a crash of this process keeps them."""
        if self._out is not None:
            self._out.flush()

    def close(self) -> None:
        """Seal the open segment, on disk (fsync): a crash of the machine keeps it too."""
        if self._out is not None:
            self._out.flush()
            os.fsync(self._out.fileno())
            self._out.close()
            self._out = None
            self._current = None

    # -- replaying --------------------------------------------------------------------------

    def take(self) -> tuple[Path, list[bytes]] | None:
        """The oldest segment not already taken and its records, or None when there is none.

        The segment stays on disk until :meth:`done`; records sent from it that fail again
        go back through :meth:`append`.
        """
        candidates = sorted(p for p in self._sizes if p not in self._taken)
        if not candidates:
            return None
        path = candidates[0]
        if path == self._current:
            self.close()  # sealed: nothing more is appended to a segment being replayed
        with open(path, "rb") as f:
            records = [line for line in f.read().split(b"\n") if line]
        self._taken.add(path)
        return path, records

    def done(self, segment: Path) -> None:
        """Every record of ``segment`` is delivered or spooled again: delete it."""
        segment.unlink(missing_ok=True)
        self._taken.discard(segment)
        self._sizes.pop(segment, None)
        self._counts.pop(segment, None)

    # -- internals --------------------------------------------------------------------------

    def _open_segment(self) -> None:
        self.close()
        path = self.directory / f"{self._next:012d}{_SUFFIX}"
        self._next += 1
        self._out = open(path, "ab")
        self._current = path
        self._sizes[path] = 0
        self._counts[path] = 0

    def _recover(self, path: Path) -> None:
        """Adopt a segment a previous process left; a torn last line (a crash mid-write)
        is cut off and reported."""
        data = path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data):
            log.warning("payload spool %s: dropping a torn record of %d bytes at the end",
                        path, len(data) - end)  # fmt: skip
            self.torn += 1
            with open(path, "r+b") as f:
                f.truncate(end)
            data = data[:end]
        if not data:
            path.unlink(missing_ok=True)
            return
        self._sizes[path] = len(data)
        self._counts[path] = data.count(b"\n")
