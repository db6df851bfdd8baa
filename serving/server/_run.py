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
from kubeml.serving.server._limits import (
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_CONCURRENCY,
    EXIT_LOAD_FAILED,
    RUNTIMES,
    _check_timeouts,
    _preflight,
)

__all__ = ["serve", "serve_repository"]

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
) -> int:
    """Serve every bundle under ``models_dir/NAME`` on demand (V2 repository API), with
    least-recently-used eviction under ``max_memory_bytes``; returns the exit status."""
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
) -> int:
    """Serve the bundle in ``model_dir`` until SIGTERM/SIGINT; returns the exit status.

    ``max_batch_size`` caps the instances of one request; ``batching`` (a
    :class:`~kubeml.serving.batching.BatchingConfig`) turns on adaptive batching across
    requests; ``request_timeout_s`` (0: none) is the deadline of one inference.
    ``payload_log`` (a JSONL path, an http(s) URL or a kafka:// URL) turns on sampled
    payload logging; ``payload_spool`` (a directory, Kafka sinks only) keeps what the broker
    cannot take yet, up to ``payload_spool_max_bytes``; ``fault`` (a :class:`~kubeml.serving.telemetry.FaultInjection`) is the fault-injection
    hook used by rollout tests.
    """
    model_dir = Path(model_dir)
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
    )
    failed = threading.Event()

    def load() -> None:
        try:
            model.load()
            if model.telemetry is not None and model.spec is not None:
                model.telemetry.classes = tuple(model.spec.classes)
            log.info("model %s version %r loaded from %s", model_name, model_version, model_dir)
        except Exception:
            log.exception("cannot load model %s from %s; stopping", model_name, model_dir)
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
