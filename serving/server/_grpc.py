"""The model server's gRPC side: Open Inference Protocol V2 with kubeml's telemetry.

Where it sits: in ``kubeml.serving.server``; :class:`~kubeml.serving.server._kserve.KubemlModelServer`
starts a :class:`TelemetryGRPCServer` when the server runs with ``--grpc-port``. It shares
the REST side's data plane (deadlines, strict decoding) and its metrics: ``ModelInfer``
calls are counted as protocol ``grpc`` with the HTTP status their gRPC code stands for
(``kubeml.serving.protocol``), and the fault-injection hook's error rate applies to them.

Imports grpc and kserve: load it only to serve.
"""

from __future__ import annotations

import logging
import time
from concurrent import futures
from typing import Any

import grpc
from grpc import aio
from grpc.aio import ServerInterceptor

from kubeml.serving._kserve import kserve  # noqa: F401  (kserve first, with a bare argv)
from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc
from kserve.protocol.grpc.interceptors import ExceptionToStatusInterceptor, LoggingInterceptor
from kserve.protocol.grpc.server import GRPCServer
from kserve.protocol.grpc.servicer import InferenceServicer
from kubeml.serving.protocol import grpc_http_status
from kubeml.serving.server._auth import ADMIN, INFERENCE, bearer, grpc_access
from kubeml.serving.telemetry import LATENCY, REQUESTS, ErrorSchedule, FaultInjection, series_labels

__all__ = ["GRPC_INFER_METHOD", "GrpcTelemetryInterceptor", "TelemetryGRPCServer"]

log = logging.getLogger("kubeml.serving.server")

#: Full name of the OIP inference method, the one gRPC method that is timed, counted and
#: may get an injected fault (health and metadata stay truthful, as over HTTP).
GRPC_INFER_METHOD = "/inference.GRPCInferenceService/ModelInfer"
#: The repository RPCs; refused on a single-model server, as the REST repository routes are.
GRPC_REPOSITORY_METHODS = frozenset({
    "/inference.GRPCInferenceService/RepositoryModelLoad",
    "/inference.GRPCInferenceService/RepositoryModelUnload",
    "/inference.GRPCInferenceService/RepositoryIndex",
})


def _status_label(code: Any) -> str:
    """The HTTP status (as the metrics label) a gRPC status code stands for."""
    return str(grpc_http_status(code))


class GrpcTelemetryInterceptor(ServerInterceptor):
    """A ``grpc.aio`` server interceptor: the gRPC side of
    :class:`~kubeml.serving.telemetry.TelemetryMiddleware`.

    ``ModelInfer`` calls are timed and counted in ``kubeml_requests_total`` /
    ``kubeml_request_latency_seconds`` with protocol ``grpc``, and, when ``fault`` has an
    error rate, that share of them is answered ``UNAVAILABLE`` at once (HTTP's 503).
    Registered outermost, so kserve's exception mapping has set the status it reads.
    ``versions.get(name)`` gives the version a model's metrics are labelled with.
    """

    def __init__(self, versions: Any, fault: FaultInjection | None, *, repository_api: bool = False,
                 inference_tokens: Any = None, admin_tokens: Any = None):
        self.versions = versions
        self.repository_api = repository_api
        """False (one model): the repository RPCs answer PERMISSION_DENIED."""
        self.inference_tokens = inference_tokens
        """A :class:`~kubeml.serving.server._auth.TokenFile`: inference RPCs need one of its
        tokens in ``authorization: Bearer ...`` metadata; None: inference is open."""
        self.admin_tokens = admin_tokens
        """The admin token file the repository RPCs need (multi-model servers)."""
        self._errors = ErrorSchedule(fault.error_rate if fault is not None else 0.0)

    async def intercept_service(self, continuation: Any, details: Any) -> Any:
        if not self.repository_api and details.method in GRPC_REPOSITORY_METHODS:
            return _refuse(details.method)
        need = grpc_access(details.method)
        tokens = self.admin_tokens if need == ADMIN else self.inference_tokens if need == INFERENCE else None
        if need == ADMIN and tokens is None:
            return _refuse(details.method)
        if tokens is not None:
            given = next((v for k, v in details.invocation_metadata or () if k == "authorization"), None)
            if not tokens.accepts(bearer(given if isinstance(given, str) else None)):
                return _unauthenticated(need)
        handler = await continuation(details)
        if details.method != GRPC_INFER_METHOD or handler is None or handler.unary_unary is None:
            return _strict_decoding(handler)
        inner = handler.unary_unary
        versions, errors = self.versions, self._errors

        async def model_infer(request: Any, context: Any) -> Any:
            model, version = series_labels(request.model_name, versions)
            started = time.perf_counter()
            status = "500"
            try:
                if errors.next_fails():
                    status = _status_label(grpc.StatusCode.UNAVAILABLE)
                    await context.abort(
                        grpc.StatusCode.UNAVAILABLE, "injected fault (fault-injection hook)"
                    )
                response = await inner(request, context)
                code = context.code()
                status = _status_label(code if code is not None else grpc.StatusCode.OK)
                return response
            except BaseException:
                code = context.code()
                if code is not None:
                    status = _status_label(code)
                elif context.cancelled():
                    status = "499"
                raise
            finally:
                REQUESTS.labels(model, version, "grpc", status).inc()
                LATENCY.labels(model, version, "grpc").observe(time.perf_counter() - started)

        return _strict_decoding(grpc.unary_unary_rpc_method_handler(
            model_infer,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        ))


def _strict_decoding(handler: Any) -> Any:
    """``handler`` with its request parsed inside it: bytes that are not the method's
    message answer INVALID_ARGUMENT (HTTP's 400), not the UNKNOWN (a 5xx) grpc itself
    gives a request its deserializer cannot read."""
    if handler is None or handler.unary_unary is None or handler.request_deserializer is None:
        return handler
    inner, parse = handler.unary_unary, handler.request_deserializer

    async def decoded(raw: bytes, context: Any) -> Any:
        try:
            request = parse(raw)
        except Exception:  # protobuf's DecodeError; its type depends on the backend
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "request is not a valid protobuf message of this method")
        return await inner(request, context)

    return grpc.unary_unary_rpc_method_handler(
        decoded, request_deserializer=None, response_serializer=handler.response_serializer
    )


def _refuse(method: str) -> Any:
    """A handler that answers PERMISSION_DENIED (HTTP's 403) without reading the request."""

    async def refused(_request: Any, context: Any) -> Any:
        await context.abort(
            grpc.StatusCode.PERMISSION_DENIED,
            f"{method.rsplit('/', 1)[-1]}: the model repository API is disabled on a single-model server",
        )

    return grpc.unary_unary_rpc_method_handler(refused)


def _unauthenticated(need: str) -> Any:
    """A handler that answers UNAUTHENTICATED (HTTP's 401) without reading the request."""
    what = "the admin token" if need == ADMIN else "an inference token"

    async def refused(_request: Any, context: Any) -> Any:
        await context.abort(
            grpc.StatusCode.UNAUTHENTICATED, f"this method needs {what} (metadata authorization: Bearer TOKEN)"
        )

    return grpc.unary_unary_rpc_method_handler(refused)


class TelemetryGRPCServer(GRPCServer):
    """kserve's gRPC server with a :class:`GrpcTelemetryInterceptor` in front of kserve's
    own interceptors (kserve fixes its list when it builds the server)."""

    def __init__(self, *args: Any, telemetry: GrpcTelemetryInterceptor, host: str = "127.0.0.1",
                 tls: Any = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.telemetry = telemetry
        self.host = host
        self.tls = tls

    async def start(self, max_workers: int) -> None:
        self._server = aio.server(
            futures.ThreadPoolExecutor(max_workers=max_workers),
            interceptors=(self.telemetry, LoggingInterceptor(), ExceptionToStatusInterceptor()),
            options=[
                (name, self._kwargs.get(name))
                for name in ("grpc_max_send_message_length", "grpc_max_receive_message_length")
            ],
        )
        grpc_predict_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
            InferenceServicer(self._data_plane, self._model_repository_extension), self._server
        )
        address = f"[{self.host}]" if ":" in self.host else self.host
        if self.tls is not None:
            self._server.add_secure_port(f"{address}:{self._port}", self.tls.grpc_credentials())
        else:
            self._server.add_insecure_port(f"{address}:{self._port}")
        log.info("gRPC server on %s:%d", self.host, self._port)
        await self._server.start()
        await self._server.wait_for_termination()
