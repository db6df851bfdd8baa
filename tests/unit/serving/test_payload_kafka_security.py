"""TLS and SASL of the Kafka payload sink come from the environment (a mounted Secret)."""

from __future__ import annotations

import pytest

from kubeml.serving.telemetry.payload import kafka_security_config

MSK = {"KUBEML_KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "KUBEML_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
       "KUBEML_KAFKA_SASL_USERNAME": "payloads", "KUBEML_KAFKA_SASL_PASSWORD": "s3cret",
       "KUBEML_KAFKA_SSL_CA_LOCATION": "/etc/ssl/certs/ca.pem"}


def test_msk_sasl_ssl_settings_reach_the_producer():
    assert kafka_security_config(MSK) == {
        "security.protocol": "SASL_SSL", "sasl.mechanism": "SCRAM-SHA-512", "sasl.username": "payloads",
        "sasl.password": "s3cret", "ssl.ca.location": "/etc/ssl/certs/ca.pem"}


def test_nothing_set_is_plaintext_as_before():
    assert kafka_security_config({}) == {}


@pytest.mark.parametrize(("env", "message"), [
    ({"KUBEML_KAFKA_SECURITY_PROTOCOL": "TLS"}, "is not one of"),
    ({**MSK, "KUBEML_KAFKA_SASL_MECHANISM": "MD5"}, "SASL_MECHANISM must be one of"),
    ({**MSK, "KUBEML_KAFKA_SASL_PASSWORD": ""}, "needs KUBEML_KAFKA_SASL_USERNAME and"),
    ({"KUBEML_KAFKA_SASL_USERNAME": "u", "KUBEML_KAFKA_SASL_PASSWORD": "p"}, "would not be sent|SASL settings are set"),
])
def test_inconsistent_settings_are_refused_with_the_fix(env, message):
    with pytest.raises(ValueError, match=message):
        kafka_security_config(env)
