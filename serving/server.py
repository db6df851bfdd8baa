"""Model server process: one kubeml bundle behind KServe's ``ModelServer``.

Run as::

    python -m kubeml.serving.server --model-dir DIR --model-name NAME \\
        [--model-version V] --http-port P [--grpc-port G]

Where it sits: this is the only serving module that touches the web layer. It keeps
kserve's REST (V1 + Open Inference Protocol V2) and optional gRPC servers, and closes the
gaps where kserve answers a client mistake with a 5xx or no JSON:

* request parsing failures inside kserve's decoder (``KeyError`` on a missing field, a
  ``ValueError`` from a bad binary header, ...) become 400s (:class:`_StrictDataPlane`);
* FastAPI's 422 validation errors, unknown routes (404) and wrong methods (405) answer
  with the same ``{"error": "..."}`` body as every other error;
* bodies above ``--max-body-bytes`` get a 413 before they are buffered, and JSON nested
  deeply enough to exhaust the parser's recursion gets a 400 (:class:`_RequestGuard`);
* ``/v2/models/NAME/versions/V/...`` is answered for the served version (kserve itself
  answers 501 for any versioned route) and 404 for any other version.

Multi-model mode (``--models-dir DIR [--max-memory-mb M]``) serves every bundle under
``DIR/NAME/``, loaded and unloaded through the V2 model repository API with
least-recently-used eviction under the memory cap (see ``repository.py``). ``--runtime
onnx`` serves a bundle's ``model.onnx`` with ONNX Runtime instead of PyTorch eager.

Every inference request is timed and counted per model, version and protocol on
``/metrics`` (gRPC ``ModelInfer`` calls too, as protocol ``grpc``), may be sampled to a
payload log (``--payload-log``), and carries an ``x-request-id`` (``telemetry.py``).
``--fault-error-rate`` / ``--fault-latency-ms`` are a fault-injection hook for rollout
tests: they make a healthy model look like a bad version. Injected errors answer at once
(HTTP 503, gRPC ``UNAVAILABLE``); the injected latency counts as inference time, so
``--request-timeout-s`` cuts it short like a slow forward pass.

Inference runs in a worker thread, under a deadline: ``--request-timeout-s`` (default
30 s, 0 = none), or a shorter one a client sends as ``x-request-timeout-ms`` (or Envoy's
``x-envoy-expected-rq-timeout-ms``). A request past its deadline gets 504 with the usual
``{"error": "..."}`` body (gRPC: ``DEADLINE_EXCEEDED``), is counted as a 504 on
``/metrics``, and the server keeps answering health checks and other requests meanwhile.

Adaptive batching (single-model mode, off by default): ``--batch-max-size N
[--batch-max-latency-ms T]`` queues validated requests to the model and runs them
together, up to ``N`` instances summed over requests per forward pass, flushed when full
or when the oldest has waited ``T`` ms (``batching.py``). V1, V2 and gRPC requests share
the queue; each gets back only its own rows and id, and ``kubeml_batch_size`` records
the coalesced passes. ``--max-batch-size`` stays the per-request limit on instances.

The model loads in a background thread: the port opens at once (liveness) and
``/v2/health/ready`` and ``/v2/models/NAME/ready`` turn 200 only after the weights are
loaded. A bundle that cannot be loaded stops the process with exit status 1 and the
reason in the log.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import re
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from kubeml.bundle import SPEC_FILE, WEIGHTS_FILE, read_spec
from kubeml.config import DEFAULT_REQUEST_TIMEOUT_S
from kubeml.errors import BundleError

__all__ = [
    "CLIENT_TIMEOUT_HEADERS",
    "DEFAULT_MAX_BODY_BYTES",
    "DEFAULT_REQUEST_TIMEOUT_S",
    "main",
    "serve",
    "serve_repository",
]

log = logging.getLogger("kubeml.serving.server")

#: Largest request body accepted. A full batch of 1024 digits rows is ~400 KiB as JSON
#: (~256 KiB binary); 4 MiB leaves room for wider models while keeping a single request
#: from buffering unbounded memory in the server.
DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024
#: Seconds uvicorn waits for in-flight requests on SIGTERM. Requests here take
#: milliseconds; a short grace keeps redeploys and ``kubeml serve stop`` quick.
GRACE_PERIOD_S = 5
#: Exit status when the bundle cannot be loaded (distinct from a crash or a signal).
EXIT_LOAD_FAILED = 1
#: Model runtimes ``--runtime`` accepts: PyTorch eager (safetensors) or ONNX Runtime (model.onnx).
RUNTIMES = ("pytorch", "onnx")
#: Request headers carrying a client's own deadline in milliseconds; only a shorter one
#: than ``--request-timeout-s`` has an effect. Envoy (Istio, Knative) sends the second.
CLIENT_TIMEOUT_HEADERS = ("x-request-timeout-ms", "x-envoy-expected-rq-timeout-ms")

_VERSIONED_ROUTE = re.compile(
    r"^/v2/models/(?P<name>[^/]+)/versions/(?P<version>[^/]+)(?P<rest>/.*)?$"
)


def _preflight(model_dir: Path, runtime: str = "pytorch") -> None:
    """Fail in milliseconds, before kserve and torch are imported, on a broken bundle."""
    spec = read_spec(model_dir)
    if runtime == "onnx":
        if not (model_dir / "model.onnx").is_file():
            raise BundleError(f"{model_dir}: model.onnx is missing (export it with export_onnx)")
        return
    weights = model_dir / WEIGHTS_FILE
    if not weights.is_file():
        raise BundleError(f"{model_dir}: {WEIGHTS_FILE} is missing")
    if spec.weights_sha256:
        h = hashlib.sha256()
        with weights.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        if h.hexdigest() != spec.weights_sha256:
            raise BundleError(
                f"{weights}: checksum mismatch with {SPEC_FILE} (truncated or modified file)"
            )


def _request_budget_s(
    headers: dict[str, str] | None, server_timeout_s: float
) -> tuple[float | None, str]:
    """``(seconds, where the limit comes from)`` for one inference; ``(None, "")``: none.

    >>> _request_budget_s({"x-request-timeout-ms": "250"}, 30.0)
    (0.25, 'x-request-timeout-ms header')
    >>> _request_budget_s({"x-request-timeout-ms": "60000"}, 30.0)
    (30.0, '--request-timeout-s')
    >>> _request_budget_s({}, 0.0)
    (None, '')
    """
    budget, source = (server_timeout_s, "--request-timeout-s") if server_timeout_s else (None, "")
    for name in CLIENT_TIMEOUT_HEADERS:
        raw = headers.get(name) if headers else None
        if raw is None:
            continue
        try:
            ms = float(raw)
        except ValueError:
            ms = math.nan
        if not (math.isfinite(ms) and ms > 0):
            raise ValueError(
                f"{name} header must be a positive number of milliseconds, got {raw!r}"
            )
        if budget is None or ms / 1000 < budget:
            budget, source = ms / 1000, f"{name} header"
    return budget, source


# --------------------------------------------------------------------------------------
# ASGI guard: body limit, deep nesting, versioned routes. Plain ASGI so it depends on no
# particular Starlette/FastAPI version.
# --------------------------------------------------------------------------------------


async def _send_json(send: Any, status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class _RequestGuard:
    def __init__(self, app: Any, *, max_body_bytes: int, versions: dict[str, str]):
        from starlette.exceptions import HTTPException

        # Raised from receive() so that FastAPI (which turns any other exception raised
        # while reading the body into a generic 400) passes it through unchanged.
        self._too_large_error = HTTPException
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.versions = versions

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        match = _VERSIONED_ROUTE.match(scope["path"])
        if match:
            name, version, rest = match["name"], match["version"], match["rest"] or ""
            served = self.versions.get(name)
            if served is not None and version != served:
                await _send_json(
                    send, 404, f"model {name!r} has no version {version!r}; serving {served!r}"
                )
                return
            # Unknown names fall through to kserve, which answers 404 "model not found".
            path = f"/v2/models/{name}{rest}"
            scope = {**scope, "path": path, "raw_path": path.encode()}

        for key, value in scope.get("headers", []):
            if key == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    await _send_json(send, 400, "invalid Content-Length header")
                    return
                if declared > self.max_body_bytes:
                    await _send_json(send, 413, self._too_large())
                    return

        received = 0
        started = False

        async def limited_receive() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise self._too_large_error(413, self._too_large())
            return message

        async def tracking_send(message: dict) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except RecursionError:
            if started:
                raise
            await _send_json(send, 400, "request JSON is nested too deeply")

    def _too_large(self) -> str:
        return (
            f"request body exceeds {self.max_body_bytes} bytes; "
            "send fewer instances per request"
        )


# --------------------------------------------------------------------------------------
# kserve integration
# --------------------------------------------------------------------------------------


class _ClientErrorsWithoutTraceback(logging.Filter):
    """kserve logs every handled exception with a traceback, 400s included; a burst of
    bad requests would bury real failures. Client errors keep one line, at WARNING."""

    def __init__(self, client_errors: tuple[type[BaseException], ...]):
        super().__init__()
        self.client_errors = client_errors

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, self.client_errors):
            record.msg, record.args, record.exc_info = "rejected request: %s", (exc,), None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


class _RepositoryVersions:
    """``versions.get(name)`` for a multi-model server: whatever version is loaded now."""

    def __init__(self, repository: Any):
        self.repository = repository

    def get(self, name: str, default: str = "") -> str:
        model = self.repository.models.get(name)
        return getattr(model, "version", default) if model is not None else default


#: Full name of the OIP inference method, the one gRPC method that is timed, counted and
#: may get an injected fault (health and metadata stay truthful, as over HTTP).
_GRPC_INFER_METHOD = "/inference.GRPCInferenceService/ModelInfer"


def _grpc_http_status(code: Any) -> str:
    """The HTTP status (as the metrics label) a gRPC status code stands for."""
    import grpc

    from kubeml.serving.rollout.grpc_front import HTTP_STATUS

    if not isinstance(code, grpc.StatusCode):
        code = next((c for c in grpc.StatusCode if c.value[0] == code), grpc.StatusCode.UNKNOWN)
    return str(HTTP_STATUS.get(code, 500))


def _grpc_telemetry_interceptor(versions: Any, fault: Any) -> Any:
    """A ``grpc.aio`` server interceptor: the gRPC side of :class:`TelemetryMiddleware`.

    ``ModelInfer`` calls are timed and counted in ``kubeml_requests_total`` /
    ``kubeml_request_latency_seconds`` with protocol ``grpc``, and, when ``fault`` has an
    error rate, that share of them is answered ``UNAVAILABLE`` at once (HTTP's 503).
    Registered outermost, so kserve's exception mapping has set the status it reads.
    """
    import time

    import grpc
    from grpc.aio import ServerInterceptor

    from kubeml.serving.telemetry import LATENCY, REQUESTS, ErrorSchedule

    errors = ErrorSchedule(fault.error_rate if fault is not None else 0.0)

    class _GrpcTelemetry(ServerInterceptor):
        async def intercept_service(self, continuation: Any, details: Any) -> Any:
            handler = await continuation(details)
            if details.method != _GRPC_INFER_METHOD or handler is None or handler.unary_unary is None:
                return handler
            inner = handler.unary_unary

            async def model_infer(request: Any, context: Any) -> Any:
                model = request.model_name
                version = versions.get(model, "") or "unversioned"
                started = time.perf_counter()
                status = "500"
                try:
                    if errors.next_fails():
                        status = _grpc_http_status(grpc.StatusCode.UNAVAILABLE)
                        await context.abort(
                            grpc.StatusCode.UNAVAILABLE, "injected fault (fault-injection hook)"
                        )
                    response = await inner(request, context)
                    code = context.code()
                    status = _grpc_http_status(code if code is not None else grpc.StatusCode.OK)
                    return response
                except BaseException:
                    code = context.code()
                    if code is not None:
                        status = _grpc_http_status(code)
                    elif context.cancelled():
                        status = "499"
                    raise
                finally:
                    REQUESTS.labels(model, version, "grpc", status).inc()
                    LATENCY.labels(model, version, "grpc").observe(time.perf_counter() - started)

            return grpc.unary_unary_rpc_method_handler(
                model_infer,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )

    return _GrpcTelemetry()


def _build_server(
    model: Any,
    *,
    repository: Any = None,
    http_port: int,
    grpc_port: int | None,
    max_body_bytes: int,
    payload_logger: Any = None,
    fault: Any = None,
    request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S,
) -> Any:
    import asyncio

    from fastapi.exceptions import RequestValidationError
    from grpc_interceptor.exceptions import DeadlineExceeded
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from kubeml.serving._kserve import (
        DataPlane,
        InvalidInput,
        ModelNotFound,
        ModelNotReady,
        ModelServer,
    )
    from kubeml.serving._kserve import kserve as _kserve_pkg
    from kserve.protocol.grpc.server import GRPCServer
    from kubeml.serving.telemetry import FaultInjection

    # The injected latency is spent inside the deadline, as a slow forward pass would be;
    # the middleware (HTTP) and the gRPC interceptor inject errors only, answered at once.
    fault_latency_s = fault.latency_ms / 1000 if fault is not None else 0.0
    middleware_fault = FaultInjection(error_rate=fault.error_rate) if fault is not None else None

    class _InferenceTimeout(DeadlineExceeded):
        """An inference past its deadline: HTTP 504; kserve's gRPC interceptor maps
        ``GrpcException`` subclasses to their status, here DEADLINE_EXCEEDED."""

        def __init__(self, details: str):
            super().__init__(details)
            Exception.__init__(self, details)

        def __str__(self) -> str:
            return self.details

    class _StrictDataPlane(DataPlane):
        """kserve's DataPlane with request decoding that never blames the server."""

        def decode(self, body: Any, headers: Any, *args: Any, **kwargs: Any) -> Any:
            if headers and "content-type" in headers:
                # kserve compares the header verbatim, so "application/json; charset=utf-8"
                # would be treated as opaque bytes.
                media_type = headers["content-type"].split(";")[0].strip().lower()
                headers = {**headers, "content-type": media_type}
            if (
                isinstance(body, bytes)
                and kwargs.get("protocol_version", args[0] if args else "") == "v2"
                and "inference-header-content-length" not in (headers or {})
            ):
                # FastAPI only parses bodies labelled application/json; standard OIP
                # clients (tritonclient) send plain JSON without a Content-Type. A V2
                # body without binary tensors is all header, so say so.
                headers = {**(headers or {}), "inference-header-content-length": str(len(body))}
            try:
                return super().decode(body, headers, *args, **kwargs)
            except InvalidInput:
                raise
            except Exception as exc:  # decoding only ever sees client bytes
                raise InvalidInput(f"malformed request: {type(exc).__name__}: {exc}") from exc

        async def infer(
            self, model_name: str, request: Any, headers: dict[str, str] | None = None
        ) -> Any:
            try:
                budget, source = _request_budget_s(headers, request_timeout_s)
            except ValueError as exc:
                raise InvalidInput(str(exc)) from None
            if budget is None and not fault_latency_s:
                return await super().infer(model_name, request, headers)
            timer = asyncio.timeout(budget)
            try:
                async with timer:
                    if fault_latency_s:
                        await asyncio.sleep(fault_latency_s)
                    return await super().infer(model_name, request, headers)
            except TimeoutError:
                if not timer.expired():
                    raise
                raise _InferenceTimeout(
                    f"inference on model {model_name!r} did not finish within {budget:g} s "
                    f"(the {source}); the model is slow or the server overloaded: "
                    "retry later, or send fewer instances per request"
                ) from None

        async def ready(self) -> bool:
            models = self.model_registry.get_models()
            if not models and repository is None:
                return False
            for name in models:
                if not await self.model_registry.is_model_ready(name):
                    return False
            return await super().ready()

        async def model_metadata(self, model_name: str) -> dict:
            metadata = await super().model_metadata(model_name)
            served = self.get_model_from_registry(model_name)
            metadata["platform"] = "kubeml_pytorch"
            if getattr(served, "version", ""):
                metadata["versions"] = [served.version]
            return metadata

    versions = {model.name: model.version} if model is not None else _RepositoryVersions(repository)
    grpc_interceptor = _grpc_telemetry_interceptor(versions, fault)

    class _GRPCServer(GRPCServer):
        """kserve's gRPC server with :func:`_grpc_telemetry_interceptor` in front of
        kserve's own interceptors (kserve fixes its list when it builds the server)."""

        async def start(self, max_workers: int) -> None:
            from concurrent import futures

            from grpc import aio
            from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc
            from kserve.protocol.grpc.interceptors import (
                ExceptionToStatusInterceptor,
                LoggingInterceptor,
            )
            from kserve.protocol.grpc.servicer import InferenceServicer

            self._server = aio.server(
                futures.ThreadPoolExecutor(max_workers=max_workers),
                interceptors=(grpc_interceptor, LoggingInterceptor(), ExceptionToStatusInterceptor()),
                options=[
                    (name, self._kwargs.get(name))
                    for name in ("grpc_max_send_message_length", "grpc_max_receive_message_length")
                ],
            )
            grpc_predict_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
                InferenceServicer(self._data_plane, self._model_repository_extension), self._server
            )
            self._server.add_insecure_port(f"[::]:{self._port}")
            log.info("gRPC server on port %d", self._port)
            await self._server.start()
            await self._server.wait_for_termination()

    class _Server(ModelServer):
        def __init__(self, *, enable_grpc: bool, **kwargs: Any):
            # kserve would build its own gRPC server in start(); _serve() adds ours instead.
            super().__init__(registered_models=repository, enable_grpc=False, **kwargs)
            self.dataplane = _StrictDataPlane(model_registry=self.registered_models)
            self.kubeml_grpc = enable_grpc

        async def _serve(self) -> None:
            if self.kubeml_grpc:
                self._grpc_server = _GRPCServer(
                    self.grpc_port,
                    self.dataplane,
                    self.model_repository_extension,
                    kwargs=vars(_kserve_pkg.model_server.args),
                    grace_period=self.grace_period,
                )
                self.servers.append(self._grpc_server.start(self.max_threads))
            await super()._serve()

    app = _kserve_pkg.model_server.app
    logging.getLogger("kserve").addFilter(
        _ClientErrorsWithoutTraceback((InvalidInput, ModelNotFound, ModelNotReady))
    )
    # One timing line per request per clock from kserve's middleware; metrics cover this.
    logging.getLogger("kserve.trace").setLevel(logging.WARNING)

    async def validation_error(_request: Any, exc: RequestValidationError) -> Any:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', '')}"
            for e in exc.errors()[:5]
        )
        return JSONResponse(status_code=400, content={"error": f"invalid request: {problems}"})

    async def inference_timeout(_request: Any, exc: _InferenceTimeout) -> Any:
        log.warning("%s", exc)
        return JSONResponse(status_code=504, content={"error": str(exc)})

    async def http_error(_request: Any, exc: StarletteHTTPException) -> Any:
        return JSONResponse(
            status_code=exc.status_code,
            content={"error": str(exc.detail)},
            headers=getattr(exc, "headers", None),
        )

    if repository is not None:
        _add_repository_routes(app, repository)
    # kserve registers its own handlers at start(); these two types it leaves alone.
    app.exception_handlers[RequestValidationError] = validation_error
    app.exception_handlers[StarletteHTTPException] = http_error
    app.exception_handlers[_InferenceTimeout] = inference_timeout
    app.add_middleware(
        _RequestGuard,
        max_body_bytes=max_body_bytes,
        versions={model.name: model.version} if model is not None and model.version else {},
    )
    from kubeml.serving.telemetry import ModelTelemetry, TelemetryMiddleware

    if model is not None:
        model.telemetry = ModelTelemetry(
            model.name, model.version, tuple(model.spec.classes) if model.spec else ()
        )
    # Added last, so it is outermost: 413s and guard errors are timed and counted too.
    app.add_middleware(
        TelemetryMiddleware,
        versions=versions,
        payload_logger=payload_logger,
        fault=middleware_fault,
    )

    server = _Server(
        http_port=http_port,
        grpc_port=grpc_port or 0,
        enable_grpc=grpc_port is not None,
        workers=1,
        enable_docs_url=False,
        enable_latency_logging=False,
        grace_period=GRACE_PERIOD_S,
        access_log_format=None,
        event_loop="asyncio",
        timeout_keep_alive=65,
        ssl_certfile=None,
        ssl_keyfile=None,
    )
    if model is not None:
        server.register_model(model)
    return server


def _add_repository_routes(app: Any, repository: Any) -> None:
    """Model repository routes, registered before kserve's own (FastAPI matches the first).

    kserve loads in the event loop (every other model stalls meanwhile) and answers 503
    for any load failure; here loads run in a worker thread, an unknown bundle is a 404
    and a model bigger than the whole memory cap a 400.
    """
    import asyncio

    from fastapi.responses import JSONResponse

    from kubeml.errors import BundleError

    async def load(model_name: str) -> Any:
        try:
            await asyncio.to_thread(repository.load, model_name)
        except BundleError as exc:
            status = 400 if "cap" in str(exc) else 404
            return JSONResponse(status_code=status, content={"error": str(exc)})
        return {"name": model_name, "load": True, "loaded": repository.loaded(),
                "used_bytes": repository.used_bytes}

    async def unload(model_name: str) -> Any:
        try:
            repository.unload(model_name)
        except KeyError:
            return JSONResponse(
                status_code=404, content={"error": f"model {model_name!r} is not loaded"}
            )
        return {"name": model_name, "unload": True}

    async def index() -> Any:
        loaded = set(repository.loaded())
        names = sorted(
            d.name for d in repository.root.iterdir() if (d / "kubeml-model.json").is_file()
        )
        return [
            {"name": n, "state": "READY" if n in loaded else "UNAVAILABLE", "reason": ""}
            for n in names
        ]

    app.add_api_route("/v2/repository/models/{model_name}/load", load, methods=["POST"])
    app.add_api_route("/v2/repository/models/{model_name}/unload", unload, methods=["POST"])
    app.add_api_route("/v2/repository/index", index, methods=["POST", "GET"])


def serve_repository(
    models_dir: str | Path,
    *,
    http_port: int,
    grpc_port: int | None = None,
    max_memory_bytes: int,
    runtime: str = "pytorch",
    preload: tuple[str, ...] = (),
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S,
) -> int:
    """Serve every bundle under ``models_dir/NAME`` on demand (V2 repository API), with
    least-recently-used eviction under ``max_memory_bytes``; returns the exit status."""
    from kubeml.serving.repository import BundleRepository

    repository = BundleRepository(models_dir, max_memory_bytes=max_memory_bytes, runtime=runtime)
    for name in preload:
        repository.load(name)
    server = _build_server(
        None,
        repository=repository,
        http_port=http_port,
        grpc_port=grpc_port,
        max_body_bytes=max_body_bytes,
        request_timeout_s=request_timeout_s,
    )
    server.start([])
    return 0


def serve(
    model_dir: str | Path,
    *,
    model_name: str,
    model_version: str = "",
    http_port: int,
    grpc_port: int | None = None,
    max_batch_size: int | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    payload_log: str | None = None,
    payload_sample_rate: float = 1.0,
    fault: Any = None,
    runtime: str = "pytorch",
    batching: Any = None,
    request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S,
) -> int:
    """Serve the bundle in ``model_dir`` until SIGTERM/SIGINT; returns the exit status.

    ``max_batch_size`` caps the instances of one request; ``batching`` (a
    :class:`~kubeml.serving.batching.BatchingConfig`) turns on adaptive batching across
    requests; ``request_timeout_s`` (0: none) is the deadline of one inference.
    ``payload_log`` (a JSONL path or an http(s) URL) turns on sampled payload logging;
    ``fault`` (a :class:`~kubeml.serving.telemetry.FaultInjection`) is the fault-injection
    hook used by rollout tests.
    """
    model_dir = Path(model_dir)
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")
    _check_timeouts(request_timeout_s, batching)
    _preflight(model_dir, runtime)
    from kubeml.serving.telemetry import PayloadLogger

    payload_logger = (
        PayloadLogger(payload_log, sample_rate=payload_sample_rate) if payload_log else None
    )

    from kubeml.serving.model import DEFAULT_MAX_BATCH_SIZE, BundleModel

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
    server = _build_server(
        model,
        http_port=http_port,
        grpc_port=grpc_port,
        max_body_bytes=max_body_bytes,
        payload_logger=payload_logger,
        fault=fault,
        request_timeout_s=request_timeout_s,
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


def _check_timeouts(request_timeout_s: float, batching: Any) -> None:
    if not math.isfinite(request_timeout_s) or request_timeout_s < 0:
        raise ValueError(
            f"request timeout must be >= 0 seconds (0: none), got {request_timeout_s}"
        )
    if batching is not None and request_timeout_s and (
        batching.max_latency_ms / 1000 >= request_timeout_s
    ):
        raise ValueError(
            f"batch max latency {batching.max_latency_ms:g} ms is not below the request "
            f"timeout {request_timeout_s:g} s: requests would time out waiting for a batch; "
            "lower --batch-max-latency-ms or raise --request-timeout-s"
        )


def _port(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port must be 1..65535, got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m kubeml.serving.server",
        description="Serve a kubeml model bundle over KServe V1 and Open Inference Protocol V2.",
    )
    p.add_argument("--model-dir", type=Path, help="bundle directory (one model)")
    p.add_argument("--model-name", help="name in /v1/models/NAME and /v2/models/NAME")
    multi = p.add_argument_group(
        "multi-model", "serve every bundle under a directory, loaded through /v2/repository"
    )
    multi.add_argument("--models-dir", type=Path, help="directory of bundles, one per NAME/")
    multi.add_argument(
        "--max-memory-mb", type=float, default=1024.0, help="cap on loaded weights; LRU eviction"
    )
    multi.add_argument("--preload", default="", help="comma-separated models to load at start")
    p.add_argument("--model-version", default="", help="version reported in V2 metadata/responses")
    p.add_argument("--http-port", required=True, type=_port)
    p.add_argument("--grpc-port", type=_port, default=None, help="enable gRPC V2 on this port")
    p.add_argument("--max-batch-size", type=int, default=None, help="most instances per request")
    p.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES)
    p.add_argument(
        "--request-timeout-s",
        type=float,
        default=DEFAULT_REQUEST_TIMEOUT_S,
        help="answer 504 when one inference takes longer (0: no limit)",
    )
    batching = p.add_argument_group(
        "adaptive batching",
        "coalesce concurrent requests into one forward pass (single-model mode; off by default)",
    )
    batching.add_argument(
        "--batch-max-size",
        type=int,
        default=None,
        help="most instances per forward pass, summed over requests; turns batching on",
    )
    batching.add_argument(
        "--batch-max-latency-ms",
        type=float,
        default=None,
        help="longest wait of the oldest queued request before its batch runs (default 5)",
    )
    p.add_argument("--runtime", choices=RUNTIMES, default="pytorch", help="model runtime")
    p.add_argument(
        "--payload-log",
        default=None,
        help="sink for sampled payloads: a JSONL file, an http(s) URL, "
        "or kafka://HOST:PORT[,HOST:PORT]/TOPIC",
    )
    p.add_argument(
        "--payload-sample-rate", type=float, default=1.0, help="share of requests logged (0, 1]"
    )
    faults = p.add_argument_group(
        "fault injection", "test hook: make this server behave like a bad model version"
    )
    faults.add_argument(
        "--fault-error-rate",
        type=float,
        default=0.0,
        help="share of infer requests answered 503 (gRPC: UNAVAILABLE) at once",
    )
    faults.add_argument(
        "--fault-latency-ms",
        type=float,
        default=0.0,
        help="delay added to each infer request that reaches the model (inside its deadline)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    from kubeml.serving.batching import BatchingConfig
    from kubeml.serving.telemetry import FaultInjection

    batching = None
    if args.batch_max_size is not None:
        if args.models_dir is not None:
            parser.error("--batch-max-size is for one model (--model-dir), not --models-dir")
        try:
            batching = BatchingConfig(
                args.batch_max_size,
                *(() if args.batch_max_latency_ms is None else (args.batch_max_latency_ms,)),
            )
        except ValueError as exc:
            parser.error(str(exc))
    elif args.batch_max_latency_ms is not None:
        parser.error("--batch-max-latency-ms needs --batch-max-size (which turns batching on)")
    try:
        _check_timeouts(args.request_timeout_s, batching)
    except ValueError as exc:
        parser.error(str(exc))

    if args.models_dir is not None:
        if args.model_dir is not None:
            parser.error("use either --model-dir (one model) or --models-dir (many), not both")
        logging.basicConfig(
            level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )
        try:
            return serve_repository(
                args.models_dir,
                http_port=args.http_port,
                grpc_port=args.grpc_port,
                max_memory_bytes=int(args.max_memory_mb * 1024 * 1024),
                runtime=args.runtime,
                preload=tuple(n for n in args.preload.split(",") if n),
                max_body_bytes=args.max_body_bytes,
                request_timeout_s=args.request_timeout_s,
            )
        except BundleError as exc:
            log.error("%s", exc)
            return EXIT_LOAD_FAILED
    if args.model_dir is None or not args.model_name:
        parser.error("--model-dir and --model-name are required (or --models-dir)")
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", args.model_name):
        log.error(
            "model name %r is not URL-safe; use letters, digits, '.', '_', '-'", args.model_name
        )
        return 2
    try:
        return serve(
            args.model_dir,
            model_name=args.model_name,
            model_version=args.model_version,
            http_port=args.http_port,
            grpc_port=args.grpc_port,
            max_batch_size=args.max_batch_size,
            max_body_bytes=args.max_body_bytes,
            payload_log=args.payload_log,
            payload_sample_rate=args.payload_sample_rate,
            fault=FaultInjection(args.fault_error_rate, args.fault_latency_ms),
            runtime=args.runtime,
            batching=batching,
            request_timeout_s=args.request_timeout_s,
        )
    except BundleError as exc:
        log.error("%s", exc)
        return EXIT_LOAD_FAILED


if __name__ == "__main__":
    sys.exit(main())
