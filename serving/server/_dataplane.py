"""kserve's data plane with kubeml's request rules: strict decoding, deadlines, metadata.

Where it sits: in ``kubeml.serving.server``; :class:`~kubeml.serving.server._kserve.KubemlModelServer`
builds one :class:`StrictDataPlane` and hands it to both the REST app and the gRPC server,
so the rules below hold for every protocol:

* request parsing failures inside kserve's decoder (``KeyError`` on a missing field, a
  ``ValueError`` from a bad binary header, ...) become ``InvalidInput`` (HTTP 400, gRPC
  ``INVALID_ARGUMENT``);
* every inference runs under a deadline (``--request-timeout-s`` or a shorter client
  header, :func:`~kubeml.serving.server._limits._request_budget_s`); one past it raises
  :class:`InferenceTimeout` (HTTP 504, gRPC ``DEADLINE_EXCEEDED``);
* readiness waits for every registered model, and metadata names the served version.

Imports kserve (through ``kubeml.serving._kserve``): load it only to serve.
"""

from __future__ import annotations

import asyncio
from typing import Any

from grpc_interceptor.exceptions import DeadlineExceeded

from kubeml.serving._kserve import DataPlane, InvalidInput
from kubeml.serving.server._limits import _request_budget_s

__all__ = ["InferenceTimeout", "StrictDataPlane"]


class InferenceTimeout(DeadlineExceeded):
    """An inference past its deadline: HTTP 504; kserve's gRPC interceptor maps
    ``GrpcException`` subclasses to their status, here DEADLINE_EXCEEDED."""

    def __init__(self, details: str, *, client: bool = False):
        super().__init__(details)
        Exception.__init__(self, details)
        self.client = client
        """True when the deadline was the client's own (a header), not the server's."""

    def __str__(self) -> str:
        return self.details


class StrictDataPlane(DataPlane):
    """kserve's DataPlane with request decoding that never blames the server.

    ``request_timeout_s`` (0: none) is the server's deadline of one inference;
    ``fault_latency_s`` is the fault-injection hook's delay, spent inside that deadline as
    a slow forward pass would be; ``serves_repository``: a multi-model server, ready even
    while no model is loaded.
    """

    def __init__(
        self,
        model_registry: Any,
        *,
        request_timeout_s: float,
        fault_latency_s: float = 0.0,
        serves_repository: bool = False,
    ):
        super().__init__(model_registry=model_registry)
        self.request_timeout_s = request_timeout_s
        self.fault_latency_s = fault_latency_s
        self.serves_repository = serves_repository

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
            budget, source = _request_budget_s(headers, self.request_timeout_s)
        except ValueError as exc:
            raise InvalidInput(str(exc)) from None
        if budget is None and not self.fault_latency_s:
            return await super().infer(model_name, request, headers)
        timer = asyncio.timeout(budget)
        try:
            async with timer:
                if self.fault_latency_s:
                    await asyncio.sleep(self.fault_latency_s)
                return await super().infer(model_name, request, headers)
        except TimeoutError:
            if not timer.expired():
                raise
            raise InferenceTimeout(
                f"inference on model {model_name!r} did not finish within {budget:g} s "
                f"(the {source}); the model is slow or the server overloaded: "
                "retry later, or send fewer instances per request",
                client=source.endswith("header"),
            ) from None

    async def ready(self) -> bool:
        models = self.model_registry.get_models()
        if not models and not self.serves_repository:
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
