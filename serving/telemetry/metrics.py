"""Prometheus series of a model server, and the per-model hook the model classes call.

Where it sits: the bottom of ``kubeml.serving.telemetry``. The ASGI middleware
(``middleware.py``) and the server's gRPC interceptor count requests here; the model
classes report batch sizes and predicted classes through
:meth:`ModelTelemetry.observe_batch`; payload sinks count dropped records. It imports no
web framework, so the model classes may import it.

Metrics (on the server's ``/metrics``, next to kserve's own)::

    kubeml_requests_total{model,version,protocol,status}       counter
    kubeml_request_latency_seconds{model,version,protocol}     histogram
    kubeml_batch_size{model,version}                           histogram
    kubeml_predictions_total{model,version,class}              counter
    kubeml_payload_records_dropped_total{sink}                 counter
    kubeml_client_deadline_expired_total{model,version,protocol}  counter

A 504 on the client's own deadline (``x-request-timeout-ms``) is counted in
``kubeml_requests_total`` like any 504, and also in ``kubeml_client_deadline_expired_total``:
the rollout analysis subtracts it from the errors, so a client cannot fail a canary by
asking for impossible deadlines.

``protocol`` is ``v1``, ``v2`` or ``grpc`` (OIP ``ModelInfer``, counted by the model
server's gRPC interceptor); for gRPC, ``status`` is the HTTP status the gRPC code stands
for (OK 200, UNAVAILABLE 503, DEADLINE_EXCEEDED 504, ...; ``kubeml.serving.protocol``), so
one ``status=~"5.."`` selector sees the server errors of both protocols.
"""

from __future__ import annotations

import re
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

__all__ = [
    "BATCH_SIZE",
    "CLIENT_DEADLINE_EXPIRED",
    "LATENCY",
    "PAYLOAD_DROPPED",
    "PAYLOAD_SPOOLED",
    "PREDICTIONS",
    "REQUESTS",
    "UNKNOWN_MODEL",
    "ModelTelemetry",
    "infer_route",
    "series_labels",
]

#: The ``model`` label of requests naming a model this server does not serve. Labels come
#: only from served models: a name taken from the URL as is would let any client grow the
#: series count (and every Prometheus that scrapes it) without bound.
UNKNOWN_MODEL = "_unknown"

# Seconds; spans a cached small CNN (~1 ms) to a cold or overloaded server (~10 s).
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Instances per batch; powers of two up to the default max batch size (1024).
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

REQUESTS = Counter(
    "kubeml_requests",
    "Inference requests by model, version, protocol and HTTP status",
    ["model", "version", "protocol", "status"],
)
LATENCY = Histogram(
    "kubeml_request_latency_seconds",
    "Inference request latency as seen by the server, body read to last byte sent",
    ["model", "version", "protocol"],
    buckets=_LATENCY_BUCKETS,
)
BATCH_SIZE = Histogram(
    "kubeml_batch_size",
    "Instances per inference batch",
    ["model", "version"],
    buckets=_BATCH_BUCKETS,
)
PREDICTIONS = Counter(
    "kubeml_predictions",
    "Predicted class per instance (the prediction distribution, for drift alerts)",
    ["model", "version", "class"],
)

CLIENT_DEADLINE_EXPIRED = Counter(
    "kubeml_client_deadline_expired",
    "Inference requests answered 504 because the client's own deadline passed (not server errors)",
    ["model", "version", "protocol"],
)

PAYLOAD_DROPPED = Counter(
    "kubeml_payload_records_dropped",
    "Sampled payload records lost: queue full, sink unreachable or delivery failed",
    ["sink"],
)
PAYLOAD_SPOOLED = Gauge(
    "kubeml_payload_records_spooled",
    "Sampled payload records kept on disk until the sink takes them",
    ["sink"],
)

_INFER = re.compile(
    r"^/(?:v2/models/(?P<v2>[^/]+)(?:/versions/[^/]+)?/infer|v1/models/(?P<v1>[^/:]+):predict)$"
)


def series_labels(model: str, versions: Any) -> tuple[str, str]:
    """``(model, version)`` labels of a request for ``model``: the served name and version, or
    :data:`UNKNOWN_MODEL` and ``""`` for a model this server does not serve.

    ``versions`` maps served model names to versions (``in`` and ``get``).

    >>> series_labels("digits", {"digits": "3"}), series_labels("x" * 40, {"digits": "3"})
    (('digits', '3'), ('_unknown', ''))
    """
    if model in versions:
        return model, versions.get(model, "") or "unversioned"
    return UNKNOWN_MODEL, ""


def infer_route(path: str) -> tuple[str, str] | None:
    """``(model name, protocol)`` when ``path`` is an inference route, else None.

    >>> infer_route("/v2/models/digits/infer")
    ('digits', 'v2')
    >>> infer_route("/v1/models/digits:predict")
    ('digits', 'v1')
    >>> infer_route("/v2/health/ready") is None
    True
    """
    m = _INFER.match(path)
    if not m:
        return None
    return (m["v2"], "v2") if m["v2"] else (m["v1"], "v1")


class ModelTelemetry:
    """Per-model hooks the model class calls; labels are fixed at construction."""

    def __init__(self, model: str, version: str, classes: tuple[str, ...] = ()):
        self.model = model
        self.version = version or "unversioned"
        self.classes = classes
        self._batch = BATCH_SIZE.labels(model, self.version)

    def observe_batch(self, predictions: Any) -> None:
        """Record one batch's size and predicted classes (an int array or list)."""
        preds = list(predictions)
        self._batch.observe(len(preds))
        counts: dict[int, int] = {}
        for p in preds:
            counts[int(p)] = counts.get(int(p), 0) + 1
        for index, n in counts.items():
            label = self.classes[index] if index < len(self.classes) else str(index)
            PREDICTIONS.labels(self.model, self.version, label).inc(n)
