"""The platform chart for real: `helm install` runs the operator pod from the operator image on
the real node; it reaches the apiserver through the `kubernetes` Service, turns Ready, is
scraped by Prometheus, and a Tenant applied with kubectl gets its namespace. The chart's MLflow
tracking server runs beside it from the runtime image, on PostgreSQL (Debian's, on this
machine) with its artifacts in S3 (moto, the stand-in for AWS), and serves the tenants' pods.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from kubeml.testing.cluster import (
    REAL_NODE_LABEL,
    REAL_NODE_TAINT,
    RESTRICTED_CONTAINER,
    image_archive,
    real_node_pod_spec,
)
from kubeml.testing.cluster._node import GATEWAY
from kubeml.testing.cluster.fixtures import wait_until
from kubeml.testing.postgres import PostgresServer, running_postgres
from kubernetes import client as k8s

from kubeml.images import image_ref
from tests.integration import probe_pods as probes
from tests.integration.prometheus_fixtures import ScrapeTarget, running_prometheus

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "kubeml-platform"
NAMESPACE = "kubeml-system"


def _tool(cluster, name: str, *args: str, timeout_s: float = 180):
    import subprocess

    result = subprocess.run([str(cluster.node.assets.binary(name)), f"--kubeconfig={cluster.admin_kubeconfig}",
                             *args], capture_output=True, text=True, timeout=timeout_s)
    assert result.returncode == 0, f"{name} {' '.join(args)}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


#: moto accepts any credentials; the tracking server has these (its IRSA role on EKS).
S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
OPERATOR = "app.kubernetes.io/component=operator"
MLFLOW_URL = f"http://kubeml-kubeml-platform-mlflow.{NAMESPACE}.svc:5000"


@dataclass(frozen=True)
class Platform:
    api: k8s.ApiClient
    postgres: PostgresServer
    artifacts: str
    """``s3://bucket/mlflow``: where the tracking server keeps artifacts."""
    s3_endpoint: str


@pytest.fixture(scope="module")
def platform(real_cluster, runtime_image: str, s3_endpoint: str, tmp_path_factory) -> Iterator[Platform]:
    """The chart as an operator installs it: the operator, and the shared MLflow tracking server
    on PostgreSQL (Debian's, on this machine) with its artifacts in S3 (moto), both reached
    from the node through relays on its address, as RDS and S3 would be from the VPC."""
    import boto3

    real_cluster.node.import_image(image_archive("operator"))
    repository, _, tag = image_ref("operator").rpartition(":")
    runtime_repository, _, runtime_tag = runtime_image.rpartition(":")
    bucket = f"kubeml-mlflow-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=s3_endpoint, aws_access_key_id="testing", aws_secret_access_key="testing",
                 region_name="us-east-1").create_bucket(Bucket=bucket)
    s3_port = int(s3_endpoint.rsplit(":", 1)[1])
    with contextlib.ExitStack() as stack:
        postgres = stack.enter_context(running_postgres(database="mlflow"))
        db = stack.enter_context(real_cluster.node.host_service(postgres.port, what="PostgreSQL"))
        s3 = stack.enter_context(real_cluster.node.host_service(s3_port, what="the S3 API (moto)"))
        core = stack.enter_context(real_cluster.api_client())
        k8s.CoreV1Api(core).create_namespace({"metadata": {"name": NAMESPACE}})
        k8s.CoreV1Api(core).create_namespaced_secret(NAMESPACE, {
            "metadata": {"name": "mlflow-db"},
            "stringData": {"uri": postgres.url.replace(f"{postgres.host}:{postgres.port}", db)}})
        placement = {"nodeSelector": {REAL_NODE_LABEL[0]: REAL_NODE_LABEL[1]},
                     "tolerations": [{"key": REAL_NODE_TAINT.key, "operator": "Equal", "value": REAL_NODE_TAINT.value,
                                      "effect": REAL_NODE_TAINT.effect}]}
        values = tmp_path_factory.mktemp("values") / "real-node.yaml"
        values.write_text(json.dumps({
            "image": {"repository": repository, "tag": tag, "pullPolicy": "Never"},
            **placement,
            "operator": {"kubeflowProfiles": False},
            "kubeflowDashboard": {"enabled": False},
            "mlflow": {
                "image": {"repository": runtime_repository, "tag": runtime_tag, "pullPolicy": "Never"},
                "workers": 1,
                "backendStore": {"existingSecret": "mlflow-db"},
                "artifacts": {"destination": f"s3://{bucket}/mlflow", "s3EndpointUrl": f"http://{s3}"},
                "extraEnv": [{"name": k, "value": v} for k, v in S3_CREDENTIALS.items()],
                "networkPolicy": {"databaseCIDRs": [f"{GATEWAY}/32"], "databasePorts": [postgres.port],
                                  "artifactStoreCIDRs": [f"{GATEWAY}/32"], "artifactStorePorts": [s3_port]},
                **placement,
            },
        }))
        _tool(real_cluster, "helm", "install", "kubeml", str(CHART), "--namespace", NAMESPACE,
              "--values", str(values), "--wait", "--timeout", "300s", timeout_s=330)
        try:
            yield Platform(core, postgres, f"s3://{bucket}/mlflow", s3_endpoint)
        finally:
            # The node is shared with later modules: the Tenants first (their finalizer is the
            # operator's), then the release with its pods, then the namespace with the Secret.
            _tool(real_cluster, "kubectl", "delete", "tenants.kubeml.io", "--all", "--wait", "--timeout=90s",
                  timeout_s=120)
            _tool(real_cluster, "helm", "uninstall", "kubeml", "--namespace", NAMESPACE, "--wait", "--timeout",
                  "120s", timeout_s=150)
            _tool(real_cluster, "kubectl", "delete", "namespace", NAMESPACE, "--wait", "--timeout=90s",
                  timeout_s=120)


def _ready_tenant(custom: k8s.CustomObjectsApi, name: str) -> dict | None:
    tenant = custom.get_cluster_custom_object("kubeml.io", "v1alpha1", "tenants", name)
    conditions = (tenant.get("status") or {}).get("conditions") or []
    return tenant if any(c["type"] == "Ready" and c["status"] == "True" for c in conditions) else None


def test_the_operator_pod_runs_ready_on_the_real_node(platform) -> None:
    pods = k8s.CoreV1Api(platform.api).list_namespaced_pod(NAMESPACE, label_selector=OPERATOR).items
    assert len(pods) == 1
    pod = pods[0]
    assert pod.spec.node_name == "real-0"
    status = pod.status.container_statuses[0]
    assert status.ready and status.started
    assert status.image_id and status.container_id.startswith("containerd://")
    # What Pod Security `restricted` asks, as a tenant namespace enforces it.
    pod_security, security = pod.spec.security_context, pod.spec.containers[0].security_context
    assert pod_security.run_as_non_root and pod_security.seccomp_profile.type == "RuntimeDefault"
    assert security.allow_privilege_escalation is False and security.capabilities.drop == ["ALL"]


def test_a_tenant_applied_with_kubectl_gets_its_namespace(real_cluster, platform, tmp_path: Path) -> None:
    manifest = tmp_path / "tenant.yaml"
    manifest.write_text(json.dumps({
        "apiVersion": "kubeml.io/v1alpha1",
        "kind": "Tenant",
        "metadata": {"name": "team-real"},
        "spec": {"owners": ["alice"], "costCenter": "cc-42"},
    }))
    _tool(real_cluster, "kubectl", "apply", "-f", str(manifest))
    custom = k8s.CustomObjectsApi(platform.api)
    tenant = wait_until(lambda: _ready_tenant(custom, "team-real"), timeout_s=90,
                        what="the Tenant Ready, reconciled by the operator pod")
    namespace = k8s.CoreV1Api(platform.api).read_namespace(tenant["status"]["namespace"])
    assert namespace.metadata.labels["pod-security.kubernetes.io/enforce"] == "restricted"
    assert namespace.metadata.labels["kubeml.io/cost-center"] == "cc-42"
    # The operator that did it is the pod: no operator process runs on the host here.
    logs = k8s.CoreV1Api(platform.api).read_namespaced_pod_log(
        k8s.CoreV1Api(platform.api).list_namespaced_pod(NAMESPACE, label_selector=OPERATOR).items[0].metadata.name, NAMESPACE)
    assert "team-real" in logs


def test_its_metrics_are_scraped(platform, tmp_path: Path) -> None:
    """After the Tenant test: an operator that has reconciled nothing exports no samples."""
    pod = k8s.CoreV1Api(platform.api).list_namespaced_pod(NAMESPACE, label_selector=OPERATOR).items[0]
    port = next(p.container_port for p in pod.spec.containers[0].ports if p.name == "metrics")
    target = ScrapeTarget(address=f"{pod.status.pod_ip}:{port}", namespace=NAMESPACE,
                          service="kubeml-kubeml-platform-operator", pod=pod.metadata.name,
                          container="operator", endpoint="metrics")
    import urllib.request

    # The host reaches the pod network directly (its replies come back over the bridge).
    with urllib.request.urlopen(f"http://{target.address}/metrics", timeout=10) as response:
        body = response.read().decode()
    with running_prometheus([target], tmp_path) as prometheus:
        prometheus.wait_scraped_after(time.time())
        names = {r["metric"]["__name__"] for r in prometheus.query('{job="kubeml-kubeml-platform-operator"}')}
        ready = prometheus.query('kubeml_operator_tenant_ready{tenant="team-real"}')
    assert "up" in names
    assert "kubeml_operator_reconciles_total" in names, (sorted(names), body[:2000])
    # The Tenant reconciled by the previous test, as the pod reports it.
    assert [r["value"][1] for r in ready] == ["1"], body[:2000]


def test_the_operators_policies_keep_tenants_apart_packet_by_packet(real_cluster, platform) -> None:
    """Two Tenants, reconciled by the operator pod: the NetworkPolicies it writes, enforced
    on the node, let a tenant's pods talk to each other and drop what another tenant's pods
    send them. Neither reaches the instance-metadata address, on any port."""
    custom, core = k8s.CustomObjectsApi(platform.api), k8s.CoreV1Api(platform.api)
    names = ("iso-a", "iso-b")
    for name in names:
        # Delete: the namespaces and their pods go with the Tenants (the node is shared).
        custom.create_cluster_custom_object("kubeml.io", "v1alpha1", "tenants", {
            "apiVersion": "kubeml.io/v1alpha1", "kind": "Tenant", "metadata": {"name": name},
            "spec": {"owners": ["alice"], "deletionPolicy": "Delete"}})
    a, b = (wait_until(lambda n=name: _ready_tenant(custom, n), timeout_s=90, what=f"Tenant {name} Ready")
            ["status"]["namespace"] for name in names)
    written = {p.metadata.name for p in k8s.NetworkingV1Api(platform.api).list_namespaced_network_policy(b).items}
    assert {"kubeml-default-deny", "kubeml-allow-same-tenant", "kubeml-allow-egress"} <= written, written

    b_ip = probes.server(core, b, "server")
    # The enforcer learns of the new pod from the same watch events; a second covers a loaded machine.
    time.sleep(1)
    before = real_cluster.node.policy_verdicts()
    phase, log = probes.run_to_end(core, b, "same-tenant", ["fetch", "-timeout", "3s", f"http://{b_ip}:8080/"])
    assert phase == "Succeeded" and log.startswith("200 server "), log
    phase, log = probes.run_to_end(core, a, "other-tenant", ["fetch", "-timeout", "3s", f"http://{b_ip}:8080/"])
    assert phase == "Failed", log
    # Dropped: the SYN gets no answer.
    assert "Client.Timeout exceeded" in log or "i/o timeout" in log, log
    after = real_cluster.node.policy_verdicts()
    assert after.get("drop", 0) > before.get("drop", 0), (before, after)
    assert after.get("accept", 0) > before.get("accept", 0), (before, after)

    # 443 is the port the tenant's egress opens to the outside (S3, ECR, STS), minus this address.
    for port in (80, 443):
        phase, log = probes.run_to_end(core, a, f"to-metadata-{port}", [
            "fetch", "-timeout", "3s", f"http://169.254.169.254:{port}/latest/meta-data/"])
        assert phase == "Failed", (port, log)
        assert any(s in log for s in ("no route to host", "Client.Timeout exceeded", "i/o timeout")), (port, log)

    for name in names:
        custom.delete_cluster_custom_object("kubeml.io", "v1alpha1", "tenants", name)
    for ns in (a, b):
        core.delete_collection_namespaced_pod(ns, grace_period_seconds=0)


def _runtime_pod(name: str, script: str, image: str) -> dict:
    """A pipeline-like pod of the runtime image running ``script``, as restricted as a tenant's."""
    return {"metadata": {"name": name}, "spec": real_node_pod_spec([{
        "name": "step", "image": image, "imagePullPolicy": "Never", "command": ["python", "-c", script],
        "securityContext": RESTRICTED_CONTAINER,
        "resources": {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"cpu": "1", "memory": "1Gi"}},
    }])}


def _finish(core: k8s.CoreV1Api, ns: str, pod: dict, timeout_s: float = 180) -> tuple[str, str]:
    name = pod["metadata"]["name"]
    core.create_namespaced_pod(ns, pod)
    done = probes.phase(core, ns, name, ("Succeeded", "Failed"), timeout_s=timeout_s)
    return done.status.phase, core.read_namespaced_pod_log(name, ns)


def test_tenant_pods_share_the_tracking_server_on_postgres(platform, runtime_image: str) -> None:
    """The chart's tracking server, from a Tenant's pods by its Service name (CoreDNS, the Host
    check, the tenant's and the server's NetworkPolicies all in the way): one pod registers a
    version and logs an artifact, another approves it, and the rows are in PostgreSQL on this
    machine, the artifact in S3."""
    custom, core = k8s.CustomObjectsApi(platform.api), k8s.CoreV1Api(platform.api)
    custom.create_cluster_custom_object("kubeml.io", "v1alpha1", "tenants", {
        "apiVersion": "kubeml.io/v1alpha1", "kind": "Tenant", "metadata": {"name": "ml-shared"},
        "spec": {"owners": ["alice"], "deletionPolicy": "Delete"}})
    ns = wait_until(lambda: _ready_tenant(custom, "ml-shared"), timeout_s=90, what="Tenant ml-shared Ready")[
        "status"]["namespace"]
    register = (
        "import mlflow\n"
        "from kubeml.registry import Registry\n"
        f"registry = Registry({MLFLOW_URL!r})\n"
        "mv = registry.register('shared-model', 's3://kubeml-artifacts/bundles/abc', metrics={'accuracy': 0.98},\n"
        "                       tags={'registered_by': 'pipeline'}, auto_approve=False)\n"
        "with mlflow.start_run(run_id=mv.run_id):\n"
        "    mlflow.log_text('from a pod', 'report.txt')\n"
        "print('registered', mv.version, mv.approval_status, mv.run_id)\n"
    )
    phase, log = _finish(core, ns, _runtime_pod("register", register, runtime_image))
    assert phase == "Succeeded", log
    (line,) = [line for line in log.splitlines() if line.startswith("registered ")]
    _, version, status, run_id = line.split()
    assert (version, status) == ("1", "pending")

    approve = (
        "from kubeml.registry import Registry\n"
        f"registry = Registry({MLFLOW_URL!r})\n"
        "registry.set_approval('shared-model', 1, 'approved', by='bob', distinct_approver=True)\n"
        "print('versions', [(v.version, v.approval_status) for v in registry.versions('shared-model')])\n"
    )
    phase, log = _finish(core, ns, _runtime_pod("approve", approve, runtime_image))
    assert phase == "Succeeded", log
    assert "versions [(1, 'approved')]" in log, log

    with platform.postgres.connect() as db:
        tags = dict(db.execute("SELECT key, value FROM model_version_tags WHERE name = 'shared-model' AND version = 1"
                               ).fetchall())
    assert tags["approval_status"] == "approved" and tags["approved_by"] == "bob"

    import boto3

    bucket, prefix = platform.artifacts.removeprefix("s3://").split("/", 1)
    s3 = boto3.client("s3", endpoint_url=platform.s3_endpoint, aws_access_key_id="testing",
                      aws_secret_access_key="testing", region_name="us-east-1")
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])]
    assert any(k.endswith(f"{run_id}/artifacts/report.txt") for k in keys), keys
    custom.delete_cluster_custom_object("kubeml.io", "v1alpha1", "tenants", "ml-shared")
