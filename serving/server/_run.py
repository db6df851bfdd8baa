"""Run a model server in this process: one bundle (:func:`serve`) or a directory of them
(:func:`serve_repository`).

Where it sits: in ``kubeml.serving.server``, between the command line (``__main__.py``)
and the app (``_app.py``). Importing it is cheap: kserve, torch and the web framework load
inside the functions, after the bundle has passed its preflight check.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path
from typing import Any

from kubeml.config import DEFAULT_REQUEST_TIMEOUT_S
from kubeml.errors import ConfigError
from kubeml.serving.server._http import DEFAULT_HEADER_TIMEOUT_S, DEFAULT_IDLE_TIMEOUT_S
from kubeml.serving.server._limits import (
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_CONCURRENCY,
    EXIT_LOAD_FAILED,
    RUNTIMES,
    _check_timeouts,
    _preflight,
)

__all__ = ["serve", "serve_repository"]


def _access(
    auth_token_file: Any, admin_token_file: Any, tls: Any, header_timeout_s: float, idle_timeout_s: int
) -> dict[str, Any]:
    """``build_server``'s access options, files read and checked now (before any import)."""
    from kubeml.serving.server._auth import ServerTls, TokenFile

    if not (header_timeout_s > 0 and idle_timeout_s > 0):
        raise ConfigError(
            f"header and idle timeouts must be > 0 s, got {header_timeout_s:g} and {idle_timeout_s}"
        )
    return {
        "auth_tokens": TokenFile(auth_token_file) if auth_token_file is not None else None,
        "admin_tokens": TokenFile(admin_token_file) if admin_token_file is not None else None,
        "tls": ServerTls(*tls) if tls is not None else None,
        "header_timeout_s": header_timeout_s,
        "idle_timeout_s": idle_timeout_s,
    }

log = logging.getLogger("kubeml.serving.server")


def serve_repository(
    models_dir: str | Path,
    *,
    host: str = "127.0.0.1",
    http_port: int,
    grpc_port: int | None = None,
    max_memory_bytes: int,
    runtime: str = "pytorch",
    preload: tuple[str, ...] = (),
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S,
    max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
    auth_token_file: str | Path | None = None,
    admin_token_file: str | Path | None = None,
    tls: tuple[str, str, str] | None = None,
    header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S,
    idle_timeout_s: int = DEFAULT_IDLE_TIMEOUT_S,
) -> int:
    """Serve every bundle under ``models_dir/NAME`` on demand (V2 repository API), with
    least-recently-used eviction under ``max_memory_bytes``; returns the exit status.

    ``admin_token_file`` is required: load, unload and index need its token. The other
    access options are :func:`serve`'s.
    """
    if admin_token_file is None:
        raise ConfigError(
            "a multi-model server needs --admin-token-file: its repository API (load, unload) "
            "is an admin path; write a token with `openssl rand -hex 32 > FILE; chmod 600 FILE`"
        )
    access = _access(auth_token_file, admin_token_file, tls, header_timeout_s, idle_timeout_s)
    from kubeml.serving.repository import BundleRepository
    from kubeml.serving.server._app import build_server

    repository = BundleRepository(models_dir, max_memory_bytes=max_memory_bytes, runtime=runtime)
    for name in preload:
        repository.load(name)
    server = build_server(
        None,
        repository=repository,
        host=host,
        http_port=http_port,
        grpc_port=grpc_port,
        max_body_bytes=max_body_bytes,
        request_timeout_s=request_timeout_s,
        max_concurrency=max_concurrency,
        **access,
    )
    server.start([])
    return 0


def serve(
    model_dir: str | Path,
    *,
    model_name: str,
    model_version: str = "",
    host: str = "127.0.0.1",
    http_port: int,
    grpc_port: int | None = None,
    max_batch_size: int | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    payload_log: str | None = None,
    payload_sample_rate: float = 1.0,
    payload_spool: str | None = None,
    payload_spool_max_bytes: int | None = None,
    fault: Any = None,
    runtime: str = "pytorch",
    batching: Any = None,
    request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S,
    max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
    auth_token_file: str | Path | None = None,
    admin_token_file: str | Path | None = None,
    tls: tuple[str, str, str] | None = None,
    header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S,
    idle_timeout_s: int = DEFAULT_IDLE_TIMEOUT_S,
) -> int:
    """Serve the bundle in ``model_dir`` until SIGTERM/SIGINT; returns the exit status.

    ``max_batch_size`` caps the instances of one request; ``batching`` (a
    :class:`~kubeml.serving.batching.BatchingConfig`) turns on adaptive batching across
    requests; ``request_timeout_s`` (0: none) is the deadline of one inference.
    ``payload_log`` (a JSONL path, an http(s) URL or a kafka:// URL) turns on sampled
    payload logging; ``payload_spool`` (a directory, Kafka sinks only) keeps what the broker
    cannot take yet, up to ``payload_spool_max_bytes``; ``fault`` (a
    :class:`~kubeml.serving.telemetry.FaultInjection`) is the fault-injection hook used by
    rollout tests. ``auth_token_file``: inference needs a bearer token from
    that file (re-read when it changes); ``tls`` ``(cert, key, client CA)``: mTLS on REST
    and gRPC; ``header_timeout_s`` / ``idle_timeout_s``: how long a client may take to
    send a request's headers / keep an idle connection.
    """
    model_dir = Path(model_dir)
    access = _access(auth_token_file, admin_token_file, tls, header_timeout_s, idle_timeout_s)
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")
    _check_timeouts(request_timeout_s, batching)
    _preflight(model_dir, runtime)
    from kubeml.serving.telemetry import PayloadLogger

    spool: dict[str, Any] = {}
    if payload_spool:
        spool["spool_dir"] = payload_spool
        if payload_spool_max_bytes is not None:
            spool["spool_max_bytes"] = payload_spool_max_bytes
    payload_logger = (
        PayloadLogger(payload_log, sample_rate=payload_sample_rate, **spool)
        if payload_log
        else None
    )

    from kubeml.serving.model import DEFAULT_MAX_BATCH_SIZE, BundleModel
    from kubeml.serving.server._app import build_server

    model_class = BundleModel
    if runtime == "onnx":
        from kubeml.serving.onnx_model import OnnxBundleModel as model_class
    model = model_class(
        model_name,
        model_dir,
        version=model_version,
        max_batch_size=max_batch_size or DEFAULT_MAX_BATCH_SIZE,
        batching=batching,
    )
    server = build_server(
        model,
        host=host,
        http_port=http_port,
        grpc_port=grpc_port,
        max_body_bytes=max_body_bytes,
        payload_logger=payload_logger,
        fault=fault,
        request_timeout_s=request_timeout_s,
        max_concurrency=max_concurrency,
        **access,
    )
    failed = threading.Event()

    def load() -> None:
        try:
            model.load()
            if model.telemetry is not None and model.spec is not None:
                model.telemetry.classes = tuple(model.spec.classes)
            server.liveness.loaded()
            log.info("model %s version %r loaded from %s", model_name, model_version, model_dir)
        except Exception as exc:
            log.exception("cannot load model %s from %s; stopping", model_name, model_dir)
            server.liveness.failed(type(exc).__name__)  # /v2/health/live answers 503 from now
            failed.set()
            os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=load, name="kubeml-model-loader", daemon=True).start()
    # Registered above but not passed here: ModelServer.start() refuses models that are
    # not ready yet, and this one becomes ready only once the loader thread finishes.
    try:
        server.start([])
    finally:
        if payload_logger is not None:
            payload_logger.close()
    return EXIT_LOAD_FAILED if failed.is_set() else 0
