"""The platform as a platform engineer installs it: helm chart, kustomize overlays, and the
acceptance walk-through (two Tenants applied with kubectl, both Ready, `kubectl auth can-i`).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client as k8s

from kubeml.testing.cluster.fixtures import wait_until
from tests.integration.tenancy_fixtures import (
    REPO,
    binary,
    delete_tenant,
    ensure_namespace,
    operator_client,  # noqa: F401 (fixture)
    operator_running,
    platform,  # noqa: F401 (fixture)
    run_tool,
    wait_ready,
)

pytestmark = pytest.mark.integration

OVERLAYS = REPO / "manifests" / "overlays"

TENANTS_YAML = """\
apiVersion: kubeml.io/v1alpha1
kind: Tenant
metadata:
  name: team-a
spec:
  owners: [alice]
  deletionPolicy: Delete
  quota: {cpu: "16", memory: 64Gi, nvidia.com/gpu: 2, pods: 200}
  nodeGroups: [cpu, gpu-p4d]
  iamRoleArn: arn:aws:iam::123456789012:role/kubeml-team-a
  s3Prefix: s3://kubeml-artifacts/team-a/
  costCenter: cc-1001
---
apiVersion: kubeml.io/v1alpha1
kind: Tenant
metadata:
  name: team-b
spec:
  owners: [carol]
  deletionPolicy: Delete
"""


def test_helm_install_schedules_and_runs_the_operator_pod(admin, platform):  # noqa: F811
    core = k8s.CoreV1Api(admin)

    def running_pod() -> Any:
        pods = core.list_namespaced_pod(platform, label_selector="app.kubernetes.io/component=operator").items
        return next((p for p in pods if p.spec.node_name and p.status.phase == "Running"), None)

    pod = wait_until(running_pod, timeout_s=60, what="the operator pod to be scheduled and Running")
    node = core.read_node(pod.spec.node_name)
    assert node.metadata.labels["type"] == "kwok"
    container = pod.spec.containers[0]
    assert container.security_context.allow_privilege_escalation is False
    assert container.security_context.read_only_root_filesystem is True
    assert pod.spec.security_context.run_as_non_root is True
    assert container.liveness_probe.http_get.path == "/healthz"


def test_chart_monitoring_objects_are_accepted_by_their_crds(admin, platform):  # noqa: F811
    custom = k8s.CustomObjectsApi(admin)
    monitors = custom.list_namespaced_custom_object("monitoring.coreos.com", "v1", platform, "servicemonitors")
    rules = custom.list_namespaced_custom_object("monitoring.coreos.com", "v1", platform, "prometheusrules")
    links = k8s.CoreV1Api(admin).read_namespaced_config_map("centraldashboard-config", "kubeflow")

    assert len(monitors["items"]) == 2
    assert {g["name"] for g in rules["items"][0]["spec"]["groups"]} == {"kubeml-operator", "kubeml-model-servers"}
    assert {link["text"] for link in json.loads(links.data["links"])["menuLinks"]} >= {"Models", "Monitoring"}


@pytest.mark.parametrize("overlay", ["dev", "staging", "prod"])
def test_kustomize_overlay_builds_and_passes_server_side_dry_run(cluster, admin, platform, overlay):  # noqa: F811
    built = run_tool(cluster, "kubectl", "kustomize", str(OVERLAYS / overlay)).stdout
    namespace = {"dev": "kubeml-dev", "staging": "kubeml-staging", "prod": "kubeml-system"}[overlay]
    # A dry-run persists nothing, so objects inside a namespace created by the same dry-run
    # would be refused; the namespace must exist (as it would after the first real apply).
    ensure_namespace(admin, namespace)
    result = subprocess.run(
        [binary("kubectl"), f"--kubeconfig={cluster.admin_kubeconfig}", "apply", "--server-side",
         "--force-conflicts", "--field-manager=kustomize-test", "--dry-run=server", "-f", "-"],
        input=built, capture_output=True, text=True, timeout=120)

    assert result.returncode == 0, result.stderr
    assert "deployment.apps/kubeml-kubeml-platform-operator serverside-applied (server dry run)" in result.stdout


def test_acceptance_two_tenants_applied_with_kubectl(cluster, admin, operator_client, tmp_path: Path):  # noqa: F811
    manifest = tmp_path / "tenants.yaml"
    manifest.write_text(TENANTS_YAML)
    with operator_running(operator_client):
        try:
            run_tool(cluster, "kubectl", "apply", "-f", str(manifest))
            team_a = wait_ready(admin, "team-a")
            wait_ready(admin, "team-b")
            other = run_tool(cluster, "kubectl", "auth", "can-i", "list", "pods", "-n", "team-b", "--as", "alice",
                             check=False)
            own = run_tool(cluster, "kubectl", "auth", "can-i", "list", "pods", "-n", "team-a", "--as", "alice",
                           check=False)
            ns = k8s.CoreV1Api(admin).read_namespace("team-a")
            sa = k8s.CoreV1Api(admin).read_namespaced_service_account("kubeml-workload", "team-a")
        finally:
            run_tool(cluster, "kubectl", "delete", "-f", str(manifest), "--wait=false", check=False)
            delete_tenant(admin, "team-a")
            delete_tenant(admin, "team-b")

    assert team_a["status"]["namespace"] == "team-a"
    assert other.stdout.strip() == "no"
    assert own.stdout.strip() == "yes"
    assert ns.metadata.labels["pod-security.kubernetes.io/enforce"] == "restricted"
    assert ns.metadata.labels["pod-security.kubernetes.io/enforce-version"] == "v1.33"
    assert ns.metadata.labels["kubeml.io/cost-center"] == "cc-1001"
    assert ns.metadata.annotations["kubeml.io/node-groups"] == "cpu,gpu-p4d"
    assert sa.metadata.annotations["eks.amazonaws.com/role-arn"] == "arn:aws:iam::123456789012:role/kubeml-team-a"
