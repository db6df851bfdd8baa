"""Who may call the model server: bearer tokens from a file, and which paths need which.

Where it sits: the light part of ``kubeml.serving.server``'s access control (no kserve, no
grpc). ``_app.py`` puts :class:`RestAuth` in front of the REST app and ``_grpc.py`` asks
:func:`grpc_access` for each gRPC method; mTLS, the other way to authenticate inference,
is configured on the listening sockets themselves (``_kserve.py``, ``_grpc.py``).

Three kinds of path (:func:`rest_access`, :func:`grpc_access`):

* ``open``: liveness, readiness and ``/metrics``. The kubelet's probes and Prometheus
  carry no credentials, and these answers say nothing about the model's data.
* ``admin``: the V2 model repository API (load, unload, index). Always needs the admin
  token; a multi-model server does not start without one (single-model servers refuse
  these paths anyway, with 403).
* ``inference``: everything else (infer, metadata). Needs an inference token when the
  server runs with ``--auth-token-file``; open otherwise (the default on loopback).

Tokens come from files (:class:`~kubeml.serving.tokens.TokenFile`: one per line, re-read
when the file changes, so a mounted Secret can be rotated without a restart).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from kubeml.errors import ConfigError
from kubeml.serving.protocol import send_json_error
from kubeml.serving.tokens import TokenFile, bearer

__all__ = ["ADMIN", "INFERENCE", "OPEN", "RestAuth", "ServerTls", "TokenFile", "bearer", "grpc_access", "rest_access"]

OPEN, INFERENCE, ADMIN = "open", "inference", "admin"

_OPEN_REST = re.compile(r"/v2/health/(live|ready)|/v2/models/[^/]+(/versions/[^/]+)?/ready|/metrics|/v1/models/[^/:]+/ready")
_REPOSITORY = re.compile(r"/v2/repository(/.*)?")
_OPEN_GRPC = frozenset({"ServerLive", "ServerReady", "ModelReady"})
_ADMIN_GRPC = frozenset({"RepositoryModelLoad", "RepositoryModelUnload", "RepositoryIndex"})


def rest_access(path: str) -> str:
    """What a REST path needs: :data:`OPEN`, :data:`INFERENCE` or :data:`ADMIN`.

    >>> rest_access("/v2/health/live"), rest_access("/v2/models/d/infer"), rest_access("/v2/repository/index")
    ('open', 'inference', 'admin')
    """
    if _REPOSITORY.fullmatch(path):
        return ADMIN
    return OPEN if _OPEN_REST.fullmatch(path) else INFERENCE


def grpc_access(method: str) -> str:
    """What a gRPC method (``/inference.GRPCInferenceService/NAME``) needs.

    >>> grpc_access("/inference.GRPCInferenceService/ModelInfer"), grpc_access("/x/RepositoryModelUnload")
    ('inference', 'admin')
    """
    name = method.rsplit("/", 1)[-1]
    if name in _ADMIN_GRPC:
        return ADMIN
    return OPEN if name in _OPEN_GRPC else INFERENCE


class RestAuth:
    """ASGI middleware: the bearer token each path needs (see the module docstring).

    ``inference`` None: inference is open; ``admin`` None: admin paths are refused (403),
    which is what a single-model server wants anyway.
    """

    def __init__(self, app: Any, *, inference: TokenFile | None, admin: TokenFile | None):
        self.app = app
        self.inference = inference
        self.admin = admin

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        need = rest_access(scope.get("path", ""))
        tokens = self.admin if need == ADMIN else self.inference if need == INFERENCE else None
        if need == OPEN or (need == INFERENCE and tokens is None) or (need == ADMIN and tokens is None):
            # ADMIN without tokens: the single-model guard inside answers 403.
            await self.app(scope, receive, send)
            return
        header = next((v.decode("latin-1") for k, v in scope.get("headers", ()) if k == b"authorization"), None)
        if tokens.accepts(bearer(header)):
            await self.app(scope, receive, send)
            return
        what = "the admin token" if need == ADMIN else "an inference token"
        await send_json_error(
            _with_challenge(send), 401,
            f"this path needs {what} (Authorization: Bearer TOKEN)",
        )


def _with_challenge(send: Any) -> Any:
    async def challenge(message: dict) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", []),
                                              (b"www-authenticate", b'Bearer realm="kubeml"')]}
        await send(message)

    return challenge


class ServerTls:
    """mTLS on the server's sockets: its certificate and key, and the CA that signs the
    clients' certificates. A client without a certificate from that CA fails the TLS
    handshake, on REST and gRPC alike, before any request is read."""

    def __init__(self, cert_file: str | Path, key_file: str | Path, client_ca_file: str | Path):
        self.cert_file, self.key_file, self.client_ca_file = (
            Path(cert_file), Path(key_file), Path(client_ca_file))
        for flag, path in (("--tls-cert-file", self.cert_file), ("--tls-key-file", self.key_file),
                           ("--tls-client-ca-file", self.client_ca_file)):
            if not path.is_file():
                raise ConfigError(f"{flag} {path}: no such file")

    def grpc_credentials(self) -> Any:
        import grpc

        return grpc.ssl_server_credentials(
            [(self.key_file.read_bytes(), self.cert_file.read_bytes())],
            root_certificates=self.client_ca_file.read_bytes(),
            require_client_auth=True,
        )

    def configure_uvicorn(self, config: Any) -> None:
        """Set ``config`` (a ``uvicorn.Config`` not loaded yet) to require client certificates."""
        import ssl

        config.ssl_certfile = str(self.cert_file)
        config.ssl_keyfile = str(self.key_file)
        config.ssl_ca_certs = str(self.client_ca_file)
        config.ssl_cert_reqs = ssl.CERT_REQUIRED
