"""The Kafka payload sink (``--payload-log kafka://HOST:PORT/TOPIC``) on a real broker.

Model servers are real processes (``ServingManager``); the broker is a real single-node
KRaft Kafka (``kafka_fixtures``); records are read back with a real consumer.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import requests
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from kubeml.serving import ServedModel, ServingManager
from kubeml.serving.telemetry import PayloadLogger
from tests.conftest import free_port
from tests.integration.kafka_fixtures import KafkaBroker, running_broker
from tests.unit.serving.conftest import write_digits_bundle

pytestmark = pytest.mark.integration

VERSION = "5"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_digits_bundle(tmp_path_factory.mktemp("bundle") / "digits")


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[ServingManager]:
    manager = ServingManager(tmp_path / "state")
    try:
        yield manager
    finally:
        manager.stop()


def _topic() -> str:
    return f"payloads-{uuid.uuid4().hex[:12]}"


def _infer(
    served: ServedModel, row: np.ndarray, request_id: str | None = None
) -> requests.Response:
    tensor = {"name": "input", "shape": [1, 64], "datatype": "FP32", "data": row.tolist()}
    body = {"inputs": [tensor]}
    headers = {"x-request-id": request_id} if request_id else {}
    return requests.post(served.v2_url, json=body, headers=headers, timeout=30)


def _rows(n: int) -> np.ndarray:
    return np.random.default_rng(3).integers(0, 17, size=(n, 64)).astype(np.float32)


def _dropped_metric(served: ServedModel) -> float:
    return _metric(served, "kubeml_payload_records_dropped", "_total")


def _metric(served: ServedModel, family_name: str, suffix: str = "") -> float:
    text = requests.get(f"{served.url}/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        if family.name == family_name:
            for sample in family.samples:
                if sample.name == family_name + suffix and sample.labels == {"sink": "kafka"}:
                    return sample.value
    return 0.0


def _wait(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout_s:.0f} s: {what}")
        time.sleep(0.2)


def _spool_lines(directory: Path) -> list[bytes]:
    return [line for f in sorted(directory.glob("*.jsonl")) for line in f.read_bytes().splitlines()]


@pytest.mark.slow  # starts a model server (10-40 s)
def test_every_served_request_lands_on_the_topic_keyed_by_its_request_id(
    manager: ServingManager, bundle: Path, kafka_broker: KafkaBroker
):
    topic = _topic()
    served = manager.deploy("digits", bundle, version=VERSION, payload_log=kafka_broker.url(topic))
    n = 12
    responses = {}
    for i, row in enumerate(_rows(n)):
        # Half the ids come from the client, half are made by the server.
        r = _infer(served, row, f"client-{i}" if i % 2 else None)
        assert r.status_code == 200, r.text
        responses[r.headers["x-request-id"]] = r.json()
    assert len(responses) == n and {f"client-{i}" for i in range(1, n, 2)} <= set(responses)

    messages = kafka_broker.consume(topic, expected=n)
    assert sorted(key for key, _, _ in messages) == sorted(responses)
    for key, _, record in messages:
        assert record["request_id"] == key
        assert (record["model"], record["version"], record["status"]) == ("digits", VERSION, 200)
        assert record["protocol"] == "v2"
        assert record["request"]["inputs"][0]["shape"] == [1, 64]
        assert record["response"] == responses[key]
        assert record["response"]["model_version"] == VERSION


@pytest.mark.slow  # starts a model server (10-40 s)
def test_half_sampling_logs_about_half_the_requests(
    manager: ServingManager, bundle: Path, kafka_broker: KafkaBroker
):
    topic = _topic()
    served = manager.deploy(
        "digits",
        bundle,
        version=VERSION,
        payload_log=kafka_broker.url(topic),
        payload_sample_rate=0.5,
    )
    n = 100
    ids = set()
    for row in _rows(n):
        r = _infer(served, row)
        assert r.status_code == 200, r.text
        ids.add(r.headers["x-request-id"])
    manager.stop("digits")  # the server flushes its payload log on the way out

    logged = kafka_broker.count(topic)
    # Binomial(100, 0.5): outside 30..70 with probability ~3e-5.
    assert 30 <= logged <= 70, logged
    messages = kafka_broker.consume(topic, expected=logged)
    keys = [key for key, _, _ in messages]
    assert len(keys) == logged and len(set(keys)) == logged
    assert set(keys) <= ids


@pytest.mark.slow  # starts a model server (10-40 s)
def test_unreachable_broker_fails_no_request_and_counts_every_record_dropped(
    manager: ServingManager, bundle: Path
):
    # Nothing listens on this port: the broker is down for the server's whole life.
    sink = f"kafka://127.0.0.1:{free_port()}/payloads"
    # No spool: undelivered records have nowhere to go.
    served = manager.deploy("digits", bundle, version=VERSION, payload_log=sink, payload_spool_mb=0)
    n = 10
    for row in _rows(n):
        r = _infer(served, row)
        assert r.status_code == 200, r.text

    # Undelivered records are dropped after PayloadLogger.KAFKA_DELIVERY_TIMEOUT_MS.
    deadline = time.monotonic() + PayloadLogger.KAFKA_DELIVERY_TIMEOUT_MS / 1000 + 20
    while _dropped_metric(served) < n and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _dropped_metric(served) == n
    assert manager.get("digits").ready
    log_text = Path(served.log_file).read_text()
    assert f"payload sink {sink}" in log_text and "dropped" in log_text


def test_close_flushes_and_keeps_one_request_in_one_partition(kafka_broker: KafkaBroker):
    topic = _topic()
    logger = PayloadLogger(kafka_broker.url(topic))
    request_ids = [f"req-{i}" for i in range(8)]
    for n in range(40):  # five records per request id
        logger.submit({"request_id": request_ids[n % 8], "version": VERSION, "n": n})
    logger.close()  # right away: only the flush in close() gets these out in time
    assert logger.dropped == 0

    messages = kafka_broker.consume(topic, expected=40)
    assert sorted(record["n"] for _, _, record in messages) == list(range(40))
    partitions: dict[str, set[int]] = {}
    for key, partition, record in messages:
        assert key == record["request_id"]
        partitions.setdefault(key, set()).add(partition)
    assert set(partitions) == set(request_ids)
    assert all(len(p) == 1 for p in partitions.values()), partitions
    # With 3 partitions, 8 keys spread over more than one (the key is what places them).
    assert len(set().union(*partitions.values())) > 1


def test_logger_with_unreachable_broker_drops_counts_and_warns(caplog: pytest.LogCaptureFixture):
    sink = f"kafka://127.0.0.1:{free_port()}/payloads"
    metric, labels = "kubeml_payload_records_dropped_total", {"sink": "kafka"}
    before = REGISTRY.get_sample_value(metric, labels) or 0
    with caplog.at_level(logging.WARNING, logger="kubeml.serving.telemetry"):
        logger = PayloadLogger(sink)
        started = time.monotonic()
        for i in range(5):
            logger.submit({"request_id": str(i)})
        assert time.monotonic() - started < 0.1  # submit never waits for the broker
        logger.close(timeout_s=1.0)
    assert logger.dropped == 5
    after = REGISTRY.get_sample_value(metric, labels)
    assert after - before == 5
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("5 record(s) dropped in all" in w for w in warnings), warnings


# -- the spool: nothing lost while the broker is down, within the spool's bound ---------------


def test_records_kept_while_the_broker_is_down_reach_it_once_it_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    # Records wait 2 s in the client instead of 10 before they go to the spool.
    monkeypatch.setattr(PayloadLogger, "KAFKA_DELIVERY_TIMEOUT_MS", 2000)
    port, topic, n = free_port(), _topic(), 50
    spool = tmp_path / "spool"
    logger = PayloadLogger(f"kafka://127.0.0.1:{port}/{topic}", spool_dir=spool)
    try:
        for i in range(n):
            logger.submit({"request_id": f"req-{i % 7}", "n": i})
        # No broker listens yet: every record times out in the client and is spooled.
        _wait(lambda: logger.spooled == n, 30, f"{n} records spooled (have {logger.spooled})")
        assert logger.dropped == 0
        # ... and on disk once the writer has flushed its batch.
        _wait(lambda: len(_spool_lines(spool)) == n, 5, f"{n} records in {spool}")

        # The broker starts on the sink's port: the spool is sent and emptied.
        with running_broker(tmp_path / "broker", port) as broker:
            messages = broker.consume(topic, expected=n, timeout_s=90)
            _wait(lambda: not _spool_lines(spool), 30, "spool segments deleted once delivered")
            logger.close()
    finally:
        logger.close()
    # consume() reads on past ``expected``: a record sent twice would show here.
    assert sorted(record["n"] for _, _, record in messages) == list(range(n))
    assert all(key == record["request_id"] for key, _, record in messages)
    assert logger.dropped == 0 and logger.spooled == 0


def test_spool_bound_drops_and_counts_only_the_excess_and_the_next_start_sends_the_rest(
    tmp_path: Path, kafka_broker: KafkaBroker
):
    spool, topic = tmp_path / "spool", _topic()
    records = [{"request_id": f"req-{i:04d}", "n": i} for i in range(25)]
    size = len(json.dumps(records[0], separators=(",", ":"))) + 1  # every record the same size
    down = PayloadLogger(f"kafka://127.0.0.1:{free_port()}/{topic}", spool_dir=spool,
                         spool_max_bytes=10 * size)  # fmt: skip
    for record in records:
        down.submit(record)
    # Nothing is delivered within the close deadline: the client's records are purged into
    # the spool, 10 fit and the other 15 are dropped and counted.
    down.close(timeout_s=1.0)
    assert (down.dropped, down.spooled) == (15, 10)
    kept = [json.loads(line)["n"] for line in _spool_lines(spool)]
    assert len(set(kept)) == 10 and set(kept) <= set(range(25))

    # The next logger on the same spool (a restarted server) sends the 10 to its broker.
    up = PayloadLogger(kafka_broker.url(topic), spool_dir=spool)
    try:
        assert up.spooled == 10
        messages = kafka_broker.consume(topic, expected=10)
        _wait(lambda: not _spool_lines(spool), 30, "spool segments deleted once delivered")
    finally:
        up.close()
    assert sorted(record["n"] for _, _, record in messages) == sorted(kept)
    assert up.dropped == 0 and up.spooled == 0


@pytest.mark.slow  # starts a model server (10-40 s)
def test_a_served_models_kafka_sink_spools_under_the_state_dir_while_the_broker_is_down(
    manager: ServingManager, bundle: Path
):
    sink = f"kafka://127.0.0.1:{free_port()}/payloads"
    served = manager.deploy("digits", bundle, version=VERSION, payload_log=sink)
    n = 10
    for row in _rows(n):
        r = _infer(served, row)
        assert r.status_code == 200, r.text
    # After PayloadLogger.KAFKA_DELIVERY_TIMEOUT_MS in the client, the records are spooled.
    spooled = lambda: _metric(served, "kubeml_payload_records_spooled")  # noqa: E731
    _wait(lambda: spooled() == n, PayloadLogger.KAFKA_DELIVERY_TIMEOUT_MS / 1000 + 20,
          f"{n} records spooled (gauge {spooled()})")  # fmt: skip
    assert _dropped_metric(served) == 0
    spool = manager.state_dir / "payload-spool" / "digits"
    # The records reach the file as the writer handles them (flushed, not yet fsynced).
    assert sorted(json.loads(line)["model"] for line in _spool_lines(spool)) == ["digits"] * n
