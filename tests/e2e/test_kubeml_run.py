"""`kubeml run` end to end on the local target: real kfp.local, Ray, MLflow, KServe."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import requests
import yaml

from tests.conftest import free_port

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

KUBEML = [sys.executable, "-m", "kubeml.cli"]


def kubeml(project: Path, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200", "KUBEML_HOME": str(project / ".kubeml")}
    return subprocess.run(
        [*KUBEML, *args], cwd=project, env=env, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
    )


def write(project: Path, dev: dict) -> None:
    (project / "kubeml.yaml").write_text(yaml.safe_dump({"project": "e2e", "environments": {"dev": dev}}))


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    base = {
        "training": {"epochs": 12},
        "gate": {"min_accuracy": 0.9, "min_macro_f1": 0.9},
        "serving": {"http_port": free_port(), "grpc_port": free_port()},
    }
    write(root, base)
    yield root, base
    kubeml(root, "serve", "stop")


def versions(project: Path) -> list[dict]:
    from kubeml.config import load_config
    from kubeml.registry import Registry

    cfg = load_config(project / "kubeml.yaml", "dev")
    return [v.__dict__ for v in Registry(cfg.registry.tracking_uri).versions(cfg.registry.model_name)]


def test_first_run_registers_deploys_and_serves(project):
    root, base = project
    r = kubeml(root, "run")
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    for stage in ("ingest", "validate", "train", "evaluate", "gate", "register", "deploy"):
        assert stage in out
    assert "digits-cnn v1 (approved)" in out
    assert [v["version"] for v in versions(root)] == [1]
    port = base["serving"]["http_port"]
    body = json.loads((Path(__file__).parents[2] / "examples" / "digit-v2.json").read_text())
    answer = requests.post(f"http://127.0.0.1:{port}/v2/models/digits-cnn/infer", json=body, timeout=30)
    assert answer.status_code == 200, answer.text
    preds = {o["name"]: o for o in answer.json()["outputs"]}["predictions"]["data"]
    assert preds == [8]  # the last digits sample is an 8
    v1 = requests.post(f"http://127.0.0.1:{port}/v1/models/digits-cnn:predict",
                       json={"instances": [body["inputs"][0]["data"]]}, timeout=30)
    assert v1.status_code == 200 and v1.json()["predictions"] == [8]
    status = kubeml(root, "serve", "status")
    assert status.returncode == 0 and "digits-cnn" in status.stdout and f"127.0.0.1:{port}" in status.stdout


def test_malformed_requests_get_4xx_json_and_the_server_keeps_serving(project):
    root, base = project
    url = f"http://127.0.0.1:{base['serving']['http_port']}"
    cases = [
        ("/v2/models/digits-cnn/infer", b"{not json"),
        ("/v2/models/digits-cnn/infer", json.dumps({"inputs": [{"name": "input", "shape": [1, 63], "datatype": "FP32", "data": [0] * 63}]}).encode()),
        ("/v2/models/digits-cnn/infer", json.dumps({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "BYTES", "data": ["a"] * 64}]}).encode()),
        ("/v2/models/nope/infer", json.dumps({"inputs": []}).encode()),
        ("/v1/models/digits-cnn:predict", json.dumps({"instances": [[0] * 5]}).encode()),
    ]
    for path, data in cases:
        r = requests.post(url + path, data=data, headers={"Content-Type": "application/json"}, timeout=30)
        assert 400 <= r.status_code < 500, (path, data[:60], r.status_code, r.text)
        assert isinstance(r.json(), dict), r.text
    assert requests.get(f"{url}/v2/models/digits-cnn/ready", timeout=10).status_code == 200


def test_second_run_registers_version_2_and_redeploys(project):
    root, base = project
    r = kubeml(root, "run")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "digits-cnn v2 (approved)" in r.stdout
    assert "promoted (serving v2)" in r.stdout, r.stdout
    assert [v["version"] for v in versions(root)] == [1, 2]
    meta = requests.get(f"http://127.0.0.1:{base['serving']['http_port']}/v2/models/digits-cnn", timeout=10).json()
    assert "2" in meta.get("versions", []), meta


def test_violated_data_constraint_fails_the_run_and_registers_nothing(project):
    root, base = project
    write(root, {**base, "data": {"validation": {"max_value": 10}}})
    try:
        r = kubeml(root, "run")
    finally:
        write(root, base)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "stage validate failed" in r.stderr
    assert "value range: max value 16 > max_value=10" in r.stderr
    assert [v["version"] for v in versions(root)] == [1, 2]


def test_failed_gate_ends_cleanly_and_registers_nothing(project):
    root, base = project
    write(root, {**base, "training": {"epochs": 1}, "gate": {"min_accuracy": 0.9, "min_macro_f1": 1.0}})
    try:
        r = kubeml(root, "run")
    finally:
        write(root, base)
    assert r.returncode == 3, r.stdout + r.stderr
    assert "gate not passed: macro_f1" in r.stdout and "< min_macro_f1 1.0000" in r.stdout
    assert "nothing was registered or deployed" in r.stdout
    assert "Traceback" not in r.stdout + r.stderr
    assert [v["version"] for v in versions(root)] == [1, 2]


def test_bad_config_exits_2_naming_the_key(project):
    root, base = project
    write(root, {**base, "training": {"epoch": 3}})
    try:
        r = kubeml(root, "run", timeout=120)
    finally:
        write(root, base)
    assert r.returncode == 2
    assert "environments.dev.training.epoch: unknown key" in r.stderr
