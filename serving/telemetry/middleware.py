"""ASGI middleware of a model server: request ids, metrics, payload samples, faults.

Where it sits: in ``kubeml.serving.telemetry``; ``kubeml.serving.server`` wraps kserve's
ASGI app in :class:`TelemetryMiddleware` (outermost, so every answer is timed and
counted). It speaks plain ASGI and imports no web framework.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

from kubeml.serving.protocol import send_json_error
from kubeml.serving.telemetry.faults import ErrorSchedule, FaultInjection

#: Response header (lower-case bytes, as ASGI carries it) marking a 504 whose deadline the
#: client set; see ``kubeml.serving.server._limits.CLIENT_DEADLINE_HEADER``.
CLIENT_DEADLINE = b"x-kubeml-deadline"
from kubeml.serving.telemetry.metrics import CLIENT_DEADLINE_EXPIRED, LATENCY, REQUESTS, infer_route, series_labels
from kubeml.serving.telemetry.payload import PayloadLogger, body_for_record

__all__ = ["TelemetryMiddleware"]


class TelemetryMiddleware:
    """ASGI middleware: request ids, metrics, sampled payload logs, injected faults."""

    def __init__(
        self,
        app: Any,
        *,
        versions: dict[str, str],
        payload_logger: PayloadLogger | None = None,
        fault: FaultInjection | None = None,
    ):
        self.app = app
        self.versions = versions
        self.payload_logger = payload_logger
        self.fault = fault if fault is not None and fault.active else None
        self._errors = ErrorSchedule(self.fault.error_rate if self.fault is not None else 0.0)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        route = infer_route(scope.get("path", "")) if scope["type"] == "http" else None
        if route is None:
            await self.app(scope, receive, send)
            return
        requested, protocol = route
        model, version = series_labels(requested, self.versions)
        headers = dict(scope.get("headers", []))
        request_id = headers.get(b"x-request-id", b"").decode(errors="replace")[:128]
        if not request_id:
            request_id = uuid.uuid4().hex
        sampled = self.payload_logger is not None and self.payload_logger.sampled()
        request_body = bytearray()
        response_body = bytearray()
        response_headers: dict[bytes, bytes] = {}
        status = 500
        started = time.perf_counter()

        async def tapped_receive() -> dict:
            message = await receive()
            if sampled and message["type"] == "http.request":
                request_body.extend(message.get("body", b""))
            return message

        async def tapped_send(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                if status == 504 and (CLIENT_DEADLINE, b"client") in message.get("headers", []):
                    # The client's own deadline: counted apart, so the analysis can leave it out.
                    CLIENT_DEADLINE_EXPIRED.labels(model, version, protocol).inc()
                message = {
                    **message,
                    "headers": [*message.get("headers", []), (b"x-request-id", request_id.encode())],
                }
                if sampled:
                    response_headers.update(dict(message["headers"]))
            elif sampled and message["type"] == "http.response.body":
                response_body.extend(message.get("body", b""))
            await send(message)

        try:
            if self.fault is not None:
                if self.fault.latency_ms:
                    await asyncio.sleep(self.fault.latency_ms / 1000)
                if self._errors.next_fails():
                    await send_json_error(tapped_send, 503, "injected fault (fault-injection hook)")
                    return
            await self.app(scope, tapped_receive, tapped_send)
        finally:
            elapsed = time.perf_counter() - started
            REQUESTS.labels(model, version, protocol, str(status)).inc()
            LATENCY.labels(model, version, protocol).observe(elapsed)
            if sampled and self.payload_logger is not None:
                self.payload_logger.submit(
                    {
                        "ts": time.time(),
                        "request_id": request_id,
                        "model": model,
                        "version": version,
                        "protocol": protocol,
                        "status": status,
                        "latency_ms": round(elapsed * 1000, 3),
                        "request": body_for_record(bytes(request_body), headers),
                        "response": body_for_record(bytes(response_body), response_headers),
                    }
                )
