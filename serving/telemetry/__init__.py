"""Prometheus metrics, payload logging and the fault-injection hook of a model server.

Where it sits: ``kubeml.serving.server`` wraps kserve's ASGI app in
:class:`TelemetryMiddleware`, which times every inference request, counts it by status,
logs a sample of request/response pairs and (for rollout tests only) injects faults. The
model class reports batch sizes and predicted classes through
:meth:`ModelTelemetry.observe_batch`. Nothing here imports a web framework; the
middleware speaks plain ASGI.

Modules: ``metrics`` (the Prometheus series, :class:`ModelTelemetry`, :func:`infer_route`),
``payload`` (:class:`PayloadLogger`: JSONL, HTTP and Kafka sinks), ``faults``
(:class:`FaultInjection`, :class:`ErrorSchedule`) and ``middleware``
(:class:`TelemetryMiddleware`).
"""

from __future__ import annotations

from kubeml.serving.telemetry.faults import ErrorSchedule, FaultInjection
from kubeml.serving.telemetry.metrics import (
    BATCH_SIZE,
    CLIENT_DEADLINE_EXPIRED,
    LATENCY,
    PAYLOAD_DROPPED,
    PREDICTIONS,
    REQUESTS,
    UNKNOWN_MODEL,
    ModelTelemetry,
    infer_route,
    series_labels,
)
from kubeml.serving.telemetry.middleware import TelemetryMiddleware
from kubeml.serving.telemetry.payload import PayloadLogger

__all__ = [
    "BATCH_SIZE",
    "CLIENT_DEADLINE_EXPIRED",
    "LATENCY",
    "PAYLOAD_DROPPED",
    "PREDICTIONS",
    "REQUESTS",
    "UNKNOWN_MODEL",
    "ErrorSchedule",
    "FaultInjection",
    "ModelTelemetry",
    "PayloadLogger",
    "TelemetryMiddleware",
    "infer_route",
    "series_labels",
]
