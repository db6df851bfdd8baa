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

from kubeml.serving.telemetry.metrics import PAYLOAD_DROPPED, PAYLOAD_SPOOLED
from kubeml.serving.telemetry.spool import PayloadSpool

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

    ``spool_dir`` (Kafka sinks only) keeps what the broker could not take: records whose
    delivery timed out, that the client's buffer refused, or that were still undelivered at
    :meth:`close` go to a :class:`~.spool.PayloadSpool` of at most ``spool_max_bytes`` and are
    sent again once the broker answers, by this logger or by the next one started on the
    same directory. Only records beyond the spool's bound (and those Kafka refuses for good,
    e.g. over ``message.max.bytes``) are dropped and counted; the spool's size is the
    ``kubeml_payload_records_spooled`` gauge.
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
    #: Default bound of the spool: ~60,000 digits records, minutes of traffic at full rate.
    SPOOL_MAX_BYTES = 64 * 1024 * 1024
    #: Seconds between two attempts to send spooled records while the broker seems down
    #: (each attempt first asks the broker for metadata, waiting at most PROBE_TIMEOUT_S).
    REPLAY_INTERVAL_S = 2.0
    PROBE_TIMEOUT_S = 0.5

    def __init__(
        self,
        sink: str | Path,
        *,
        sample_rate: float = 1.0,
        seed: int | None = None,
        spool_dir: str | Path | None = None,
        spool_max_bytes: int = SPOOL_MAX_BYTES,
    ):
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
        self._spool: PayloadSpool | None = None
        self._spooled_metric = PAYLOAD_SPOOLED.labels(self._kind)
        self._replaying = False
        self._next_replay = 0.0
        self._last_delivered = -float("inf")
        if spool_dir is not None and self._kind != "kafka":
            raise ValueError(
                f"a payload spool keeps records for a Kafka broker; sink {self.sink!r} is not "
                "kafka://HOST:PORT/TOPIC (files and HTTP sinks take no spool)"
            )
        if self._kind == "kafka":
            self._producer, self._topic = self._kafka_producer()
            self._permanent = _kafka_permanent_errors()
            if spool_dir is not None:
                self._spool = PayloadSpool(spool_dir, max_bytes=spool_max_bytes)
                if self._spool.torn:
                    self._drop(self._spool.torn, f"torn record(s) at the end of spool {spool_dir}")
                if self._spool.records:
                    log.info("payload spool %s: %d record(s) from before the start, to send",
                             spool_dir, self._spool.records)  # fmt: skip
                self._spooled_metric.set(self._spool.records)
        elif self._kind == "file":
            Path(self.sink).parent.mkdir(parents=True, exist_ok=True)
        self._thread = threading.Thread(target=self._run, name="kubeml-payload-log", daemon=True)
        self._thread.start()

    @property
    def spooled(self) -> int:
        """Records held in the spool, waiting for the broker (0 without a spool)."""
        return self._spool.records if self._spool is not None else 0

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

        Kafka records not delivered by then go to the spool (or, without one, are dropped
        and counted).
        """
        self._close_deadline = time.monotonic() + timeout_s
        self._queue.put(None)
        self._thread.join(timeout_s + 1.0)
        if self._spool is not None and self._spool.bytes:
            log.warning(
                "payload sink %s closed; %d record(s) kept in spool %s for the next start",
                self.sink, self._spool.records, self._spool.directory,
            )  # fmt: skip
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
        if error is None:
            self._last_delivered = time.monotonic()
        elif error.code() in self._permanent:
            self._drop(1, f"refused by Kafka: {error.str()}")
        else:
            self._keep(message.value(), f"delivery failed: {error.str()}")

    def _keep(self, value: bytes, reason: str) -> None:
        """Spool a record the broker did not take; drop (and count) it without a spool or
        when the spool is full."""
        if self._spool is None:
            self._drop(1, reason)
        elif not self._spool.append(value):
            self._drop(1, f"{reason}; spool {self._spool.directory} is full "
                          f"({self._spool.max_bytes} bytes)")  # fmt: skip

    def _produce(self, value: bytes, on_delivery: Any) -> bool:
        """Hand one record to the Kafka client; False when its buffer is full."""
        try:
            key = str(json.loads(value).get("request_id", "")).encode() or None
        except (ValueError, AttributeError):
            key = None
        try:
            self._producer.produce(self._topic, value, key, on_delivery=on_delivery)
        except BufferError:
            return False
        except Exception as exc:  # KafkaException: e.g. record larger than message.max.bytes
            self._drop(1, f"not accepted by the Kafka client: {exc}")
        return True

    def _broker_answers(self) -> bool:
        if time.monotonic() - self._last_delivered < self.REPLAY_INTERVAL_S:
            return True
        try:
            self._producer.list_topics(self._topic, timeout=self.PROBE_TIMEOUT_S)
        except Exception:  # KafkaException: no broker answered in time
            return False
        return True

    def _replay(self) -> None:
        """Send the oldest spooled segment again, when the broker answers; its records'
        delivery reports delete it once every one is delivered or spooled again."""
        spool = self._spool
        now = time.monotonic()
        if spool is None or self._replaying or not spool.waiting or now < self._next_replay:
            return
        self._next_replay = now + self.REPLAY_INTERVAL_S
        if not self._broker_answers() or (taken := spool.take()) is None:
            return
        segment, records = taken
        pending = len(records)

        def settled(n: int = 1) -> None:
            nonlocal pending
            pending -= n
            if pending == 0:
                spool.done(segment)
                self._replaying = False

        def delivered(error: Any, message: Any) -> None:
            self._kafka_delivered(error, message)
            settled()

        self._replaying = True
        for i, value in enumerate(records):
            if not self._produce(value, delivered):
                for rest in records[i:]:
                    self._keep(rest, "Kafka client buffer full while sending the spool")
                settled(len(records) - i)
                break
        if not records:
            settled(0)

    def _run_kafka(self) -> None:
        producer = self._producer
        while True:
            try:
                # The timeout only bounds how long delivery reports wait to be served.
                record = self._queue.get(timeout=0.1)
            except queue.Empty:
                record = False
            if record is None:
                break
            if record:
                value = json.dumps(record, separators=(",", ":")).encode()
                if not self._produce(value, self._kafka_delivered):
                    self._keep(value, "Kafka client buffer full (broker slow or unreachable)")
            producer.poll(0)
            self._replay()
            if self._spool is not None:
                self._spool.flush()
                self._spooled_metric.set(self._spool.records)
        left = producer.flush(max(0.0, self._close_deadline - time.monotonic()))
        if left:
            producer.purge()
            producer.poll(0)  # serves the purged records' delivery reports: spooled or counted
        if self._spool is not None:
            self._spool.close()
            self._spooled_metric.set(self._spool.records)


def _kafka_permanent_errors() -> frozenset[int]:
    """Delivery error codes that sending again cannot cure: the record itself is refused."""
    from confluent_kafka import KafkaError

    names = ("MSG_SIZE_TOO_LARGE", "_MSG_SIZE_TOO_LARGE", "INVALID_MSG", "INVALID_MSG_SIZE",
             "INVALID_RECORD", "CORRUPT_MESSAGE")  # fmt: skip
    return frozenset(getattr(KafkaError, n) for n in names if hasattr(KafkaError, n))


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
