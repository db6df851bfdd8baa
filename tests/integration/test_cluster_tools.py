"""kubectl and helm, built with the control plane, see a real v1.34+ server and Ready nodes."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from kubeml.testing.cluster import find_assets

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def tool(cluster):
    """Run kubectl/helm from the asset cache against the test cluster as admin."""
    assets = find_assets()
    env = {**os.environ, "KUBECONFIG": str(cluster.admin_kubeconfig)}

    def run(name: str, *args: str, cwd: Path | None = None) -> str:
        result = subprocess.run([str(assets.binary(name)), *args], env=env, cwd=cwd,
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, f"{name} {' '.join(args)} failed:\n{result.stderr}"
        return result.stdout

    return run


def _minor(git_version: str) -> int:
    major, minor = git_version.lstrip("v").split(".")[:2]
    assert major == "1"
    return int(minor)


def test_kubectl_reports_server_v1_34_or_newer_within_one_minor_of_the_client(tool):
    versions = json.loads(tool("kubectl", "version", "--output=json"))

    server, client = versions["serverVersion"]["gitVersion"], versions["clientVersion"]["gitVersion"]
    assert _minor(server) >= 34
    assert abs(_minor(server) - _minor(client)) <= 1


def test_kubectl_get_nodes_shows_ready_cpu_and_gpu_nodes(tool):
    nodes = json.loads(tool("kubectl", "get", "nodes", "--output=json"))["items"]

    ready = {
        n["metadata"]["name"]: n for n in nodes
        if any(c["type"] == "Ready" and c["status"] == "True" for c in n["status"]["conditions"])
    }
    assert len(ready) == len(nodes)
    gpu = [n for n in ready.values() if n["status"]["allocatable"].get("nvidia.com/gpu") == "8"]
    cpu = [n for n in ready.values() if "nvidia.com/gpu" not in n["status"]["allocatable"]]
    assert gpu and cpu
    for node in gpu:
        assert {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"} in node["spec"]["taints"]


def test_helm_sees_the_server_version(tool, tmp_path):
    chart = tmp_path / "probe"
    (chart / "templates").mkdir(parents=True)
    (chart / "Chart.yaml").write_text("apiVersion: v2\nname: probe\nversion: 0.1.0\nkubeVersion: '>=1.34.0-0'\n")
    (chart / "templates" / "cm.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: probe\n"
        "data:\n  kubeVersion: {{ .Capabilities.KubeVersion.Version | quote }}\n"
    )

    # --dry-run=server asks the apiserver for its version (and validates the manifest).
    out = tool("helm", "install", "probe", str(chart), "--namespace", "default", "--dry-run=server")

    assert "kubeVersion: \"v1." in out
    minor = int(out.split('kubeVersion: "v1.')[1].split(".")[0])
    assert minor >= 34
