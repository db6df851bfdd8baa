"""A real single-node Kafka broker (KRaft) for the tests that need one.

The broker runs from Maven jars (``hack/kafka/fetch.sh``, cached under ``~/.cache/kubeml``)
in its own JVM and process group, on free loopback ports, with its data in a temp dir.
``tests/integration/conftest.py`` imports the fixture, so any integration test may ask
for ``kafka_broker``; the broker starts only when one does.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import free_port

REPO = Path(__file__).resolve().parents[2]
HACK = REPO / "hack" / "kafka"
#: Seconds for the JVM to format the storage and start; ~10 s on an idle 2-core machine,
#: several times that while other tests load it.
START_TIMEOUT_S = 120.0
#: Seconds for a clean shutdown after SIGTERM before the process group is killed.
STOP_GRACE_S = 20.0


@dataclass(frozen=True)
class KafkaBroker:
    """A running broker: ``bootstrap`` is ``127.0.0.1:PORT`` (PLAINTEXT)."""

    bootstrap: str
    directory: Path

    def url(self, topic: str) -> str:
        """The ``kafka://`` payload-sink URL of ``topic`` on this broker."""
        return f"kafka://{self.bootstrap}/{topic}"

    def consume(self, topic: str, *, expected: int, timeout_s: float = 30.0) -> list:
        """Read ``topic`` from the start until ``expected`` messages or ``timeout_s``.

        Returns ``(key, partition, decoded JSON value)`` per message; a shortfall is
        returned as is, for the caller's assertion to show.
        """
        from confluent_kafka import Consumer

        consumer = Consumer(
            {
                "bootstrap.servers": self.bootstrap,
                "group.id": f"test-{uuid.uuid4().hex}",
                "auto.offset.reset": "earliest",
                "enable.auto.commit": False,
            }
        )
        messages = []
        try:
            consumer.subscribe([topic])
            deadline = time.monotonic() + timeout_s
            while len(messages) < expected and time.monotonic() < deadline:
                message = consumer.poll(0.5)
                if message is None:
                    continue
                if message.error():
                    # A topic not created yet reads as an error until the first record lands.
                    continue
                messages.append(
                    (message.key().decode(), message.partition(), json.loads(message.value()))
                )
            # Anything beyond ``expected`` is a bug too (duplicates): give it a moment to show.
            extra_deadline = time.monotonic() + 1.0
            while time.monotonic() < extra_deadline:
                message = consumer.poll(0.2)
                if message is not None and not message.error():
                    messages.append(
                        (message.key().decode(), message.partition(), json.loads(message.value()))
                    )
        finally:
            consumer.close()
        return messages


    def count(self, topic: str) -> int:
        """Messages stored in ``topic`` (high minus low watermark, summed over partitions)."""
        from confluent_kafka import Consumer, TopicPartition

        consumer = Consumer({"bootstrap.servers": self.bootstrap, "group.id": "test-count"})
        try:
            partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
            total = 0
            for p in partitions:
                low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
                total += high - low
            return total
        finally:
            consumer.close()


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no output)"


def _ready(bootstrap: str) -> bool:
    """The broker answers a metadata request and lists itself."""
    from confluent_kafka.admin import AdminClient

    # log_level 0: the refused connections while the JVM starts are expected, not news.
    admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 0})
    try:
        return len(admin.list_topics(timeout=2).brokers) == 1
    except Exception:  # KafkaException: not up yet
        return False


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@contextlib.contextmanager
def running_broker(directory: Path, port: int | None = None) -> Iterator[KafkaBroker]:
    """A broker on ``port`` (a free one when None) with its data in ``directory``; stopped
    (its whole process group) on exit."""
    # Fetch first, with its own error: a Maven failure is not a broker that failed to start.
    subprocess.run(["bash", str(HACK / "fetch.sh")], check=True, stdout=subprocess.DEVNULL)
    port = port or free_port()
    controller_port = free_port()
    while controller_port == port:
        controller_port = free_port()
    directory.mkdir(parents=True, exist_ok=True)
    out = directory / "broker.out"
    with out.open("wb") as sink:
        proc = subprocess.Popen(
            ["bash", str(HACK / "broker.sh"), str(directory), str(port), str(controller_port)],
            stdin=subprocess.DEVNULL,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # own process group: the JVM and the shell stop together
        )
    bootstrap = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _ready(bootstrap):
            if proc.poll() is not None:
                server_log = directory / "logs" / "server.log"
                pytest.fail(
                    f"Kafka broker exited with status {proc.returncode} before it was ready; "
                    f"last lines of {out}:\n{_tail(out)}\n{server_log}:\n{_tail(server_log)}"
                )
            if time.monotonic() > deadline:
                pytest.fail(
                    f"Kafka broker on {bootstrap} not ready after {START_TIMEOUT_S:.0f} s; "
                    f"last lines of {out}:\n{_tail(out)}"
                )
            time.sleep(0.5)
        yield KafkaBroker(bootstrap=bootstrap, directory=directory)
    finally:
        _stop(proc)


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaBroker]:
    """One broker for the session."""
    with running_broker(tmp_path_factory.mktemp("kafka")) as broker:
        yield broker
