"""Kustomize manifests stay in step with the chart, and the public API stays curated."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import yaml

import kubeml.operators
from kubeml.testing.cluster import AssetsMissing, find_assets

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def assets():
    try:
        return find_assets()
    except AssetsMissing as exc:
        pytest.skip(f"helm/kubectl not built: {exc}")


def test_base_is_the_chart_rendered_with_defaults(assets, tmp_path):
    copy = tmp_path / "manifests"
    subprocess.run(["cp", "-r", str(REPO / "manifests"), str(copy)], check=True)
    (tmp_path / "charts").symlink_to(REPO / "charts")
    subprocess.run(["bash", str(copy / "render-base.sh")], check=True, timeout=60,
                   env={**os.environ, "HELM": str(assets.binary("helm"))})

    assert (copy / "base" / "platform.yaml").read_text() == (REPO / "manifests" / "base" / "platform.yaml").read_text(), \
        "manifests/base/platform.yaml is stale: run manifests/render-base.sh"


def test_the_crd_is_installed_apart_and_no_overlay_owns_it(assets):
    """`kubectl delete -k` on an overlay must not delete the Tenant CRD (and every Tenant)."""
    crd = yaml.safe_load((REPO / "charts/kubeml-platform/crds/tenants.kubeml.io.yaml").read_text())
    kubectl = str(assets.binary("kubectl"))
    built = subprocess.run([kubectl, "kustomize", str(REPO / "manifests/crds")], capture_output=True, text=True,
                           timeout=60, check=True).stdout
    copied = yaml.safe_load((REPO / "manifests/crds/tenants.kubeml.io.yaml").read_text())

    assert copied == crd
    assert [d["metadata"]["name"] for d in yaml.safe_load_all(built) if d] == ["tenants.kubeml.io"]
    assert crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    for overlay in ("dev", "staging", "prod"):
        out = subprocess.run([kubectl, "kustomize", str(REPO / "manifests/overlays" / overlay)],
                             capture_output=True, text=True, timeout=60, check=True).stdout
        assert "CustomResourceDefinition" not in {d["kind"] for d in yaml.safe_load_all(out) if d}, overlay


@pytest.mark.parametrize("overlay,namespace,tag", [("dev", "kubeml-dev", "dev"), ("staging", "kubeml-staging", "0.1.0-rc.1"),
                                                   ("prod", "kubeml-system", "0.1.0")])
def test_overlays_build(assets, overlay, namespace, tag):
    out = subprocess.run([str(assets.binary("kubectl")), "kustomize", str(REPO / "manifests/overlays" / overlay)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    deployments = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    deployment = deployments["kubeml-kubeml-platform-operator"]
    mlflow = deployments["kubeml-kubeml-platform-mlflow"]

    assert deployment["metadata"]["namespace"] == namespace == mlflow["metadata"]["namespace"]
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["template"]["spec"]["containers"][0]["image"] == f"ghcr.io/kubeml/kubeml:{tag}"
    assert mlflow["spec"]["template"]["spec"]["containers"][0]["image"] == f"ghcr.io/kubeml/kubeml-python:{tag}"
    assert next(d for d in docs if d["kind"] == "Namespace")["metadata"]["name"] == namespace
    # Namespaces inside values follow the overlay's: tenants' route to the tracking server,
    # and the Host headers it answers (a client in the cluster uses the Service's name).
    assert f"--mlflow-peer={namespace}:5000" in deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    hosts = {e["name"]: e.get("value") for e in mlflow["spec"]["template"]["spec"]["containers"][0]["env"]}[
        "MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")
    assert f"kubeml-kubeml-platform-mlflow.{namespace}.svc:*" in hosts
    assert not [h for h in hosts if ".kubeml-system" in h and namespace != "kubeml-system"]


def test_public_api_is_sorted_and_complete():
    names = kubeml.operators.__all__

    assert names == sorted(names)
    assert all(hasattr(kubeml.operators, n) for n in names)
