"""``kafka://`` payload-sink URLs: bad ones fail at construction, saying how to fix them."""

from __future__ import annotations

import pytest

from kubeml.serving.telemetry import PayloadLogger
from kubeml.serving.telemetry.payload import _parse_kafka_url


@pytest.mark.parametrize(
    ("url", "brokers", "topic"),
    [
        ("kafka://localhost:9092/payloads", ["localhost:9092"], "payloads"),
        ("kafka://k1:9092,k2:19092/digits.v2_x", ["k1:9092", "k2:19092"], "digits.v2_x"),
        ("kafka://[::1]:9092/p", ["[::1]:9092"], "p"),
        ("kafka://127.0.0.1:09092/p", ["127.0.0.1:9092"], "p"),
    ],
)
def test_valid_urls_give_brokers_and_topic(url, brokers, topic):
    assert _parse_kafka_url(url) == (brokers, topic)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("kafka://localhost:9092", r"names no topic; add it after the brokers, e\.g\. kafka://"),
        ("kafka://localhost:9092/", "names no topic"),
        ("kafka://localhost/payloads", "needs HOST:PORT"),
        ("kafka:///payloads", "needs HOST:PORT"),
        ("kafka://a:9092,/payloads", "needs HOST:PORT"),
        ("kafka://localhost:port/payloads", r"port 'port'; the port must be a number in 1\.\."),
        ("kafka://localhost:0/payloads", "must be a number in 1..65535"),
        ("kafka://localhost:70000/payloads", "must be a number in 1..65535"),
        ("kafka://localhost:-1/payloads", "must be a number in 1..65535"),
        ("kafka://::1:9092/payloads", "put an IPv6 address in brackets"),
        ("kafka://localhost:9092/pay loads", "not a valid topic name"),
        ("kafka://localhost:9092/a/b", "no further path or query"),
        ("kafka://localhost:9092/p?acks=all", "not a valid topic name"),
        ("kafka://localhost:9092/..", "reserved"),
        ("kafka://localhost:9092/" + "t" * 250, "1-249"),
    ],
)
def test_malformed_urls_are_rejected_at_construction(url, message):
    with pytest.raises(ValueError, match=message):
        PayloadLogger(url)


def test_other_sinks_are_not_taken_for_kafka(tmp_path):
    # A file sink whose name merely contains "kafka" stays a file sink.
    sink = tmp_path / "kafka" / "payloads.jsonl"
    logger = PayloadLogger(sink)
    logger.submit({"request_id": "r1"})
    logger.close()
    assert sink.read_text().count("\n") == 1
