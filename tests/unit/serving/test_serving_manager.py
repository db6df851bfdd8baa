"""ServingManager: deploy, redeploy on the same port, status, stop, failure reporting."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from kubeml.errors import ConfigError, ServingError
from kubeml.serving import ServingManager


def test_deploy_of_corrupt_bundle_fails_with_log_tail_and_leaves_no_state(tmp_path, digits_bundle):
    bundle = tmp_path / "corrupt"
    shutil.copytree(digits_bundle, bundle)
    weights = bundle / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    manager = ServingManager(tmp_path / "state")
    with pytest.raises(ServingError, match="checksum mismatch") as err:
        manager.deploy("digits", bundle, ready_timeout_s=60)
    assert "exited with status 1" in str(err.value)
    assert manager.status() == []


def test_deploy_refuses_a_port_held_by_another_process(tmp_path, digits_bundle):
    with socket.socket() as holder:
        holder.bind(("0.0.0.0", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(ServingError, match=f"port {port} .* in use"):
            ServingManager(tmp_path).deploy("digits", digits_bundle, http_port=port)
    assert ServingManager(tmp_path).status() == []


@pytest.mark.parametrize("name", ["", "a/b", "-x", "x y"])
def test_deploy_rejects_names_that_are_not_url_safe(tmp_path, digits_bundle, name):
    with pytest.raises(ConfigError, match="URL-safe"):
        ServingManager(tmp_path).deploy(name, digits_bundle)


def test_deploy_rejects_missing_bundle(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        ServingManager(tmp_path).deploy("digits", tmp_path / "missing")


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def write_stale_entry(state_dir: Path, name: str = "ghost") -> int:
    pid = _dead_pid()
    state_dir.mkdir(parents=True, exist_ok=True)
    record = {
        "name": name, "version": "1", "pid": pid, "http_port": 1, "grpc_port": None,
        "bundle_dir": "/nowhere", "log_file": "/nowhere.log", "started_at": 0.0,
        "host": "127.0.0.1",
    }  # fmt: skip
    (state_dir / "servers.json").write_text(json.dumps({name: record}))
    return pid


def test_dead_servers_are_reported_dead_and_cleaned_by_stop(tmp_path):
    write_stale_entry(tmp_path)
    manager = ServingManager(tmp_path)
    [ghost] = manager.status()
    assert ghost.name == "ghost" and not ghost.alive and not ghost.ready
    assert manager.stop("ghost") == ["ghost"]
    assert manager.status() == []


def test_stop_of_unknown_name_is_a_no_op(tmp_path):
    assert ServingManager(tmp_path).stop("nothing") == []


def test_corrupt_state_file_says_how_to_recover(tmp_path):
    (tmp_path / "servers.json").write_text("{not json")
    with pytest.raises(ServingError, match="delete the file"):
        ServingManager(tmp_path).status()
