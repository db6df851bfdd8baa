"""The router's gRPC front: Open Inference Protocol V2 (``inference.GRPCInferenceService``).

Where it sits: started by :class:`~kubeml.serving.rollout.router.Router` when the router
runs with ``--grpc-port``. It shares the router's :class:`Routes`, its weighted draw and
its ``_Stats``, so gRPC requests are split, shadowed, compared and counted exactly like
REST ones, and the rollout engine's analysis sees both protocols in one set of numbers.

Forwarding: calls are proxied as bytes through a generic handler with identity
(de)serialisers over one pooled ``grpc.aio`` channel per backend target. A request body is
parsed once, only to reject what is not the method's message with INVALID_ARGUMENT (it
would otherwise reach a backend and count as that backend's server error); the bytes sent
on are the client's own. Answers are parsed only to compare predictions (divergence).

Methods forwarded: ServerLive, ServerReady, ModelReady, ServerMetadata, ModelMetadata (to
stable, not counted, like REST's non-inference routes) and ModelInfer (split, mirror,
fallback, counted). The repository methods answer UNIMPLEMENTED: the router fronts one
model's versions and does not load or unload models.

A backend's gRPC status is counted as the HTTP status REST would have seen
(:data:`HTTP_STATUS`): UNAVAILABLE, INTERNAL, UNKNOWN, DEADLINE_EXCEEDED count as server
errors (5xx), INVALID_ARGUMENT and NOT_FOUND as client errors (4xx). Every answer carries
initial metadata ``x-kubeml-backend`` (stable / canary) and ``x-kubeml-model-version``,
the headers REST answers carry.

The protobuf messages are kserve's generated ``grpc_predict_v2_pb2``, loaded from its file
without importing the kserve package (which takes seconds and parses ``sys.argv``).
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

from kubeml.serving.protocol import grpc_http_status
from kubeml.serving.rollout.router import UPSTREAM_TIMEOUT_S

if TYPE_CHECKING:
    from kubeml.serving.rollout.router import Router, Routes

__all__ = ["HTTP_STATUS", "SERVICE", "GrpcFront", "oip_messages", "predictions_from_response"]

log = logging.getLogger("kubeml.serving.rollout.router.grpc")

SERVICE = "inference.GRPCInferenceService"
#: Largest message either way: the REST side's body limit (64 MiB), not gRPC's 4 MiB default.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
#: Seconds to let in-flight calls finish on a backend channel no route uses any more.
CHANNEL_CLOSE_GRACE_S = 30.0
#: Reconnect backoff to a backend (ms). gRPC's default starts at 1 s and grows to 120 s, so
#: a canary that restarts would stay unreachable long after it is back.
RECONNECT_BACKOFF_MS = (100, 1000)

#: gRPC status -> the HTTP status the statistics count (the OIP's own REST/gRPC mapping,
#: plus gateway codes for a backend the router could not reach in time); the table itself
#: is :data:`kubeml.serving.protocol.GRPC_HTTP_STATUS`, shared with the model server.
HTTP_STATUS: dict[grpc.StatusCode, int] = {
    code: grpc_http_status(code) for code in grpc.StatusCode
}

# method -> request message name; ModelInfer is the only inference (routed, counted) call.
_FORWARDED = {
    "ServerLive": "ServerLiveRequest",
    "ServerReady": "ServerReadyRequest",
    "ModelReady": "ModelReadyRequest",
    "ServerMetadata": "ServerMetadataRequest",
    "ModelMetadata": "ModelMetadataRequest",
    "ModelInfer": "ModelInferRequest",
}
_NOT_FORWARDED = ("RepositoryModelLoad", "RepositoryModelUnload", "RepositoryIndex")
# Metadata gRPC itself owns; everything else a client sends reaches the backend.
_RESERVED_PREFIXES = ("grpc-", ":")
_RESERVED_KEYS = frozenset({"content-type", "user-agent", "te", "host", "accept-encoding"})
# Tensor contents field per OIP datatype, and the struct format of its raw little-endian form.
_CONTENTS = {
    "BOOL": ("bool_contents", "?"),
    "INT8": ("int_contents", "b"),
    "INT16": ("int_contents", "h"),
    "INT32": ("int_contents", "i"),
    "INT64": ("int64_contents", "q"),
    "UINT8": ("uint_contents", "B"),
    "UINT16": ("uint_contents", "H"),
    "UINT32": ("uint_contents", "I"),
    "UINT64": ("uint64_contents", "Q"),
    "FP32": ("fp32_contents", "f"),
    "FP64": ("fp64_contents", "d"),
    "BYTES": ("bytes_contents", ""),
}

_messages: Any = None


def oip_messages() -> Any:
    """kserve's generated ``grpc_predict_v2_pb2`` module, without importing kserve.

    The module registers ``grpc_predict_v2.proto`` in protobuf's default pool; when kserve's
    own copy is already imported (a test process) that one is used, never a second copy.
    """
    global _messages
    if _messages is not None:
        return _messages
    name = "kserve.protocol.grpc.grpc_predict_v2_pb2"
    if name in sys.modules:
        _messages = sys.modules[name]
        return _messages
    package = importlib.util.find_spec("kserve")  # locates the package without running it
    if package is None or not package.submodule_search_locations:
        raise RuntimeError(
            "the router's gRPC front needs kserve's generated OIP messages; "
            "install kserve (a kubeml dependency) into this environment"
        )
    path = Path(list(package.submodule_search_locations)[0]) / "protocol" / "grpc" / "grpc_predict_v2_pb2.py"
    spec = importlib.util.spec_from_file_location("_kubeml_oip_grpc_predict_v2_pb2", path)
    if spec is None or spec.loader is None or not path.is_file():
        raise RuntimeError(f"kserve's generated OIP messages are missing ({path}); reinstall kserve")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    _messages = module
    return module


def predictions_from_response(payload: bytes) -> list | None:
    """Predicted classes (the ``predictions`` output) of a serialised ModelInferResponse.

    Reads ``raw_output_contents`` when the server sent raw tensors, else the typed
    contents; None when the answer is not a ModelInferResponse or has no predictions.
    """
    pb = oip_messages()
    try:
        response = pb.ModelInferResponse.FromString(payload)
    except Exception:  # protobuf's DecodeError; any unparsable answer is simply not compared
        return None
    for index, output in enumerate(response.outputs):
        if output.name != "predictions":
            continue
        field, fmt = _CONTENTS.get(output.datatype, ("", ""))
        if not field:
            return None
        if response.raw_output_contents:
            if index >= len(response.raw_output_contents):
                return None
            raw = response.raw_output_contents[index]
            if not fmt:  # BYTES: 4-byte length-prefixed elements
                return _split_bytes(raw)
            try:
                return memoryview(raw).cast(fmt).tolist()
            except TypeError:  # length not a multiple of the element size
                return None
        return list(getattr(output.contents, field))
    return None


def _split_bytes(raw: bytes) -> list | None:
    out, i = [], 0
    while i < len(raw):
        if i + 4 > len(raw):
            return None
        n = int.from_bytes(raw[i : i + 4], "little")
        out.append(raw[i + 4 : i + 4 + n])
        i += 4 + n
    return out


@dataclass(frozen=True)
class _Answer:
    """One backend's answer to one call."""

    code: grpc.StatusCode
    payload: bytes = b""
    details: str = ""
    initial: tuple = ()
    trailing: tuple = ()

    @property
    def http_status(self) -> int:
        return HTTP_STATUS.get(self.code, 500)


def _forwardable(metadata: Any) -> tuple:
    return tuple(
        (key, value)
        for key, value in (metadata or ())
        if not key.startswith(_RESERVED_PREFIXES) and key not in _RESERVED_KEYS
    )


class GrpcFront:
    """A ``grpc.aio`` server in the router's event loop, forwarding to backend channels."""

    def __init__(self, router: Router):
        self.router = router
        self._pb = oip_messages()
        self._server: Any = None
        self._channels: dict[str, Any] = {}
        self._callables: dict[tuple[str, str], Any] = {}
        self._closing: set[Any] = set()

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self, host: str, port: int) -> int:
        """Listen on ``host:port`` (0: any free port); returns the port bound."""
        self._server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ]
        )
        handlers = {m: self._handler(m, req) for m, req in _FORWARDED.items()}
        handlers.update({m: grpc.unary_unary_rpc_method_handler(self._unimplemented(m)) for m in _NOT_FORWARDED})
        self._server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        try:
            bound = self._server.add_insecure_port(f"{host}:{port}")
        except RuntimeError as exc:
            raise OSError(f"cannot listen for gRPC on {host}:{port}: {exc}; choose another --grpc-port") from exc
        if not bound:
            raise OSError(f"cannot listen for gRPC on {host}:{port}; choose another --grpc-port")
        await self._server.start()
        return bound

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(grace=5.0)
        for channel in self._channels.values():
            await channel.close()
        for closing in list(self._closing):
            closing.cancel()
        self._channels.clear()
        self._callables.clear()

    def routes_changed(self, routes: Routes) -> None:
        """Close, after a grace period, the channels of backends no route names any more."""
        live = {routes.stable_grpc, routes.canary_grpc}
        for target in [t for t in self._channels if t not in live]:
            channel = self._channels.pop(target)
            for key in [k for k in self._callables if k[0] == target]:
                del self._callables[key]
            closing = asyncio.ensure_future(channel.close(grace=CHANNEL_CLOSE_GRACE_S))
            self._closing.add(closing)
            closing.add_done_callback(self._closing.discard)

    def _callable(self, target: str, method: str) -> Any:
        key = (target, method)
        call = self._callables.get(key)
        if call is None:
            channel = self._channels.get(target)
            if channel is None:
                channel = grpc.aio.insecure_channel(
                    target,
                    options=[
                        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                        ("grpc.initial_reconnect_backoff_ms", RECONNECT_BACKOFF_MS[0]),
                        ("grpc.min_reconnect_backoff_ms", RECONNECT_BACKOFF_MS[0]),
                        ("grpc.max_reconnect_backoff_ms", RECONNECT_BACKOFF_MS[1]),
                    ],
                )
                self._channels[target] = channel
            # No serialisers: bytes in, bytes out.
            call = channel.unary_unary(f"/{SERVICE}/{method}")
            self._callables[key] = call
        return call

    # -- handlers ----------------------------------------------------------------------------

    def _handler(self, method: str, request_type: str) -> Any:
        message = getattr(self._pb, request_type)

        async def handle(raw: bytes, context: Any) -> bytes:
            try:
                message.FromString(raw)
            except Exception as exc:  # protobuf's DecodeError (its type varies by backend)
                self.router.stats.rejected += 1
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"request is not a valid inference.{request_type}: {exc}",
                )
            routes = self.router.routes
            if routes is None:
                await context.abort(grpc.StatusCode.UNAVAILABLE, "router has no stable backend yet")
            remaining = context.time_remaining()
            deadline = time.monotonic() + (
                UPSTREAM_TIMEOUT_S if remaining is None else min(remaining, UPSTREAM_TIMEOUT_S)
            )
            metadata = _forwardable(context.invocation_metadata())
            if method == "ModelInfer":
                answer, backend = await self._infer(routes, raw, metadata, deadline)
            else:
                answer = await self._forward(routes, "stable", method, raw, metadata, deadline)
                backend = "stable"
            return await self._reply(context, routes, answer, backend)

        return grpc.unary_unary_rpc_method_handler(handle)

    @staticmethod
    def _unimplemented(method: str) -> Any:
        async def handle(_raw: bytes, context: Any) -> bytes:
            await context.abort(
                grpc.StatusCode.UNIMPLEMENTED,
                f"{method} is not served by the kubeml router, which fronts one model's "
                "versions; call the model server's own gRPC port",
            )
            return b""  # not reached: abort raises

        return handle

    async def _reply(self, context: Any, routes: Routes, answer: _Answer, backend: str) -> bytes:
        version = routes.canary_version if backend == "canary" else routes.stable_version
        ours = (("x-kubeml-backend", backend),) + ((("x-kubeml-model-version", version),) if version else ())
        await context.send_initial_metadata(_forwardable(answer.initial) + ours)
        if answer.code == grpc.StatusCode.OK:
            if answer.trailing:
                context.set_trailing_metadata(answer.trailing)
            return answer.payload
        await context.abort(answer.code, answer.details, trailing_metadata=answer.trailing)
        return b""  # not reached: abort raises

    # -- forwarding --------------------------------------------------------------------------

    async def _forward(
        self,
        routes: Routes,
        backend: str,
        method: str,
        raw: bytes,
        metadata: tuple,
        deadline: float | None,
    ) -> _Answer:
        """Send ``raw`` to ``backend``'s gRPC target; never raises for a backend's failure."""
        target = routes.canary_grpc if backend == "canary" else routes.stable_grpc
        version = routes.canary_version if backend == "canary" else routes.stable_version
        where = f"{backend} backend" + (f" (version {version})" if version else "")
        if target is None:
            return _Answer(
                grpc.StatusCode.UNAVAILABLE,
                details=f"kubeml router: the {where} serves no gRPC; redeploy it with a gRPC port",
            )
        timeout = UPSTREAM_TIMEOUT_S if deadline is None else deadline - time.monotonic()
        if timeout <= 0:
            return _Answer(grpc.StatusCode.DEADLINE_EXCEEDED, details="kubeml router: deadline exceeded")
        call = self._callable(target, method)(raw, metadata=metadata, timeout=timeout)
        try:
            payload = await call
            return _Answer(
                grpc.StatusCode.OK,
                payload,
                initial=tuple(await call.initial_metadata() or ()),
                trailing=_forwardable(await call.trailing_metadata()),
            )
        except grpc.aio.AioRpcError as exc:
            details = exc.details() or ""
            if exc.code() == grpc.StatusCode.UNAVAILABLE:
                details = f"kubeml router: the {where} at {target} is unavailable: {details}"
            return _Answer(
                exc.code(),
                details=details,
                initial=tuple(exc.initial_metadata() or ()),
                trailing=_forwardable(exc.trailing_metadata()),
            )
        except (grpc.aio.UsageError, OSError) as exc:  # channel closed under a route change
            return _Answer(
                grpc.StatusCode.UNAVAILABLE,
                details=f"kubeml router: the {where} at {target} is unavailable: {exc}",
            )

    async def _timed(
        self, routes: Routes, backend: str, raw: bytes, metadata: tuple, deadline: float | None
    ) -> _Answer:
        started = time.perf_counter()
        answer = await self._forward(routes, backend, "ModelInfer", raw, metadata, deadline)
        self.router.stats.record(backend, answer.http_status, time.perf_counter() - started)
        return answer

    async def _infer(
        self, routes: Routes, raw: bytes, metadata: tuple, deadline: float
    ) -> tuple[_Answer, str]:
        """Route one ModelInfer exactly as the REST proxy routes an infer request."""
        router = self.router
        if router.to_canary(routes):
            answer = await self._timed(routes, "canary", raw, metadata, deadline)
            if answer.http_status < 500 or not routes.fallback or deadline <= time.monotonic():
                if answer.code == grpc.StatusCode.OK and router.compare_now(routes):
                    router._in_background(self._compare(routes, raw, metadata, answer.payload, "canary"))
                return answer, "canary"
            router.stats.fallbacks += 1

        answer = await self._timed(routes, "stable", raw, metadata, deadline)
        if routes.mirror and routes.canary is not None and answer.code == grpc.StatusCode.OK:
            if router.compare_now(routes):
                router._in_background(self._compare(routes, raw, metadata, answer.payload, "stable"))
            else:
                router._in_background(self._timed(routes, "canary", raw, metadata, None))
        return answer, "stable"

    async def _compare(
        self, routes: Routes, raw: bytes, metadata: tuple, answered: bytes, answered_by: str
    ) -> None:
        """Send ``raw`` to the side that did not answer and compare predicted classes."""
        other = "stable" if answered_by == "canary" else "canary"
        if other == "canary":  # a shadow copy is canary traffic and is measured as such
            answer = await self._timed(routes, "canary", raw, metadata, None)
        else:  # a comparison copy to stable is not user traffic: not counted
            answer = await self._forward(routes, "stable", "ModelInfer", raw, metadata, None)
        if answer.code != grpc.StatusCode.OK:
            return
        mine, theirs = predictions_from_response(answered), predictions_from_response(answer.payload)
        if mine is None or theirs is None or len(mine) != len(theirs):
            return
        self.router.stats.record_comparison(len(mine), sum(1 for a, b in zip(mine, theirs) if a != b))

