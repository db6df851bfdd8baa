"""The glue between kubeml's model server and kserve's ``ModelServer``.

Where it sits: in ``kubeml.serving.server``, above ``_dataplane.py`` and ``_grpc.py``;
``_app.py`` builds a :class:`KubemlModelServer` and wires routes and middleware onto
:func:`kserve_app`. kserve itself is imported through ``kubeml.serving._kserve`` (the one
place that imports the package, with a bare ``sys.argv``), which the model classes use too.

kserve keeps its FastAPI app and its parsed command-line defaults as globals of
``kserve.model_server``; :func:`kserve_app` and :func:`kserve_args` are the only two
places kubeml reads them.
"""

from __future__ import annotations

import logging
from typing import Any

from kubeml.serving._kserve import InvalidInput, ModelNotFound, ModelNotReady, ModelServer, kserve
from kubeml.serving.server._dataplane import StrictDataPlane
from kubeml.serving.server._grpc import GrpcTelemetryInterceptor, TelemetryGRPCServer
from kubeml.serving.server._http import DEFAULT_HEADER_TIMEOUT_S, header_timeout_protocol

__all__ = ["KubemlModelServer", "kserve_app", "kserve_args", "quiet_kserve_logs"]


def kserve_app() -> Any:
    """kserve's FastAPI app: the one every ``ModelServer`` in this process serves."""
    return kserve.model_server.app


def kserve_args() -> dict[str, Any]:
    """kserve's command-line defaults (parsed from a bare argv), e.g. gRPC message limits."""
    return vars(kserve.model_server.args)


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


def quiet_kserve_logs() -> None:
    """One warning line per rejected request; no per-request timing lines."""
    logging.getLogger("kserve").addFilter(
        _ClientErrorsWithoutTraceback((InvalidInput, ModelNotFound, ModelNotReady))
    )
    # One timing line per request per clock from kserve's middleware; metrics cover this.
    logging.getLogger("kserve.trace").setLevel(logging.WARNING)


class KubemlModelServer(ModelServer):
    """kserve's ``ModelServer`` with kubeml's data plane and gRPC server.

    ``repository`` (a :class:`~kubeml.serving.repository.BundleRepository`) makes it a
    multi-model server; ``grpc_telemetry`` is set when it also serves gRPC.
    ``request_timeout_s`` and ``fault_latency_s`` go to :class:`StrictDataPlane`; the
    other keyword arguments are kserve's own.
    """

    def __init__(
        self,
        *,
        repository: Any = None,
        grpc_telemetry: GrpcTelemetryInterceptor | None = None,
        request_timeout_s: float,
        fault_latency_s: float = 0.0,
        host: str = "127.0.0.1",
        tls: Any = None,
        header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S,
        **kwargs: Any,
    ):
        # kserve would build its own gRPC server in start(); _serve() adds ours instead.
        super().__init__(registered_models=repository, enable_grpc=False, **kwargs)
        self.dataplane = StrictDataPlane(
            self.registered_models,
            request_timeout_s=request_timeout_s,
            fault_latency_s=fault_latency_s,
            serves_repository=repository is not None,
        )
        self.grpc_telemetry = grpc_telemetry
        self.host = host
        """Address REST and gRPC listen on; kserve itself always binds every interface."""
        self.tls = tls
        """A :class:`~kubeml.serving.server._auth.ServerTls` (mTLS on both sockets), or None."""
        self.header_timeout_s = header_timeout_s

    async def _serve(self) -> None:
        if self.grpc_telemetry is not None:
            self._grpc_server = TelemetryGRPCServer(
                self.grpc_port,
                self.dataplane,
                self.model_repository_extension,
                kwargs=kserve_args(),
                grace_period=self.grace_period,
                telemetry=self.grpc_telemetry,
                host=self.host,
                tls=self.tls,
            )
            self.servers.append(self._grpc_server.start(self.max_threads))
        # kserve's RESTServer hard-codes host 0.0.0.0 in its uvicorn Config; uvicorn reads it
        # only when the server coroutine runs, after this point.
        rest = getattr(self, "_rest_server", None)
        if rest is None or not hasattr(rest, "config"):
            raise RuntimeError("kserve's REST server was not built as expected; cannot bind "
                               f"{self.host} (kserve {getattr(kserve, '__version__', '?')})")
        rest.config.host = self.host
        rest.config.http = header_timeout_protocol(self.header_timeout_s)
        if self.tls is not None:
            self.tls.configure_uvicorn(rest.config)
        await super()._serve()
