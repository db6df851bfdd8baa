"""A real MLflow tracking server for tests: ``mlflow server`` as the chart runs it.

:func:`running_tracking_server` starts ``mlflow server`` from this environment on a free port
of 127.0.0.1 with a backend store URI (PostgreSQL from :mod:`kubeml.testing.postgres`, or
SQLite) and an artifact destination (S3 on moto's server, or a directory), proxying artifacts
as the chart's Deployment does, and waits on ``/health``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import requests

from kubeml._proc import free_port

#: A first start on an empty PostgreSQL runs every schema migration (~10 s here).
READY_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class TrackingServer:
    url: str
    port: int
    log_file: Path


@contextlib.contextmanager
def running_tracking_server(backend_store_uri: str, artifacts_destination: str, work_dir: Path, *,
                            env: Mapping[str, str] | None = None, allowed_hosts: str | None = None,
                            port: int | None = None) -> Iterator[TrackingServer]:
    """Run ``mlflow server`` until the block ends; ``RuntimeError`` with its log if it fails.

    ``env`` adds to this process's environment (S3 endpoint and credentials, say);
    ``allowed_hosts`` is ``MLFLOW_SERVER_ALLOWED_HOSTS`` (MLflow's default when None).
    """
    work_dir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    log_file = work_dir / f"mlflow-{port}.log"
    full_env = {**os.environ, **(env or {}), "MLFLOW_BACKEND_STORE_URI": backend_store_uri}
    if allowed_hosts is not None:
        full_env["MLFLOW_SERVER_ALLOWED_HOSTS"] = allowed_hosts
    mlflow = Path(sys.executable).with_name("mlflow")
    with open(log_file, "wb") as log:
        proc = subprocess.Popen(
            [str(mlflow), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
             "--serve-artifacts", "--artifacts-destination", artifacts_destination],
            stdout=log, stderr=subprocess.STDOUT, env=full_env, cwd=work_dir, start_new_session=True,
        )
    server = TrackingServer(f"http://127.0.0.1:{port}", port, log_file)
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {proc.returncode}:\n{_tail(log_file)}")
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"{server.url}/health", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server not healthy in {READY_TIMEOUT_S:.0f} s:\n{_tail(log_file)}")
            time.sleep(0.3)
        yield server
    finally:
        if proc.poll() is None:
            # The server's workers are in its process group.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)


def _tail(path: Path, n: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return "(no log)"
