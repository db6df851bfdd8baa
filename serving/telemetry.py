"""Prometheus metrics, payload logging and the fault-injection hook of a model server.

Where it sits: ``server.py`` wraps kserve's ASGI app in :class:`TelemetryMiddleware`, which
times every inference request, counts it by status, logs a sample of request/response
pairs and (for rollout tests only) injects faults. The model class reports batch sizes and
predicted classes through :meth:`ModelTelemetry.observe_batch`. Nothing here imports a web
framework; the middleware speaks plain ASGI.

Metrics (on the server's ``/metrics``, next to kserve's own)::

    kubeml_requests_total{model,version,protocol,status}       counter
    kubeml_request_latency_seconds{model,version,protocol}     histogram
    kubeml_batch_size{model,version}                           histogram
    kubeml_predictions_total{model,version,class}              counter

Payload records are one JSON object per line::

    {"ts": 1700000000.1, "request_id": "...", "model": "digits", "version": "3",
     "protocol": "v2", "status": 200, "latency_ms": 4.2,
     "request": {...}, "response": {...}}
"""

from __future__ import annotations

import asyncio
import json
import logging
import queue
import random
import re
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client import Counter, Histogram

__all__ = [
    "FaultInjection",
    "ModelTelemetry",
    "PayloadLogger",
    "TelemetryMiddleware",
    "infer_route",
]

log = logging.getLogger("kubeml.serving.telemetry")

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

_INFER = re.compile(
    r"^/(?:v2/models/(?P<v2>[^/]+)(?:/versions/[^/]+)?/infer|v1/models/(?P<v1>[^/:]+):predict)$"
)


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


@dataclass(frozen=True)
class FaultInjection:
    """Fault-injection hook for rollout tests and game days; off unless set.

    Only inference routes are affected; health, metadata and ``/metrics`` stay truthful so
    that the fault looks like a bad model, not a dead server.
    """

    error_rate: float = 0.0
    """Share of inference requests answered 503, spread evenly (0.5: every other one)."""
    latency_ms: float = 0.0
    """Extra delay added to every inference request, in milliseconds."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.error_rate <= 1.0:
            raise ValueError(f"fault error_rate must be in [0, 1], got {self.error_rate}")
        if self.latency_ms < 0:
            raise ValueError(f"fault latency_ms must be >= 0, got {self.latency_ms}")

    @property
    def active(self) -> bool:
        return self.error_rate > 0 or self.latency_ms > 0


class PayloadLogger:
    """Samples request/response pairs to a sink without blocking the event loop.

    ``sink`` is a JSONL file path, or an ``http(s)://`` URL that receives each record as a
    JSON POST (the KServe logger's role on a cluster). Records go through a bounded queue
    to one writer thread; when the sink cannot keep up, records are dropped and counted
    rather than slowing down inference.
    """

    #: Records waiting for the writer. ~1 KiB each for digits, so at most a few MiB.
    QUEUE_SIZE = 4096

    def __init__(self, sink: str | Path, *, sample_rate: float = 1.0, seed: int | None = None):
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"payload sample_rate must be in (0, 1], got {sample_rate}")
        self.sink = str(sink)
        self.sample_rate = sample_rate
        self.dropped = 0
        self._random = random.Random(seed)
        self._queue: queue.Queue[dict | None] = queue.Queue(self.QUEUE_SIZE)
        self._thread = threading.Thread(target=self._run, name="kubeml-payload-log", daemon=True)
        self._is_url = self.sink.startswith(("http://", "https://"))
        if not self._is_url:
            Path(self.sink).parent.mkdir(parents=True, exist_ok=True)
        self._thread.start()

    def sampled(self) -> bool:
        return self.sample_rate >= 1.0 or self._random.random() < self.sample_rate

    def submit(self, record: dict) -> None:
        try:
            self._queue.put_nowait(record)
        except queue.Full:
            self.dropped += 1

    def close(self, timeout_s: float = 5.0) -> None:
        """Flush what is queued and stop the writer."""
        self._queue.put(None)
        self._thread.join(timeout_s)

    def _run(self) -> None:
        if self._is_url:
            import requests

            session = requests.Session()
            while (record := self._queue.get()) is not None:
                try:
                    session.post(self.sink, json=record, timeout=5)
                except requests.RequestException as exc:
                    self.dropped += 1
                    log.warning("payload sink %s unreachable: %s", self.sink, exc)
            return
        with open(self.sink, "a", encoding="utf-8") as out:
            while (record := self._queue.get()) is not None:
                out.write(json.dumps(record, separators=(",", ":")) + "\n")
                if self._queue.empty():
                    out.flush()


def _json_or_size(body: bytes, headers: dict[bytes, bytes]) -> Any:
    if b"inference-header-content-length" in headers:
        return {"binary_bytes": len(body)}
    try:
        return json.loads(body) if body else None
    except (ValueError, UnicodeDecodeError):
        return {"unparsed_bytes": len(body)}


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
        self._fault_count = 0
        self._fault_lock = threading.Lock()

    def _inject_error(self) -> bool:
        assert self.fault is not None
        if self.fault.error_rate <= 0:
            return False
        with self._fault_lock:
            n = self._fault_count
            self._fault_count += 1
        # Evenly spread: request n fails when the running share of failures would fall
        # below error_rate, e.g. every other request for 0.5.
        rate = self.fault.error_rate
        return int((n + 1) * rate) > int(n * rate)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        route = infer_route(scope.get("path", "")) if scope["type"] == "http" else None
        if route is None:
            await self.app(scope, receive, send)
            return
        model, protocol = route
        version = self.versions.get(model, "") or "unversioned"
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
                if self._inject_error():
                    await _send_error(tapped_send, 503, "injected fault (fault-injection hook)")
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
                        "request": _json_or_size(bytes(request_body), headers),
                        "response": _json_or_size(bytes(response_body), response_headers),
                    }
                )


async def _send_error(send: Any, status: int, message: str) -> None:
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
