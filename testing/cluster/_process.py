"""Starting, probing and stopping the control-plane processes.

Processes are started in their own session, so a `kubeml cluster up` returns while they
keep running and Ctrl-C in the terminal does not reach them. Each is recorded in the
cluster's state file as (pid, start time): the start time tells a live component apart from
an unrelated process that reused its pid after a crash and reboot.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from kubeml._proc import free_ports, pid_alive, port_free, spawn, start_time
from kubeml.errors import AssetsMissing, ComponentFailed, PortInUse

__all__ = [
    "ProcessRecord",
    "free_ports",
    "is_alive",
    "log_tail",
    "probe",
    "start_process",
    "stop_processes",
]

# How long a component gets to exit after SIGTERM before SIGKILL, in seconds. The apiserver
# drains in-flight requests (under a second with no clients); etcd flushes its WAL.
_TERM_GRACE_S = 10.0
_LOG_TAIL_LINES = 15
_ERROR_LINE = re.compile(r'^[EF]\d{4} |.*"level":"(error|fatal|panic)"')


@dataclass(frozen=True)
class ProcessRecord:
    """A started component: enough to find it again from another process."""

    name: str
    pid: int
    start_time: int
    """Clock ticks since boot at which the process started (``/proc/<pid>/stat`` field 22)."""
    log: str

    def to_dict(self) -> dict[str, object]:
        return {"name": self.name, "pid": self.pid, "start_time": self.start_time, "log": self.log}

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> ProcessRecord:
        return cls(str(data["name"]), int(data["pid"]), int(data["start_time"]), str(data["log"]))


def is_alive(record: ProcessRecord) -> bool:
    return pid_alive(record.pid, started=record.start_time)


def log_tail(path: str | Path, lines: int = _LOG_TAIL_LINES) -> str:
    """The last ``lines`` lines of a log, preceded by its last error lines if they scrolled off.

    klog error/fatal lines start with E or F and a date (``E1127 10:27:12...``); a component
    that fails usually prints its one useful line and then pages of shutdown noise.
    """
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - 256 * 1024))
            text = handle.read().decode("utf-8", "replace")
    except OSError:
        return ""
    all_lines = text.splitlines()
    tail = all_lines[-lines:]
    errors = [ln for ln in all_lines[:-lines] if _ERROR_LINE.match(ln)][-5:]
    if errors:
        tail = [*errors, "...", *tail]
    return "\n".join(ln[:400] for ln in tail)


def start_process(name: str, argv: list[str], log_path: Path) -> tuple[subprocess.Popen[bytes], ProcessRecord]:
    if not os.access(argv[0], os.X_OK):
        raise AssetsMissing(
            f"{name}: {argv[0]} is missing or not executable; run `make cluster-assets` "
            "(or `bash hack/cluster/build.sh`) to build it"
        )
    proc = spawn(argv, log_path, append=True)
    start = start_time(proc.pid)
    if start is None:
        proc.wait()
        raise ComponentFailed(name, f"exited immediately (status {proc.returncode})",
                              log_tail(log_path), str(log_path))
    return proc, ProcessRecord(name, proc.pid, start, str(log_path))


def check_port_free(port: int, component: str) -> None:
    if not port_free("127.0.0.1", port):
        raise PortInUse(port, component)


def probe(url: str, context: ssl.SSLContext | None = None, timeout: float = 1.0) -> tuple[bool, str]:
    """GET ``url``; (True, body) on HTTP 200, else (False, why)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=context) as response:
            return response.status == 200, response.read(512).decode("utf-8", "replace").strip()
    except urllib.error.HTTPError as exc:
        return False, f"HTTP {exc.code}"
    except (urllib.error.URLError, OSError, ssl.SSLError) as exc:
        reason = getattr(exc, "reason", exc)
        return False, str(reason)


def wait_healthy(
    record: ProcessRecord,
    url: str,
    *,
    deadline: float,
    context: ssl.SSLContext | None = None,
    proc: subprocess.Popen[bytes] | None = None,
) -> None:
    """Poll ``url`` every 100 ms until it answers 200; fail fast if the process exits."""
    why = "no answer yet"
    while True:
        exited = proc.poll() is not None if proc is not None else not is_alive(record)
        if exited:
            status = f" (status {proc.returncode})" if proc is not None else ""
            raise ComponentFailed(record.name, f"exited during startup{status}",
                                  log_tail(record.log), record.log)
        ok, why = probe(url, context)
        if ok:
            return
        if time.monotonic() > deadline:
            raise ComponentFailed(record.name, f"not healthy at {url} in time: {why}",
                                  log_tail(record.log), record.log)
        time.sleep(0.1)


def stop_processes(
    records: list[ProcessRecord],
    handles: dict[int, subprocess.Popen[bytes]] | None = None,
    grace_s: float = _TERM_GRACE_S,
) -> None:
    """SIGTERM every live record, wait up to ``grace_s``, then SIGKILL what is left."""
    handles = handles or {}
    live = [r for r in records if is_alive(r)]
    for record in live:
        with contextlib.suppress(ProcessLookupError):
            os.kill(record.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for record in live:
        _wait_gone(record, handles.get(record.pid), deadline)
    for record in live:
        if is_alive(record):
            with contextlib.suppress(ProcessLookupError):
                os.kill(record.pid, signal.SIGKILL)
            _wait_gone(record, handles.get(record.pid), time.monotonic() + 5.0)


def _wait_gone(record: ProcessRecord, handle: subprocess.Popen[bytes] | None, deadline: float) -> None:
    while time.monotonic() < deadline:
        if handle is not None:
            # Our own child: reap it, or it lingers as a zombie holding its pid.
            with contextlib.suppress(subprocess.TimeoutExpired):
                handle.wait(timeout=0.05)
                return
        elif not is_alive(record):
            return
        else:
            time.sleep(0.05)
