"""Sampled payload logging of a model server: JSONL files, HTTP endpoints and Kafka.

Where it sits: in ``kubeml.serving.telemetry``; the server's ``--payload-log`` builds a
:class:`PayloadLogger` and the ASGI middleware (``middleware.py``) submits one record per
sampled inference request. Records leave through one writer thread, never from the event
loop.

Payload records are JSON objects (one per line in a JSONL file, one per POST to a URL, one
per message on a Kafka topic, keyed by request id)::

    {"ts": 1700000000.1, "request_id": "...", "model": "digits", "version": "3",
     "protocol": "v2", "status": 200, "latency_ms": 4.2,
     "request": {...}, "response": {...}}
"""

from __future__ import annotations

import json
import logging
import os
import queue
import random
import re
import threading
import time
from pathlib import Path
from typing import Any

from kubeml.serving.telemetry.metrics import PAYLOAD_DROPPED

__all__ = ["PayloadLogger", "body_for_record"]

log = logging.getLogger("kubeml.serving.telemetry")


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
            # Every in-sync replica acknowledges, and the idempotent producer retries without
            # duplicates: the payload log feeds drift and quality monitoring, and a record a
            # leader change loses would bias it. Records still undelivered after
            # KAFKA_DELIVERY_TIMEOUT_MS are dropped and counted.
            "acks": "all",
            "enable.idempotence": True,
            "error_cb": self._kafka_error,
            # Connection failures arrive through error_cb (rate-limited warnings); the
            # client's own log would repeat them on every reconnect.
            "log_level": 0,
            **kafka_security_config(os.environ),
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


#: Environment variables that set the Kafka sink's TLS and SASL (MSK: SASL_SSL with SCRAM or
#: IAM): a Kubernetes Secret mounted as environment keeps the password out of every URL,
#: command line and log. Variable -> librdkafka setting.
KAFKA_SECURITY_ENV = {
    "KUBEML_KAFKA_SECURITY_PROTOCOL": "security.protocol",
    "KUBEML_KAFKA_SASL_MECHANISM": "sasl.mechanism",
    "KUBEML_KAFKA_SASL_USERNAME": "sasl.username",
    "KUBEML_KAFKA_SASL_PASSWORD": "sasl.password",
    "KUBEML_KAFKA_SSL_CA_LOCATION": "ssl.ca.location",
}
_KAFKA_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
_KAFKA_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER")


def kafka_security_config(env: Any) -> dict[str, str]:
    """The producer's TLS/SASL settings from :data:`KAFKA_SECURITY_ENV`; ValueError says what to fix.

    >>> kafka_security_config({"KUBEML_KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "KUBEML_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
    ...                        "KUBEML_KAFKA_SASL_USERNAME": "u", "KUBEML_KAFKA_SASL_PASSWORD": "p"})["security.protocol"]
    'SASL_SSL'
    >>> kafka_security_config({})
    {}
    """
    config = {setting: env[name] for name, setting in KAFKA_SECURITY_ENV.items() if env.get(name)}
    protocol = config.get("security.protocol", "PLAINTEXT")
    if protocol not in _KAFKA_PROTOCOLS:
        raise ValueError(f"KUBEML_KAFKA_SECURITY_PROTOCOL {protocol!r} is not one of {', '.join(_KAFKA_PROTOCOLS)}")
    mechanism = config.get("sasl.mechanism")
    if protocol.startswith("SASL_"):
        if mechanism not in _KAFKA_MECHANISMS:
            raise ValueError(f"KUBEML_KAFKA_SASL_MECHANISM must be one of {', '.join(_KAFKA_MECHANISMS)} "
                             f"with {protocol}, got {mechanism!r}")
        if mechanism != "OAUTHBEARER" and not (config.get("sasl.username") and config.get("sasl.password")):
            raise ValueError(f"{protocol} with {mechanism} needs KUBEML_KAFKA_SASL_USERNAME and "
                             "KUBEML_KAFKA_SASL_PASSWORD")
    elif mechanism or config.get("sasl.username") or config.get("sasl.password"):
        raise ValueError(f"SASL settings are set but KUBEML_KAFKA_SECURITY_PROTOCOL is {protocol}; "
                         "use SASL_SSL (or SASL_PLAINTEXT) to send them")
    return config


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


def body_for_record(body: bytes, headers: dict[bytes, bytes]) -> Any:
    """A request or response body as a payload record holds it: parsed JSON, or its size
    when it is binary (OIP binary tensors) or not JSON."""
    if b"inference-header-content-length" in headers:
        return {"binary_bytes": len(body)}
    try:
        return json.loads(body) if body else None
    except (ValueError, UnicodeDecodeError):
        return {"unparsed_bytes": len(body)}
