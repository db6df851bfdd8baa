"""Background model servers on this machine: the local target of ``kubeml serve``.

Where it sits: the CLI and the pipeline's deploy stage call :class:`ServingManager`; it
starts ``python -m kubeml.serving.server`` as detached processes (own session, so a
Ctrl-C in the terminal that deployed them does not kill them) and remembers them in one
JSON file. It imports neither kserve nor torch, so ``kubeml serve status`` stays fast.

State layout under ``state_dir``::

    servers.json        {name: ServedModel fields}
    servers.lock        fcntl lock serialising read-modify-write of servers.json
    logs/NAME.log       stdout+stderr of the server process
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import requests

from kubeml._files import atomic_write_text
from kubeml._proc import free_port, log_tail, pid_alive, port_free, spawn, terminate_group
from kubeml.errors import ConfigError, ServingError

__all__ = ["ServedModel", "ServingManager", "default_state_dir"]

#: Seconds to wait for a new server's model to report ready. Cold start on a small CPU
#: box is dominated by importing kserve + torch (~10-20 s on 2 cores).
DEFAULT_READY_TIMEOUT_S = 120.0
#: Seconds between SIGTERM and SIGKILL when stopping a server. The server's own grace
#: for in-flight requests is 5 s; interpreter teardown adds a few seconds on top.
STOP_GRACE_S = 15.0
#: Lines of the server log quoted in errors.
LOG_TAIL_LINES = 30
#: Marker used to confirm a recorded pid still belongs to a kubeml server (pid reuse).
_SERVER_MODULE = "kubeml.serving.server"


def default_state_dir() -> Path:
    """``$KUBEML_HOME/serving``, or ``./.kubeml/serving`` when KUBEML_HOME is unset."""
    home = os.environ.get("KUBEML_HOME")
    return (Path(home) if home else Path.cwd() / ".kubeml") / "serving"


@dataclass(frozen=True)
class ServedModel:
    """One model server process, as recorded in the state file plus live checks."""

    name: str
    version: str
    pid: int
    http_port: int
    bundle_dir: str
    log_file: str
    started_at: float
    """Unix time the process was started."""
    grpc_port: int | None = None
    host: str = "127.0.0.1"
    instance: str = ""
    """Key of this server in the state file; ``name`` unless deployed under another key
    (the rollout engine runs several versions of one model as ``NAME-vVERSION``)."""
    alive: bool = False
    """The process exists (filled in by :meth:`ServingManager.status`)."""
    ready: bool = False
    """The model answered ready on /v2/models/NAME/ready."""

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    @property
    def v1_url(self) -> str:
        """V1 predict endpoint."""
        return f"{self.url}/v1/models/{self.name}:predict"

    @property
    def v2_url(self) -> str:
        """Open Inference Protocol V2 infer endpoint."""
        return f"{self.url}/v2/models/{self.name}/infer"

    def _record(self) -> dict:
        d = asdict(self)
        d.pop("alive")
        d.pop("ready")
        return d


class ServingManager:
    """Deploy, list and stop local model servers whose state lives in ``state_dir``.

    >>> import tempfile
    >>> ServingManager(tempfile.mkdtemp()).status()
    []
    """

    def __init__(self, state_dir: str | Path | None = None, *, host: str = "127.0.0.1"):
        self.state_dir = Path(state_dir) if state_dir is not None else default_state_dir()
        self.host = host

    # -- public API ------------------------------------------------------------------------

    def deploy(
        self,
        name: str,
        bundle_dir: str | Path,
        *,
        version: str = "",
        http_port: int | None = None,
        grpc_port: int | None = None,
        ready_timeout_s: float = DEFAULT_READY_TIMEOUT_S,
        max_batch_size: int | None = None,
        instance: str | None = None,
        payload_log: str | Path | None = None,
        payload_sample_rate: float = 1.0,
        payload_spool_mb: float = 64.0,
        fault: Any = None,
        runtime: str = "pytorch",
        batch_max_size: int | None = None,
        batch_max_latency_ms: float | None = None,
        request_timeout_s: float | None = None,
        max_concurrency: int | None = None,
        auth_token_file: str | Path | None = None,
        header_timeout_s: float | None = None,
        idle_timeout_s: int | None = None,
    ) -> ServedModel:
        """Start a server for ``bundle_dir`` as ``name`` and wait until it is ready.

        A server already deployed under ``name`` is stopped first (its port is then free
        for the new one). ``http_port=None`` picks a free port. Raises ``ServingError``
        with the tail of the server log when the server exits or is not ready in time.

        ``instance`` records the server under another key than the model name, so several
        versions of one model can run side by side; ``payload_log`` (JSONL path or URL)
        turns on sampled payload logging; a Kafka sink gets a spool of ``payload_spool_mb``
        under the state dir (``payload-spool/INSTANCE``) that keeps what the broker cannot
        take yet, across restarts (0: none, undelivered records are dropped); ``fault`` (a
        :class:`~kubeml.serving.telemetry.FaultInjection`) is the fault-injection hook;
        ``runtime="onnx"`` serves the bundle's ``model.onnx`` with ONNX Runtime;
        ``batch_max_size`` / ``batch_max_latency_ms`` turn on adaptive batching across
        requests and ``request_timeout_s`` sets the inference deadline (server defaults
        when None; see ``kubeml.serving.server``). ``auth_token_file`` makes inference need
        a bearer token from that file; ``header_timeout_s`` / ``idle_timeout_s`` bound how
        long a client may take to send headers / keep an idle connection.
        """
        _check_name(name)
        if payload_spool_mb < 0:
            raise ConfigError(f"payload_spool_mb must be 0 (no spool) or more, got {payload_spool_mb}")
        key = instance or name
        _check_name(key)
        bundle = Path(bundle_dir).resolve()
        if not bundle.is_dir():
            raise ConfigError(f"bundle directory {bundle} does not exist")
        self.stop(key)
        with self._locked() as state:
            for other_key, other in state.items():
                if other_key != key and pid_alive(other["pid"], marker=_SERVER_MODULE):
                    taken = {other["http_port"], other.get("grpc_port")} - {None}
                    if http_port in taken or (grpc_port is not None and grpc_port in taken):
                        raise ServingError(
                            f"port {http_port if http_port in taken else grpc_port} is used by "
                            f"served model {other_key!r}; stop it "
                            f"(kubeml serve stop {other_key}) or choose another port"
                        )
        port = http_port if http_port is not None else free_port(self.host)
        for p in (port, grpc_port):
            if p is not None and not port_free(_bind_host(self.host), p):
                raise ServingError(
                    f"port {p} on {self.host} is already in use by another process; "
                    "choose another port"
                )

        logs = self.state_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        log_file = logs / f"{key}.log"
        cmd = [
            sys.executable, "-m", _SERVER_MODULE,
            "--model-dir", str(bundle),
            "--model-name", name,
            "--model-version", version,
            "--host", self.host,
            "--http-port", str(port),
        ]  # fmt: skip
        if grpc_port is not None:
            cmd += ["--grpc-port", str(grpc_port)]
        if max_batch_size is not None:
            cmd += ["--max-batch-size", str(max_batch_size)]
        if runtime != "pytorch":
            cmd += ["--runtime", runtime]
        if batch_max_size is not None:
            cmd += ["--batch-max-size", str(batch_max_size)]
        if batch_max_latency_ms is not None:
            cmd += ["--batch-max-latency-ms", str(batch_max_latency_ms)]
        if request_timeout_s is not None:
            cmd += ["--request-timeout-s", str(request_timeout_s)]
        if max_concurrency is not None:
            cmd += ["--max-concurrency", str(max_concurrency)]
        if auth_token_file is not None:
            cmd += ["--auth-token-file", str(Path(auth_token_file).resolve())]
        if header_timeout_s is not None:
            cmd += ["--header-timeout-s", str(header_timeout_s)]
        if idle_timeout_s is not None:
            cmd += ["--idle-timeout-s", str(idle_timeout_s)]
        if payload_log is not None:
            cmd += ["--payload-log", str(payload_log)]
            cmd += ["--payload-sample-rate", str(payload_sample_rate)]
            if str(payload_log).startswith("kafka://") and payload_spool_mb > 0:
                spool = self.state_dir / "payload-spool" / key
                cmd += ["--payload-spool", str(spool), "--payload-spool-max-mb", str(payload_spool_mb)]
        if fault is not None and fault.active:
            cmd += ["--fault-error-rate", str(fault.error_rate)]
            cmd += ["--fault-latency-ms", str(fault.latency_ms)]
        env = dict(os.environ)
        # kserve imports pyarrow, whose bundled jemalloc starts a background thread that
        # (seen on Linux 6.x VMs) can outlive the interpreter's exit and keep the stopped
        # server as an unreapable zombie. The server allocates nothing through Arrow.
        env.setdefault("JE_ARROW_MALLOC_CONF", "background_thread:false")
        proc = spawn(cmd, log_file, env=env)  # own process group: stop() signals the whole tree
        served = ServedModel(
            name=name,
            version=version,
            pid=proc.pid,
            http_port=port,
            grpc_port=grpc_port,
            bundle_dir=str(bundle),
            log_file=str(log_file),
            started_at=time.time(),
            host=self.host,
            instance=key,
        )
        with self._locked() as state:
            state[key] = served._record()

        deadline = time.monotonic() + ready_timeout_s
        while True:
            code = proc.poll()
            if code is not None:
                self._forget(key)
                raise ServingError(
                    f"model server for {key!r} exited with status {code} before it was "
                    f"ready; last lines of {log_file}:\n{log_tail(log_file, LOG_TAIL_LINES)}"
                )
            if _model_ready(served):
                return replace(served, alive=True, ready=True)
            if time.monotonic() > deadline:
                self.stop(key)
                raise ServingError(
                    f"model server for {key!r} was not ready after {ready_timeout_s:.0f} s "
                    f"and was stopped; last lines of {log_file}:\n{log_tail(log_file, LOG_TAIL_LINES)}"
                )
            time.sleep(0.25)

    def status(self) -> list[ServedModel]:
        """Every recorded server, sorted by name, with live ``alive``/``ready`` checks.

        Dead processes stay listed (``alive=False``) until :meth:`stop` cleans them up, so
        a server that crashed is visible rather than silently gone.
        """
        with self._locked() as state:
            records = [_from_record(r) for r in state.values()]
        result = []
        for served in sorted(records, key=lambda s: (s.instance or s.name)):
            alive = pid_alive(served.pid, marker=_SERVER_MODULE)
            result.append(replace(served, alive=alive, ready=alive and _model_ready(served)))
        return result

    def get(self, name: str) -> ServedModel | None:
        """The recorded server for ``name`` (an instance key) with live checks, or None."""
        return next((s for s in self.status() if (s.instance or s.name) == name), None)

    def stop(self, name: str | None = None) -> list[str]:
        """Stop the server ``name`` (or all of them); returns the names removed.

        Sends SIGTERM to the server's process group, waits up to ``STOP_GRACE_S``, then
        SIGKILLs what is left. Entries whose process is already gone are removed too.
        Stopping a name that is not deployed is not an error (returns ``[]``).
        """
        with self._locked() as state:
            names = [n for n in state if name is None or n == name]
            records = {n: state[n] for n in names}
        for n, record in records.items():
            terminate_group(record["pid"], marker=_SERVER_MODULE, grace_s=STOP_GRACE_S)
            self._forget(n)
        return sorted(records)

    # -- internals -------------------------------------------------------------------------

    @property
    def state_file(self) -> Path:
        return self.state_dir / "servers.json"

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, dict]]:
        """Yield the state dict under an exclusive lock; writes it back if it changed."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with (self.state_dir / "servers.lock").open("a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                state = self._read()
                before = json.dumps(state, sort_keys=True)
                yield state
                if json.dumps(state, sort_keys=True) != before:
                    atomic_write_text(
                        self.state_file, json.dumps(state, indent=2, sort_keys=True), fsync=False
                    )
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _read(self) -> dict[str, dict]:
        if not self.state_file.is_file():
            return {}
        try:
            data = json.loads(self.state_file.read_text())
        except json.JSONDecodeError as exc:
            raise ServingError(
                f"{self.state_file} is corrupt ({exc}); stop stray servers by pid and "
                "delete the file"
            ) from exc
        return data if isinstance(data, dict) else {}

    def _forget(self, name: str) -> None:
        with self._locked() as state:
            state.pop(name, None)


def _from_record(record: dict) -> ServedModel:
    known = {f for f in ServedModel.__dataclass_fields__ if f not in ("alive", "ready")}
    served = ServedModel(**{k: v for k, v in record.items() if k in known})
    return served if served.instance else replace(served, instance=served.name)


# -- names and readiness --------------------------------------------------------------------


def _check_name(name: str) -> None:
    ok = name and (name[0].isalnum()) and all(c.isalnum() or c in "._-" for c in name)
    if not ok:
        raise ConfigError(
            f"model name {name!r} is not URL-safe; use letters, digits, '.', '_' and '-'"
        )


def _model_ready(served: ServedModel) -> bool:
    try:
        r = requests.get(f"{served.url}/v2/models/{served.name}/ready", timeout=2)
    except requests.RequestException:
        return False
    return r.status_code == 200


def _bind_host(host: str) -> str:
    """The address a port check binds for ``host``.

    A server on loopback still clashes with one bound to every interface, so a loopback
    host is checked on 0.0.0.0: a port taken on any interface counts as taken.
    """
    return "0.0.0.0" if host in ("127.0.0.1", "localhost") else host
