"""The model server's REST app: kserve's FastAPI app with kubeml's routes and middleware.

Where it sits: in ``kubeml.serving.server``; :func:`build_server` is what ``_run.py``'s
``serve`` and ``serve_repository`` call. It closes the gaps where kserve answers a client
mistake with a 5xx or no JSON:

* FastAPI's 422 validation errors, unknown routes (404) and wrong methods (405) answer
  with the same ``{"error": "..."}`` body as every other error;
* bodies above ``--max-body-bytes`` get a 413 before they are buffered, and JSON nested
  deeply enough to exhaust the parser's recursion gets a 400 (:class:`_RequestGuard`);
* ``/v2/models/NAME/versions/V/...`` is answered for the served version (kserve itself
  answers 501 for any versioned route) and 404 for any other version;
* the V2 model repository routes load in a worker thread (multi-model mode).

Middleware order, outermost first: telemetry (so 413s and guard errors are timed and
counted too), the request guard, kserve's app.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from typing import Any

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from kubeml.config import DEFAULT_REQUEST_TIMEOUT_S
from kubeml.errors import BundleError
from kubeml.serving.protocol import error_body, redact, send_json_error
from kubeml.serving.server._dataplane import InferenceTimeout
from kubeml.serving.server._auth import RestAuth, ServerTls, TokenFile
from kubeml.serving.server._grpc import GrpcTelemetryInterceptor
from kubeml.serving.server._http import DEFAULT_HEADER_TIMEOUT_S, DEFAULT_IDLE_TIMEOUT_S
from kubeml.serving.server._kserve import KubemlModelServer, kserve_app, quiet_kserve_logs
from kubeml.serving.server._limits import (
    CLIENT_DEADLINE_HEADER,
    DEFAULT_MAX_CONCURRENCY,
    GRACE_PERIOD_S,
    OVERLOAD_RETRY_AFTER_S,
)
from kubeml.serving.telemetry import FaultInjection, ModelTelemetry, TelemetryMiddleware, infer_route

__all__ = ["LIVENESS_PATH", "Liveness", "build_server"]

log = logging.getLogger("kubeml.serving.server")

_VERSIONED_ROUTE = re.compile(
    r"^/v2/models/(?P<name>[^/]+)/versions/(?P<version>[^/]+)(?P<rest>/.*)?$"
)


# --------------------------------------------------------------------------------------
# ASGI guard: body limit, deep nesting, versioned routes. Plain ASGI so it depends on no
# particular Starlette/FastAPI version.
# --------------------------------------------------------------------------------------


#: Path prefix of the V2 model repository API (load, unload, index). kserve serves it in
#: single-model mode too: one anonymous unload would take the served model down for good.
REPOSITORY_PREFIX = "/v2/repository"
#: Liveness: 200 while the model loads or serves, 503 once its load failed or it was lost.
LIVENESS_PATH = "/v2/health/live"


class Liveness:
    """Whether the process is worth keeping: the answer of ``/v2/health/live``.

    Loading is live (the kubelet must not restart a server that is still reading its
    weights; readiness says 503 meanwhile). A model whose load failed, or that was loaded
    and is no longer ready, is not live: a restart is the cure. A multi-model server
    (``model`` None) is live while it runs; its models come and go by design.
    """

    def __init__(self, model: Any = None):
        self.model = model
        self.state = "loading" if model is not None else "loaded"
        self.reason = ""

    def loaded(self) -> None:
        self.state = "loaded"

    def failed(self, reason: str) -> None:
        self.state, self.reason = "failed", reason

    def check(self) -> str | None:
        """None when live, else why not."""
        if self.state == "failed":
            return f"the model failed to load: {self.reason}"
        if self.state == "loaded" and self.model is not None and not getattr(self.model, "ready", False):
            return "the model was loaded and is no longer ready"
        return None


class _LivenessProbe:
    """``GET /v2/health/live`` answers 503 with the reason when :class:`Liveness` says so;
    otherwise kserve answers it (200, ``{"live": true}``)."""

    def __init__(self, app: Any, *, liveness: Liveness):
        self.app = app
        self.liveness = liveness

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope.get("path") == LIVENESS_PATH:
            reason = self.liveness.check()
            if reason is not None:
                await send_json_error(send, 503, f"not live: {reason}")
                return
        await self.app(scope, receive, send)


class _RedactErrors:
    """Error answers (4xx/5xx JSON) never carry a filesystem path or a traceback.

    kubeml's own messages are written without them; this catches the ones kserve builds
    from an exception's text (its catch-all handler answers ``"{type} : {exc}"``). Error
    bodies are small, so they are buffered and rewritten; other answers stream through.
    """

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start: dict | None = None
        chunks: list[bytes] = []

        async def redacting_send(message: dict) -> None:
            nonlocal start
            if message["type"] == "http.response.start" and message.get("status", 200) >= 400:
                start = message
                return
            if start is None or message["type"] != "http.response.body":
                await send(message)
                return
            chunks.append(message.get("body", b""))
            if message.get("more_body"):
                return
            body = b"".join(chunks)
            try:
                payload = json.loads(body)
            except ValueError:
                payload = None
            if isinstance(payload, dict) and isinstance(payload.get("error"), str):
                body = json.dumps({**payload, "error": redact(payload["error"])}).encode()
            elif _looks_internal(body):
                body = error_body("internal error")
            headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
            await send({**start, "headers": [*headers, (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, redacting_send)


def _looks_internal(body: bytes) -> bool:
    text = body.decode("utf-8", "replace")
    return redact(text) != text


class _ConcurrencyLimit:
    """At most ``limit`` inference requests in flight; the next is answered 503 + Retry-After.

    Only inference routes count (health, metadata and /metrics always answer, so probes and
    scrapes see an overloaded server as overloaded, not dead). No queue: the ASGI server's
    accept backlog is the only wait, and it is bounded by the kernel.
    """

    def __init__(self, app: Any, *, limit: int):
        self.app = app
        self.limit = limit
        self.in_flight = 0

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or self.limit <= 0 or infer_route(scope.get("path", "")) is None:
            await self.app(scope, receive, send)
            return
        if self.in_flight >= self.limit:
            async def with_retry_after(message: dict) -> None:
                if message["type"] == "http.response.start":
                    retry = str(OVERLOAD_RETRY_AFTER_S).encode()
                    message = {**message, "headers": [*message.get("headers", []), (b"retry-after", retry)]}
                await send(message)

            await send_json_error(with_retry_after, 503, f"overloaded: {self.limit} inference requests "
                                  f"in flight; retry after {OVERLOAD_RETRY_AFTER_S} s")
            return
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1


class _RequestGuard:
    """Version routing, body limits, and the repository API only where there is a repository."""

    def __init__(self, app: Any, *, max_body_bytes: int, versions: dict[str, str], repository_api: bool = False):
        # Raised from receive() so that FastAPI (which turns any other exception raised
        # while reading the body into a generic 400) passes it through unchanged.
        self._too_large_error = StarletteHTTPException
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.versions = versions
        self.repository_api = repository_api

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        path = scope["path"]
        if not self.repository_api and (path == REPOSITORY_PREFIX or path.startswith(REPOSITORY_PREFIX + "/")):
            await send_json_error(
                send, 403, "the model repository API (load, unload, index) is disabled on a single-model server"
            )
            return
        match = _VERSIONED_ROUTE.match(path)
        if match:
            name, version, rest = match["name"], match["version"], match["rest"] or ""
            served = self.versions.get(name)
            if served is not None and version != served:
                await send_json_error(
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
                    await send_json_error(send, 400, "invalid Content-Length header")
                    return
                if declared > self.max_body_bytes:
                    await send_json_error(send, 413, self._too_large())
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
            await send_json_error(send, 400, "request JSON is nested too deeply")

    def _too_large(self) -> str:
        return (
            f"request body exceeds {self.max_body_bytes} bytes; "
            "send fewer instances per request"
        )


class _RepositoryVersions:
    """``versions.get(name)`` for a multi-model server: whatever version is loaded now."""

    def __init__(self, repository: Any):
        self.repository = repository

    def get(self, name: str, default: str = "") -> str:
        model = self.repository.models.get(name)
        return getattr(model, "version", default) if model is not None else default

    def __contains__(self, name: object) -> bool:
        """A model this server can serve: loaded, or a bundle in the repository directory."""
        if not isinstance(name, str) or not name or "/" in name or name in (".", ".."):
            return False
        return name in self.repository.models or (self.repository.root / name / "kubeml-model.json").is_file()


# --------------------------------------------------------------------------------------
# Exception handlers: every error answers {"error": "..."}
# --------------------------------------------------------------------------------------


async def _validation_error(_request: Any, exc: RequestValidationError) -> Any:
    problems = "; ".join(
        f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', '')}"
        for e in exc.errors()[:5]
    )
    return JSONResponse(status_code=400, content={"error": f"invalid request: {problems}"})


async def _inference_timeout(_request: Any, exc: InferenceTimeout) -> Any:
    log.warning("%s", exc)
    headers = {CLIENT_DEADLINE_HEADER: "client"} if getattr(exc, "client", False) else None
    return JSONResponse(status_code=504, content={"error": str(exc)}, headers=headers)


async def _http_error(_request: Any, exc: StarletteHTTPException) -> Any:
    return JSONResponse(
        status_code=exc.status_code,
        content={"error": str(exc.detail)},
        headers=getattr(exc, "headers", None),
    )


def _add_repository_routes(app: Any, repository: Any) -> None:
    """Model repository routes, registered before kserve's own (FastAPI matches the first).

    kserve loads in the event loop (every other model stalls meanwhile) and answers 503
    for any load failure; here loads run in a worker thread, an unknown bundle is a 404
    and a model bigger than the whole memory cap a 400.
    """

    async def load(model_name: str) -> Any:
        try:
            await asyncio.to_thread(repository.load, model_name)
        except BundleError as exc:
            # The message names the bundle's path on this machine: logged, not answered.
            log.warning("load of model %r refused: %s", model_name, exc)
            if "cap" in str(exc):
                return JSONResponse(status_code=400, content={
                    "error": f"model {model_name!r} is larger than the server's memory cap"})
            return JSONResponse(status_code=404, content={
                "error": f"model {model_name!r} has no loadable bundle in the repository"})
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


def build_server(
    model: Any,
    *,
    repository: Any = None,
    host: str = "127.0.0.1",
    http_port: int,
    grpc_port: int | None,
    max_body_bytes: int,
    payload_logger: Any = None,
    fault: FaultInjection | None = None,
    request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S,
    max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
    auth_tokens: TokenFile | None = None,
    admin_tokens: TokenFile | None = None,
    tls: ServerTls | None = None,
    header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S,
    idle_timeout_s: int = DEFAULT_IDLE_TIMEOUT_S,
) -> KubemlModelServer:
    """A ready-to-start server for ``model`` (one model) or ``repository`` (many).

    ``grpc_port`` None: REST only. ``fault`` is the fault-injection hook: its errors are
    answered by the telemetry middleware and the gRPC interceptor, its latency is spent
    inside the data plane's deadline. ``auth_tokens``: inference needs one of its tokens
    (None: open); ``admin_tokens``: the repository API's token (required with a
    repository); ``tls``: mTLS on REST and gRPC. ``header_timeout_s`` bounds the time to
    send a request's headers, ``idle_timeout_s`` a kept-alive connection's idle time.
    """
    if repository is not None and admin_tokens is None:
        raise ValueError("a multi-model server needs an admin token file for its repository API")
    # The injected latency is spent inside the deadline, as a slow forward pass would be;
    # the middleware (HTTP) and the gRPC interceptor inject errors only, answered at once.
    fault_latency_s = fault.latency_ms / 1000 if fault is not None else 0.0
    middleware_fault = FaultInjection(error_rate=fault.error_rate) if fault is not None else None

    versions = {model.name: model.version} if model is not None else _RepositoryVersions(repository)
    grpc_telemetry = (
        GrpcTelemetryInterceptor(versions, fault, repository_api=repository is not None,
                                 inference_tokens=auth_tokens, admin_tokens=admin_tokens)
        if grpc_port is not None else None
    )

    app = kserve_app()
    quiet_kserve_logs()

    if repository is not None:
        _add_repository_routes(app, repository)
    # kserve registers its own handlers at start(); these two types it leaves alone.
    app.exception_handlers[RequestValidationError] = _validation_error
    app.exception_handlers[StarletteHTTPException] = _http_error
    app.exception_handlers[InferenceTimeout] = _inference_timeout
    app.add_middleware(
        _RequestGuard,
        max_body_bytes=max_body_bytes,
        versions={model.name: model.version} if model is not None and model.version else {},
        repository_api=repository is not None,
    )
    if model is not None:
        model.telemetry = ModelTelemetry(
            model.name, model.version, tuple(model.spec.classes) if model.spec else ()
        )
    # Inside the telemetry, so the overload 503s are counted like any other answer.
    app.add_middleware(_ConcurrencyLimit, limit=max_concurrency)
    # Outside the concurrency limit: an unauthenticated request never takes a slot.
    app.add_middleware(RestAuth, inference=auth_tokens, admin=admin_tokens)
    liveness = Liveness(model)
    app.add_middleware(_LivenessProbe, liveness=liveness)
    app.add_middleware(_RedactErrors)
    # Added last, so it is outermost: 413s and guard errors are timed and counted too.
    app.add_middleware(
        TelemetryMiddleware,
        versions=versions,
        payload_logger=payload_logger,
        fault=middleware_fault,
    )

    server = KubemlModelServer(
        repository=repository,
        grpc_telemetry=grpc_telemetry,
        request_timeout_s=request_timeout_s,
        fault_latency_s=fault_latency_s,
        host=host,
        http_port=http_port,
        grpc_port=grpc_port or 0,
        tls=tls,
        header_timeout_s=header_timeout_s,
        workers=1,
        enable_docs_url=False,
        enable_latency_logging=False,
        grace_period=GRACE_PERIOD_S,
        access_log_format=None,
        event_loop="asyncio",
        timeout_keep_alive=idle_timeout_s,
        ssl_certfile=None,
        ssl_keyfile=None,
    )
    server.liveness = liveness
    if model is not None:
        server.register_model(model)
    return server
