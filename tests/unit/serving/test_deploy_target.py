"""The deploy-target seam: ``serving.target`` picks where an approved version is served."""

from __future__ import annotations

from pathlib import Path

import pytest
import requests

from kubeml._proc import free_ports
from kubeml.config import ServingConfig
from kubeml.errors import ConfigError
from kubeml.serving.deploy import (
    KServeDeployTarget,
    LocalDeployTarget,
    get_deploy_target,
)
from kubeml.serving.rollout import LocalBackend


def test_unknown_target_is_refused_naming_the_key_and_the_choices():
    with pytest.raises(ConfigError, match=r"serving\.target 'ec2'") as raised:
        get_deploy_target("ec2")
    assert "'kserve', 'local'" in str(raised.value)


def test_local_target_is_the_local_deploy_target():
    target = get_deploy_target("local")
    assert isinstance(target, LocalDeployTarget)
    assert target.name == "local"


def test_kserve_target_refuses_with_config_error(tmp_path: Path):
    target = get_deploy_target("kserve")
    assert isinstance(target, KServeDeployTarget)
    with pytest.raises(ConfigError, match=r"not available yet.*serving\.target: local"):
        target.deploy(
            model="digits",
            version="1",
            bundle_dir=tmp_path,
            serving=ServingConfig(target="kserve"),
            state_dir=tmp_path / "state",
        )


@pytest.mark.slow
def test_local_target_serves_a_bundle_behind_the_router(tmp_path: Path, digits_bundle: Path):
    http_port, grpc_port = free_ports(2)
    serving = ServingConfig(host="127.0.0.1", http_port=http_port, grpc_port=grpc_port)
    state_dir = tmp_path / "serving"
    try:
        outcome = get_deploy_target("local").deploy(
            model="digits", version="1", bundle_dir=digits_bundle, serving=serving,
            state_dir=state_dir,
        )  # fmt: skip
        assert outcome.action == "deployed" and outcome.stable_version == "1"
        assert outcome.url == f"http://127.0.0.1:{http_port}"
        assert outcome.grpc_target == f"127.0.0.1:{grpc_port}"
        r = requests.post(
            f"{outcome.url}/v1/models/digits:predict", json={"instances": [[0.0] * 64]}, timeout=30
        )
        assert r.status_code == 200 and r.headers["x-kubeml-model-version"] == "1"
    finally:
        LocalBackend("digits", state_dir=state_dir).stop()
