"""Multi-model serving: one server, bundles loaded through the V2 repository API, LRU eviction."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
import requests

from kubeml.serving.tokens import first_token, write_token_file
from tests.unit.serving.conftest import write_digits_bundle

ROW = [float(i % 17) for i in range(64)]
INFER = {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": ROW}]}


_ADMIN: dict[str, str] = {}
"""The admin token of the module's server, as the Authorization header its clients send."""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    token_file = write_token_file(tmp_path_factory.mktemp("secrets") / "admin-token")
    _ADMIN["Authorization"] = f"Bearer {first_token(token_file)}"
    models = tmp_path_factory.mktemp("models")
    for seed, name in enumerate(("a", "b", "c")):
        write_digits_bundle(models / name, seed=seed)
    size = (models / "a" / "model.safetensors").stat().st_size
    cap_mb = 2.5 * size / (1024 * 1024)  # room for two models, not three
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = (tmp_path_factory.mktemp("logs") / "server.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "kubeml.serving.server", "--models-dir", str(models),
         "--max-memory-mb", str(cap_mb), "--http-port", str(port), "--admin-token-file", str(token_file)],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "JE_ARROW_MALLOC_CONF": "background_thread:false"},
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, "multi-model server exited"
            try:
                if requests.get(f"{url}/v2/health/ready", timeout=2).ok:
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, "multi-model server not ready in 180 s"
            time.sleep(0.25)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
        log.close()


def _post(url: str, path: str, body=None) -> requests.Response:
    return requests.post(url + path, json=body, headers=_ADMIN, timeout=60)


def test_models_load_on_request_and_least_recently_used_is_evicted(server):
    assert _post(server, "/v2/models/a/infer", INFER).status_code == 404  # not loaded yet
    assert _post(server, "/v2/repository/models/a/load").json()["loaded"] == ["a"]
    assert requests.get(f"{server}/v2/models/a/ready", timeout=10).status_code == 200
    assert _post(server, "/v2/repository/models/b/load").json()["loaded"] == ["a", "b"]
    assert _post(server, "/v2/models/a/infer", INFER).status_code == 200  # a is now most recent
    loaded = _post(server, "/v2/repository/models/c/load").json()["loaded"]
    assert loaded == ["a", "c"]  # b was least recently used
    assert _post(server, "/v2/models/b/infer", INFER).status_code == 404
    states = {m["name"]: m["state"] for m in _post(server, "/v2/repository/index").json()}
    assert states == {"a": "READY", "b": "UNAVAILABLE", "c": "READY"}
    assert _post(server, "/v2/models/c/infer", INFER).json()["model_name"] == "c"


def test_unknown_and_unsafe_model_names_are_404(server):
    for name in ("zz", "..%2Fetc"):
        r = _post(server, f"/v2/repository/models/{name}/load")
        assert r.status_code == 404 and "error" in r.json()
    assert _post(server, "/v2/repository/models/zz/unload").status_code == 404


def test_unload_frees_the_model(server):
    _post(server, "/v2/repository/models/a/load")
    assert _post(server, "/v2/repository/models/a/unload").status_code == 200
    assert _post(server, "/v2/models/a/infer", INFER).status_code == 404
    assert requests.get(f"{server}/v2/health/ready", timeout=10).status_code == 200


def test_the_repository_api_needs_the_admin_token_and_infer_keeps_answering(server):
    assert _post(server, "/v2/repository/models/a/load").status_code == 200
    for path in ("/v2/repository/models/a/unload", "/v2/repository/models/b/load", "/v2/repository/index"):
        for headers in ({}, {"Authorization": "Bearer not-the-admin-token-at-all"}, {"Authorization": "Basic eDp5"}):
            r = requests.post(server + path, headers=headers, timeout=30)
            assert r.status_code == 401, (path, headers, r.text)
            assert "admin token" in r.json()["error"] and r.headers["www-authenticate"].startswith("Bearer")
    assert requests.post(server + "/v2/models/a/infer", json=INFER, timeout=30).status_code == 200  # still loaded
    assert requests.get(f"{server}/v2/health/live", timeout=10).status_code == 200


def test_a_multi_model_server_without_an_admin_token_does_not_start(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "kubeml.serving.server", "--models-dir", str(tmp_path), "--http-port", "1"],
        capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 2 and "needs --admin-token-file" in r.stderr, r.stderr[-500:]
