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
    kubeml_payload_records_dropped_total{sink}                 counter

``protocol`` is ``v1``, ``v2`` or ``grpc`` (OIP ``ModelInfer``, counted by the model
server's gRPC interceptor); for gRPC, ``status`` is the HTTP status the gRPC code stands
for (OK 200, UNAVAILABLE 503, DEADLINE_EXCEEDED 504, ...), so one ``status=~"5.."``
selector sees the server errors of both protocols.

Payload records are JSON objects (one per line in a JSONL file, one per POST to a URL, one
per message on a Kafka topic, keyed by request id)::

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
    "ErrorSchedule",
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

PAYLOAD_DROPPED = Counter(
    "kubeml_payload_records_dropped",
    "Sampled payload records lost: queue full, sink unreachable or delivery failed",
    ["sink"],
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
    """Share of inference requests failed at once, before the model sees them: HTTP 503,
    gRPC ``UNAVAILABLE``; spread evenly per protocol (0.5: every other one)."""
    latency_ms: float = 0.0
    """Delay, in milliseconds, added to every inference request that reaches the model
    (not to injected errors, which answer at once). It is spent inside the request
    deadline, as a slow forward pass would be, so ``--request-timeout-s`` or a client's
    shorter deadline cuts it short with 504 / ``DEADLINE_EXCEEDED``."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.error_rate <= 1.0:
            raise ValueError(f"fault error_rate must be in [0, 1], got {self.error_rate}")
        if self.latency_ms < 0:
            raise ValueError(f"fault latency_ms must be >= 0, got {self.latency_ms}")

    @property
    def active(self) -> bool:
        return self.error_rate > 0 or self.latency_ms > 0


class ErrorSchedule:
    """Which requests an injected error rate fails: evenly spread, thread-safe.

    >>> schedule = ErrorSchedule(0.5)
    >>> [schedule.next_fails() for _ in range(4)]
    [False, True, False, True]
    """

    def __init__(self, rate: float):
        self.rate = rate
        self._count = 0
        self._lock = threading.Lock()

    def next_fails(self) -> bool:
        """Whether the next request gets the injected error."""
        if self.rate <= 0:
            return False
        with self._lock:
            n = self._count
            self._count += 1
        # Request n fails when the running share of failures would fall below the rate.
        return int((n + 1) * self.rate) > int(n * self.rate)


class PayloadLogger:
    """Samples request/response pairs to a sink without blocking the event loop.

    ``sink`` is one of:

    - a JSONL file path: one record per line;
    - an ``http(s)://`` URL that receives each record as a JSON POST (the KServe logger's
      role on a cluster);
    - ``kafka://HOST:PORT[,HOST:PORT...]/TOPIC``: each record is a JSON message on
      ``TOPIC``, keyed by its request id (so one request's records stay in one partition),
      batched by the Kafka client (confluent-kafka). ``HOST:PORT`` pairs are bootstrap
      brokers; ``[::1]:9092`` for IPv6.

    Records go through a bounded queue to one writer thread; when the sink cannot keep up
    or cannot be reached, records are dropped and counted (``dropped`` and the
    ``kubeml_payload_records_dropped_total`` metric) with a warning, rather than slowing
    down or failing inference. :meth:`close` flushes what is queued. A malformed sink
    raises ``ValueError`` here, at construction.
    """

    #: Records waiting for the writer. ~1 KiB each for digits, so at most a few MiB.
    QUEUE_SIZE = 4096
    #: Milliseconds a Kafka message may wait for delivery (broker down, leader moving)
    #: before it is dropped and counted. Payload logs are telemetry: a record older than
    #: this is worth less than the memory it holds.
    KAFKA_DELIVERY_TIMEOUT_MS = 10_000
    #: Milliseconds the Kafka client waits to fill a batch; trades ~50 ms of delay for one
    #: request per batch instead of one per record.
    KAFKA_LINGER_MS = 50
    #: Seconds between two warnings about the same failing sink (one per failure is noise
    #: at hundreds of requests per second).
    WARN_INTERVAL_S = 30.0

    def __init__(self, sink: str | Path, *, sample_rate: float = 1.0, seed: int | None = None):
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"payload sample_rate must be in (0, 1], got {sample_rate}")
        self.sink = str(sink)
        self.sample_rate = sample_rate
        self.dropped = 0
        self._random = random.Random(seed)
        self._queue: queue.Queue[dict | None] = queue.Queue(self.QUEUE_SIZE)
        self._lock = threading.Lock()
        self._last_drop_warning = self._last_error_warning = -float("inf")
        self._close_deadline = float("inf")
        self._kind = (
            "kafka"
            if self.sink.startswith("kafka://")
            else "http" if self.sink.startswith(("http://", "https://")) else "file"
        )
        self._dropped_metric = PAYLOAD_DROPPED.labels(self._kind)
        self._producer: Any = None
        if self._kind == "kafka":
            self._producer, self._topic = self._kafka_producer()
        elif self._kind == "file":
            Path(self.sink).parent.mkdir(parents=True, exist_ok=True)
        self._thread = threading.Thread(target=self._run, name="kubeml-payload-log", daemon=True)
        self._thread.start()

    def sampled(self) -> bool:
        return self.sample_rate >= 1.0 or self._random.random() < self.sample_rate

    def submit(self, record: dict) -> None:
        """Queue ``record`` for the writer; never blocks (a full queue drops it)."""
        try:
            self._queue.put_nowait(record)
        except queue.Full:
            self._drop(1, "queue full (the sink is slower than the request rate)")

    def close(self, timeout_s: float = 5.0) -> None:
        """Flush what is queued (waiting up to ``timeout_s``) and stop the writer.

        Kafka records not delivered by then are dropped and counted.
        """
        self._close_deadline = time.monotonic() + timeout_s
        self._queue.put(None)
        self._thread.join(timeout_s + 1.0)
        if self.dropped:
            # Per-drop warnings are rate-limited; the total is what an operator wants.
            log.warning(
                "payload sink %s closed; %d record(s) dropped in all", self.sink, self.dropped
            )

    def _drop(self, n: int, reason: str) -> None:
        with self._lock:
            self.dropped += n
            total = self.dropped
            now = time.monotonic()
            warn = now - self._last_drop_warning >= self.WARN_INTERVAL_S
            if warn:
                self._last_drop_warning = now
        self._dropped_metric.inc(n)
        if warn:
            log.warning(
                "payload sink %s: %d record(s) dropped (%d so far): %s", self.sink, n, total, reason
            )

    def _run(self) -> None:
        if self._kind == "kafka":
            self._run_kafka()
        elif self._kind == "http":
            self._run_http()
        else:
            self._run_file()

    def _run_file(self) -> None:
        with open(self.sink, "a", encoding="utf-8") as out:
            while (record := self._queue.get()) is not None:
                out.write(json.dumps(record, separators=(",", ":")) + "\n")
                if self._queue.empty():
                    out.flush()

    def _run_http(self) -> None:
        import requests

        session = requests.Session()
        while (record := self._queue.get()) is not None:
            try:
                session.post(self.sink, json=record, timeout=5)
            except requests.RequestException as exc:
                self._drop(1, f"unreachable: {exc}")

    # -- Kafka ------------------------------------------------------------------------------

    def _kafka_producer(self) -> tuple[Any, str]:
        from confluent_kafka import Producer

        brokers, topic = _parse_kafka_url(self.sink)
        config = {
            "bootstrap.servers": ",".join(brokers),
            "client.id": "kubeml-payload-log",
            "linger.ms": self.KAFKA_LINGER_MS,
            "message.timeout.ms": self.KAFKA_DELIVERY_TIMEOUT_MS,
            # The client's own buffer, behind our queue: same bound, so memory stays a few MiB.
            "queue.buffering.max.messages": self.QUEUE_SIZE,
            # JSON compresses ~5x; lz4 costs little CPU on the writer thread.
            "compression.type": "lz4",
            # One leader ack: a lost record is a sampled telemetry record, not a payment.
            "acks": 1,
            "error_cb": self._kafka_error,
            # Connection failures arrive through error_cb (rate-limited warnings); the
            # client's own log would repeat them on every reconnect.
            "log_level": 0,
        }
        return Producer(config), topic

    def _kafka_error(self, error: Any) -> None:
        now = time.monotonic()
        with self._lock:
            if now - self._last_error_warning < self.WARN_INTERVAL_S:
                return
            self._last_error_warning = now
        log.warning("payload sink %s: %s", self.sink, error.str())

    def _kafka_delivered(self, error: Any, message: Any) -> None:
        if error is not None:
            self._drop(1, f"delivery failed: {error.str()}")

    def _run_kafka(self) -> None:
        producer = self._producer
        while True:
            try:
                # The timeout only bounds how long delivery reports wait to be served.
                record = self._queue.get(timeout=0.1)
            except queue.Empty:
                producer.poll(0)
                continue
            if record is None:
                break
            key = str(record.get("request_id", "")).encode() or None
            value = json.dumps(record, separators=(",", ":")).encode()
            try:
                producer.produce(self._topic, value, key, on_delivery=self._kafka_delivered)
            except BufferError:
                self._drop(1, "Kafka client buffer full (broker slow or unreachable)")
            except Exception as exc:  # KafkaException: e.g. record larger than message.max.bytes
                self._drop(1, f"not accepted by the Kafka client: {exc}")
            producer.poll(0)
        left = producer.flush(max(0.0, self._close_deadline - time.monotonic()))
        if left:
            producer.purge()
            producer.poll(0)  # serves the purged records' delivery reports: each is counted


_KAFKA_TOPIC = re.compile(r"[A-Za-z0-9._-]{1,249}")
_KAFKA_EXAMPLE = "kafka://localhost:9092/payloads"


def _parse_kafka_url(url: str) -> tuple[list[str], str]:
    """``(["host:port", ...], topic)`` of a ``kafka://`` sink; ValueError says what to fix.

    >>> _parse_kafka_url("kafka://k1:9092,k2:9093/payloads")
    (['k1:9092', 'k2:9093'], 'payloads')
    """
    rest = url.removeprefix("kafka://")
    hosts, slash, topic = rest.partition("/")
    if not slash or not topic:
        raise ValueError(
            f"Kafka payload sink {url!r} names no topic; add it after the brokers, "
            f"e.g. {_KAFKA_EXAMPLE}"
        )
    if "?" in topic or "#" in topic or "/" in topic or not _KAFKA_TOPIC.fullmatch(topic):
        raise ValueError(
            f"Kafka topic {topic!r} in payload sink {url!r} is not a valid topic name; "
            "use 1-249 letters, digits, '.', '_' or '-' (no further path or query)"
        )
    if topic in (".", ".."):
        raise ValueError(f"Kafka topic {topic!r} in payload sink {url!r} is reserved; pick a name")
    brokers = []
    for hostport in hosts.split(","):
        host, colon, port = hostport.rpartition(":")
        if hostport.startswith("[") and hostport.endswith("]"):  # [::1] with no port
            host, colon, port = hostport, "", ""
        if not colon or not host or host == "[]":
            raise ValueError(
                f"broker {hostport!r} in payload sink {url!r} needs HOST:PORT; "
                "write the brokers as HOST:PORT[,HOST:PORT...], e.g. localhost:9092"
            )
        if ":" in host and not (host.startswith("[") and host.endswith("]")):
            raise ValueError(
                f"broker {hostport!r} in payload sink {url!r}: put an IPv6 address in "
                "brackets, e.g. kafka://[::1]:9092/payloads"
            )
        if not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ValueError(
                f"broker {hostport!r} in payload sink {url!r} has port {port!r}; "
                "the port must be a number in 1..65535, e.g. localhost:9092"
            )
        brokers.append(f"{host}:{int(port)}")
    return brokers, topic


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
        self._errors = ErrorSchedule(self.fault.error_rate if self.fault is not None else 0.0)

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
                if self._errors.next_fails():
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
