"""Processes and ports: starting-state probes, liveness, stopping groups, free ports.

The one copy of these helpers for the whole package (servers, routers, rollout engines and
the control-plane harness all use it). One liveness rule everywhere:

- a pid whose process has exited (or is a zombie) is dead;
- when the caller recorded the process's start time (``/proc/<pid>/stat`` field 22), a
  different start time means the pid was reused by another process: dead;
- when the caller knows what the process runs, a ``marker`` that its command line must
  contain tells a kubeml process apart from an unrelated one that reused the pid.

Where there is no ``/proc`` (macOS) signal 0 checks existence only.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = [
    "free_port",
    "free_ports",
    "group_alive",
    "log_tail",
    "pid_alive",
    "port_free",
    "udp_port_free",
    "reap",
    "spawn",
    "start_time",
    "terminate_group",
]

#: Seconds a process group gets between SIGTERM and SIGKILL: a model server finishes its
#: in-flight requests and flushes its payload log in well under this on 2 cores.
STOP_GRACE_S = 10.0
#: Seconds to wait for a SIGKILLed group to disappear (the kernel reaps it promptly).
_KILL_WAIT_S = 5.0
_POLL_S = 0.1


def _stat_fields(pid: int) -> list[str] | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may contain spaces; split after it.
    try:
        return stat.rsplit(")", 1)[1].split()
    except IndexError:
        return None


def start_time(pid: int) -> int | None:
    """Clock ticks since boot at which ``pid`` started; None when it is gone or a zombie."""
    fields = _stat_fields(pid)
    if fields is None or fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def reap(pid: int) -> bool:
    """Collect ``pid`` if it is our exited child; True when it was reaped now."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == pid
    except ChildProcessError:  # not our child (started by another process) or already reaped
        return False


def pid_alive(pid: int, *, started: int | None = None, marker: str | None = None) -> bool:
    """True if ``pid`` runs, is not a zombie, and is the process the caller means.

    ``started``: the start time recorded when it was launched (see :func:`start_time`);
    ``marker``: a string its command line must contain. Our own exited children are reaped
    on the way, so a long-lived parent does not collect zombies.
    """
    if pid <= 0:
        return False
    if reap(pid):
        return False
    if Path("/proc").is_dir():
        begun = start_time(pid)
        if begun is None or (started is not None and begun != started):
            return False
        if marker is not None:
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
            except OSError:
                return False
            return marker in cmdline
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def group_alive(pgid: int) -> bool:
    """True while any non-zombie process of process group ``pgid`` exists."""
    reap(pgid)
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # killpg(0) also succeeds while only zombies remain; /proc tells them apart.
    if Path("/proc").is_dir():
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
                return True
        return False
    return True


def terminate_group(pid: int, *, marker: str | None = None, grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM the process group led by ``pid``, SIGKILL what is left after ``grace_s``.

    Never signals a group whose leader is gone or is not the process meant (``marker``):
    its pgid may have been reused.
    """
    if not pid_alive(pid, marker=marker):
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while group_alive(pid) and time.monotonic() < deadline:
        time.sleep(_POLL_S)
    if group_alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
        deadline = time.monotonic() + _KILL_WAIT_S
        while group_alive(pid) and time.monotonic() < deadline:
            time.sleep(_POLL_S)
    # The leader may have exited after the last reap inside group_alive; collect it.
    reap(pid)


def spawn(
    argv: Sequence[str],
    log_path: str | Path,
    *,
    env: Mapping[str, str] | None = None,
    append: bool = False,
) -> subprocess.Popen[bytes]:
    """Start ``argv`` detached: its own session and process group, stdout+stderr to ``log_path``.

    Its own session, so the caller's Ctrl-C does not reach it and :func:`terminate_group`
    can stop the whole tree it starts; stdin from /dev/null, no inherited descriptors.
    ``append`` keeps an existing log (a restarted component) instead of truncating it.
    """
    with open(log_path, "ab" if append else "wb") as log:
        return subprocess.Popen(
            list(argv),
            env=dict(env) if env is not None else None,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
        )


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct ports that were free on ``host`` a moment ago.

    All are held open at once while picking, so the kernel never hands out one twice.
    """
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((host, 0))
            sockets.append(sock)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for sock in sockets:
            sock.close()


def free_port(host: str = "127.0.0.1") -> int:
    """One port that was free on ``host`` a moment ago."""
    return free_ports(1, host)[0]


def udp_port_free(host: str, port: int) -> bool:
    """True when the UDP ``port`` can be bound on ``host`` now."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def port_free(host: str, port: int) -> bool:
    """True when ``port`` can be bound on ``host`` now.

    SO_REUSEADDR as uvicorn and the Go servers set it: a port held only by TIME_WAIT
    sockets after a stop counts as free.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def log_tail(path: str | Path, lines: int = 15, *, max_bytes: int = 256 * 1024) -> str:
    """The last ``lines`` lines of a log file (reading at most its last ``max_bytes``).

    Returns a note instead of raising when the log cannot be read: it is always shown inside
    another error message.
    """
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - max_bytes))
            text = handle.read().decode("utf-8", "replace")
    except OSError as exc:
        return f"(log unreadable: {exc})"
    return "\n".join(text.splitlines()[-lines:])
