"""The operator's kopf login takes the token the Kubernetes client holds, whatever its scheme."""

from __future__ import annotations

import pytest
from kubernetes import client

from kubeml.operators.tenant import _connection_info


@pytest.mark.parametrize("header", ["bearer tok-1", "Bearer tok-1", "tok-1"])
def test_token_without_its_scheme(header: str) -> None:
    # In-cluster config writes "bearer <token>" (lower case); sending that on would
    # give "Bearer bearer <token>" and a 401 from the apiserver.
    configuration = client.Configuration()
    configuration.host = "https://10.96.0.1:443"
    configuration.api_key = {"authorization": header}
    info = _connection_info(client.ApiClient(configuration))
    assert (info.scheme, info.token) == ("Bearer", "tok-1")


def test_rotated_token_is_read_again_at_login() -> None:
    configuration = client.Configuration()
    configuration.host = "https://10.96.0.1:443"
    tokens = iter(["first", "second"])

    def refresh(c: client.Configuration) -> None:
        c.api_key = {"authorization": f"bearer {next(tokens)}"}

    configuration.refresh_api_key_hook = refresh
    api = client.ApiClient(configuration)
    assert _connection_info(api).token == "first"
    assert _connection_info(api).token == "second"


def test_no_token_means_no_scheme() -> None:
    configuration = client.Configuration()
    configuration.host = "https://127.0.0.1:6443"
    info = _connection_info(client.ApiClient(configuration))
    assert info.token is None and info.scheme is None
