"""Helm chart: lint, schema, and the rendered objects for the main value combinations.

Needs the ``helm`` binary of the control-plane assets (``make cluster-assets``); skipped
without it. Rendering is local: no cluster, no network.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from kubeml.testing.cluster import AssetsMissing, find_assets

REPO = Path(__file__).resolve().parents[3]
CHART = REPO / "charts" / "kubeml-platform"


@pytest.fixture(scope="module")
def helm() -> str:
    try:
        return str(find_assets().binary("helm"))
    except AssetsMissing as exc:
        pytest.skip(f"helm not built: {exc}")


def render(helm: str, *sets: str, check: bool = True) -> list[dict] | subprocess.CompletedProcess[str]:
    argv = [helm, "template", "kubeml", str(CHART), "--namespace", "kubeml-system", "--kube-version", "1.37.0"]
    for s in sets:
        argv += ["--set", s]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    if not check:
        return result
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def kinds(docs: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for doc in docs:
        out.setdefault(doc["kind"], []).append(doc)
    return out


def component(objects: list[dict], name: str) -> dict:
    """The one object of ``objects`` that belongs to ``name`` (operator, mlflow)."""
    (found,) = [o for o in objects if o["metadata"]["labels"].get("app.kubernetes.io/component") == name
                or o["metadata"]["name"].endswith(f"-{name}")]
    return found


def test_helm_lint_is_clean(helm):
    for sets in ([], ["kubeflowDashboard.enabled=true"], ["serviceMonitor.enabled=false", "rbac.create=false"]):
        argv = [helm, "lint", str(CHART), "--strict", *[a for s in sets for a in ("--set", s)]]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "[WARNING]" not in result.stdout and "[ERROR]" not in result.stdout


def test_default_values_render_the_operator_monitoring_and_roles(helm):
    by_kind = kinds(render(helm))

    assert {d["metadata"]["name"] for d in by_kind["Deployment"]} == {
        "kubeml-kubeml-platform-operator", "kubeml-kubeml-platform-mlflow"}
    assert len(by_kind["ServiceMonitor"]) == 2
    assert len(by_kind["PrometheusRule"]) == 1
    assert {r["metadata"]["name"] for r in by_kind["ClusterRole"]} == {
        "kubeml-kubeml-platform-operator", "kubeml-tenant-admin", "kubeml-tenant-editor", "kubeml-tenant-viewer"}
    dashboard = by_kind["ConfigMap"][0]
    assert json.loads(dashboard["data"]["kubeml-platform.json"])["uid"] == "kubeml-platform"
    assert "centraldashboard-config" not in {c["metadata"]["name"] for c in by_kind["ConfigMap"]}


def test_operator_pod_meets_the_restricted_pod_security_standard(helm):
    deployment = component(kinds(render(helm))["Deployment"], "operator")
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]

    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"]["type"] == "Recreate"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert container["securityContext"] == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                            "capabilities": {"drop": ["ALL"]}}
    assert container["resources"]["limits"] and container["resources"]["requests"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["image"] == "ghcr.io/kubeml/kubeml:0.1.0"


def test_operator_rbac_is_least_privilege(helm):
    role = next(r for r in kinds(render(helm))["ClusterRole"] if r["metadata"]["name"].endswith("-operator"))
    verbs = {v for rule in role["rules"] for v in rule["verbs"]}
    resources = {res for rule in role["rules"] for res in rule["resources"]}

    assert not verbs & {"escalate", "impersonate", "*"}
    assert "secrets" not in resources and "*" not in resources
    bind = [r for r in role["rules"] if "bind" in r["verbs"]]
    assert bind == [{"apiGroups": ["rbac.authorization.k8s.io"], "resources": ["clusterroles"], "verbs": ["bind"],
                     "resourceNames": ["kubeml-tenant-admin", "kubeml-tenant-editor", "kubeml-tenant-viewer"]}]


def test_tenant_roles_grant_no_escalation_and_nothing_cluster_scoped(helm):
    roles = [r for r in kinds(render(helm))["ClusterRole"] if r["metadata"]["name"].startswith("kubeml-tenant-")]
    cluster_scoped = {"namespaces", "nodes", "clusterroles", "clusterrolebindings", "persistentvolumes",
                      "customresourcedefinitions", "tenants", "profiles"}

    for role in roles:
        for rule in role["rules"]:
            assert not set(rule["verbs"]) & {"escalate", "bind", "impersonate", "*"}, role["metadata"]["name"]
            assert not set(rule["resources"]) & cluster_scoped
            assert "*" not in rule["resources"] and "*" not in rule["apiGroups"]
            assert "nonResourceURLs" not in rule
    viewer = next(r for r in roles if r["metadata"]["name"] == "kubeml-tenant-viewer")
    assert all(set(rule["verbs"]) <= {"get", "list", "watch"} for rule in viewer["rules"])
    assert not any("secrets" in rule["resources"] for rule in viewer["rules"])


def test_tenants_may_read_but_not_create_monitoring_objects(helm):
    roles = [r for r in kinds(render(helm))["ClusterRole"] if r["metadata"]["name"].startswith("kubeml-tenant-")]

    for role in roles:
        monitoring = [r for r in role["rules"] if "monitoring.coreos.com" in r["apiGroups"]]
        assert monitoring == [{"apiGroups": ["monitoring.coreos.com"], "resources": ["servicemonitors", "podmonitors"],
                               "verbs": ["get", "list", "watch"]}], role["metadata"]["name"]


POLICIES = {"kubeml-tenant-services", "kubeml-tenant-monitoring", "kubeml-tenant-sagemaker-role",
            "kubeml-operator-namespaces", "kubeml-namespace-retention"}


def test_every_admission_policy_is_bound_to_deny(helm):
    by_kind = kinds(render(helm))
    policies = {p["metadata"]["name"]: p["spec"] for p in by_kind["ValidatingAdmissionPolicy"]}
    bindings = {b["spec"]["policyName"]: b["spec"] for b in by_kind["ValidatingAdmissionPolicyBinding"]}

    assert set(policies) == set(bindings) == POLICIES
    assert all(b["validationActions"] == ["Deny"] and "matchResources" not in b for b in bindings.values())
    assert all(p["failurePolicy"] == "Fail" for p in policies.values())
    tenant_only = {"matchExpressions": [{"key": "kubeml.io/tenant", "operator": "Exists"}]}
    for name in ("kubeml-tenant-services", "kubeml-tenant-monitoring", "kubeml-tenant-sagemaker-role"):
        assert policies[name]["matchConstraints"]["namespaceSelector"] == tenant_only
    operator = policies["kubeml-operator-namespaces"]
    assert operator["matchConditions"][0]["expression"].endswith(":kubeml-kubeml-platform')")
    assert operator["matchConstraints"]["resourceRules"][0]["operations"] == ["CREATE", "UPDATE", "DELETE"]


def test_the_operator_policy_follows_the_service_account_name(helm):
    policies = kinds(render(helm, "serviceAccount.name=tenant-operator"))["ValidatingAdmissionPolicy"]
    operator = next(p for p in policies if p["metadata"]["name"] == "kubeml-operator-namespaces")

    assert operator["spec"]["matchConditions"][0]["expression"].endswith(":tenant-operator')")


def test_network_flows_are_operator_flags(helm):
    def args(*sets: str) -> list[str]:
        return component(kinds(render(helm, *sets))["Deployment"], "operator")["spec"]["template"]["spec"][
            "containers"][0]["args"]

    external = args("mlflow.enabled=false", "operator.peers.kafka.namespace=", "operator.peers.mlflow.namespace=tracking",
                    "operator.peers.mlflow.ports={80,5000}", "operator.metricsPorts={8080,9091}")
    defaults = args()

    assert {"--kafka-peer=none", "--mlflow-peer=tracking:80,5000", "--metrics-ports=8080,9091"} <= set(external)
    # The chart's own tracking server: tenants reach it in the release namespace, on its port.
    assert {"--serving-ports=8080,8081,8012", "--kuberay-peer=kubeflow:8265", "--mlflow-peer=kubeml-system:5000",
            "--kafka-peer=kafka:9092", "--pipelines-peer=kubeflow:8887,8888,8080"} <= set(defaults)
    assert "--mlflow-peer=kubeml-system:5100" in args("mlflow.port=5100")
    assert "--mlflow-peer=none" in args("mlflow.enabled=false", "operator.peers.mlflow.namespace=")
    # The overlays patch args by index: the existing flags keep their places.
    assert defaults[0].startswith("--resync-seconds=") and defaults[7].startswith("--log-level=")


def test_the_operator_pod_may_only_be_scraped_and_only_reach_the_api_and_dns(helm):
    policy = component(kinds(render(helm, "operator.monitoringNamespace=prom", "operator.metricsPort=9191",
                                    "networkPolicy.apiServerCIDRs={10.0.0.0/16}"))["NetworkPolicy"], "operator")
    deployment = component(kinds(render(helm))["Deployment"], "operator")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
    (ingress,) = policy["spec"]["ingress"]
    assert ingress == {"from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "prom"}}}],
                       "ports": [{"protocol": "TCP", "port": 9191}]}
    api, dns = policy["spec"]["egress"]
    assert api == {"to": [{"ipBlock": {"cidr": "10.0.0.0/16"}}],
                   "ports": [{"protocol": "TCP", "port": 443}, {"protocol": "TCP", "port": 6443}]}
    assert dns["to"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
                          "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}]
    assert sorted(p["protocol"] for p in dns["ports"]) == ["TCP", "UDP"]
    bad = render(helm, "networkPolicy.apiServerCIDRs={10.0.0.0}", check=False)
    assert bad.returncode != 0 and "apiServerCIDRs" in bad.stderr


@pytest.mark.parametrize("sets,absent", [
    (["admissionPolicies.enabled=false"], "ValidatingAdmissionPolicy"),
    (["networkPolicy.enabled=false"], "NetworkPolicy"),
    (["serviceMonitor.enabled=false", "modelServers.serviceMonitor.enabled=false"], "ServiceMonitor"),
    (["prometheusRule.enabled=false"], "PrometheusRule"),
    (["rbac.create=false"], "ClusterRoleBinding"),
    (["serviceAccount.create=false", "mlflow.serviceAccount.create=false"], "ServiceAccount"),
    (["mlflow.persistence.enabled=false"], "PersistentVolumeClaim"),
    (["mlflow.backendStore.existingSecret=mlflow-db"], "PersistentVolumeClaim"),
])
def test_optional_parts_can_be_switched_off(helm, sets, absent):
    assert absent not in kinds(render(helm, *sets))


def test_kubeflow_links_and_operator_flags_follow_values(helm):
    docs = render(helm, "kubeflowDashboard.enabled=true", "operator.kubeflowProfiles=false",
                  "operator.resyncSeconds=30", "operator.podSecurityVersion=v1.31", "image.tag=abc")
    by_kind = kinds(docs)
    links = next(c for c in by_kind["ConfigMap"] if c["metadata"]["name"] == "centraldashboard-config")
    operator = component(by_kind["Deployment"], "operator")
    args = operator["spec"]["template"]["spec"]["containers"][0]["args"]
    operator_role = next(r for r in by_kind["ClusterRole"] if r["metadata"]["name"].endswith("-operator"))

    assert links["metadata"]["namespace"] == "kubeflow"
    assert {m["text"] for m in json.loads(links["data"]["links"])["menuLinks"]} >= {"Models", "Monitoring"}
    assert {"--no-kubeflow-profiles", "--resync-seconds=30", "--pod-security-version=v1.31"} <= set(args)
    assert not any("profiles" in r["resources"] for r in operator_role["rules"])
    assert operator["spec"]["template"]["spec"]["containers"][0]["image"].endswith(":abc")


@pytest.mark.parametrize("bad", ["unknown=1", "operator.bogus=1", "replicaCount=2", "operator.logLevel=LOUD",
                                 "operator.podSecurityVersion=1.30", "serviceMonitor.interval=soon",
                                 "operator.peers.kafka.ports={0}", "operator.peers.mlflow.namespace=Bad_NS",
                                 "operator.servingPorts={}", "operator.peers.bogus.namespace=x",
                                 "mlflow.port=0", "mlflow.workers=0", "mlflow.persistence.size=lots",
                                 "mlflow.artifacts.destination=gs://bucket", "mlflow.bogus=1",
                                 "mlflow.backendStore.existingSecret=Not_A_Name"])
def test_values_schema_rejects_unknown_keys_and_bad_values(helm, bad):
    result = render(helm, bad, check=False)

    assert result.returncode != 0
    assert "values don't meet the specifications of the schema" in result.stderr or "schema" in result.stderr


def test_every_value_is_documented():
    """helm-docs style: every leaf key has a ``# --`` comment, or sits in a documented map."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    stack: list[tuple[int, bool]] = []  # (indent, documented) of the enclosing keys
    undocumented = []
    for i, line in enumerate(lines):
        stripped = line.strip()
        if not stripped or stripped.startswith(("#", "-")) or ":" not in stripped:
            continue
        indent = len(line) - len(line.lstrip())
        while stack and stack[-1][0] >= indent:
            stack.pop()
        j = i - 1
        while j >= 0 and lines[j].strip().startswith("#") and not lines[j].strip().startswith("# --"):
            j -= 1
        documented = j >= 0 and lines[j].strip().startswith("# --")
        inherited = any(d for _, d in stack)
        is_heading = stripped.endswith(":")
        if not is_heading and not documented and not inherited:
            undocumented.append(stripped)
        stack.append((indent, documented or inherited))
    assert not undocumented, undocumented


def _mlflow(helm, *sets: str) -> tuple[dict, dict]:
    """The tracking server's Deployment and its container."""
    deployment = component(kinds(render(helm, *sets))["Deployment"], "mlflow")
    return deployment, deployment["spec"]["template"]["spec"]["containers"][0]


def test_the_tracking_server_runs_restricted_on_sqlite_on_a_kept_volume_by_default(helm):
    by_kind = kinds(render(helm))
    deployment, container = _mlflow(helm)
    pod = deployment["spec"]["template"]["spec"]
    env = {e["name"]: e for e in container["env"]}

    assert container["command"] == ["mlflow", "server"]
    assert container["image"] == "ghcr.io/kubeml/kubeml-python:0.1.0"
    assert {"--host=0.0.0.0", "--port=5000", "--serve-artifacts",
            "--artifacts-destination=s3://kubeml-artifacts/mlflow"} <= set(container["args"])
    assert env["MLFLOW_BACKEND_STORE_URI"]["value"] == "sqlite:////data/mlflow.db"
    # One SQLite writer: one replica, and the old pod is gone before the new one starts.
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"]["type"] == "Recreate"
    claim = component(by_kind["PersistentVolumeClaim"], "mlflow")
    assert claim["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert {"name": "data", "persistentVolumeClaim": {"claimName": claim["metadata"]["name"]}} in pod["volumes"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert container["securityContext"] == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                            "capabilities": {"drop": ["ALL"]}}
    assert pod["automountServiceAccountToken"] is False
    # Both paths are exempt from MLflow's Host check (the kubelet probes by pod IP).
    assert {container[p]["httpGet"]["path"] for p in ("startupProbe", "livenessProbe", "readinessProbe")} == {
        "/health", "/version"}
    service = component(by_kind["Service"], "mlflow")
    assert service["spec"]["ports"] == [{"name": "http", "port": 5000, "targetPort": "http", "protocol": "TCP"}]


def test_the_tracking_server_answers_only_its_service_names(helm):
    _, container = _mlflow(helm, "mlflow.allowedHosts={mlflow.example.com}")
    hosts = next(e["value"] for e in container["env"] if e["name"] == "MLFLOW_SERVER_ALLOWED_HOSTS").split(",")

    svc = "kubeml-kubeml-platform-mlflow"
    for name in (svc, f"{svc}.kubeml-system", f"{svc}.kubeml-system.svc", f"{svc}.kubeml-system.svc.cluster.local"):
        assert name in hosts and f"{name}:*" in hosts
    assert "mlflow.example.com" in hosts
    assert "*" not in hosts and not any(h.startswith(("10.", "192.168.")) for h in hosts)


def test_a_shared_database_comes_from_a_secret_and_allows_replicas(helm):
    by_kind = kinds(render(helm, "mlflow.backendStore.existingSecret=mlflow-db", "mlflow.replicaCount=2"))
    deployment = component(by_kind["Deployment"], "mlflow")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    uri = next(e for e in container["env"] if e["name"] == "MLFLOW_BACKEND_STORE_URI")

    assert uri == {"name": "MLFLOW_BACKEND_STORE_URI",
                   "valueFrom": {"secretKeyRef": {"name": "mlflow-db", "key": "uri"}}}
    assert deployment["spec"]["replicas"] == 2 and "strategy" not in deployment["spec"]
    assert {"name": "data", "emptyDir": {"sizeLimit": "5Gi"}} in deployment["spec"]["template"]["spec"]["volumes"]
    policy = component(by_kind["NetworkPolicy"], "mlflow")
    assert {"to": [{"ipBlock": {"cidr": "0.0.0.0/0"}}], "ports": [{"protocol": "TCP", "port": 5432}]} in policy["spec"]["egress"]


def test_bad_tracking_server_values_are_refused_with_the_reason(helm):
    replicas = render(helm, "mlflow.replicaCount=2", check=False)
    assert replicas.returncode != 0 and "mlflow.backendStore.existingSecret" in replicas.stderr
    relative = render(helm, "mlflow.artifacts.destination=artifacts", check=False)
    assert relative.returncode != 0 and "/mlflow/artifacts/destination" in relative.stderr


def test_the_tracking_server_is_reached_only_from_tenants_and_the_platform(helm):
    policy = component(kinds(render(helm))["NetworkPolicy"], "mlflow")
    (ingress,) = policy["spec"]["ingress"]
    egress = policy["spec"]["egress"]

    assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
    assert ingress["ports"] == [{"protocol": "TCP", "port": 5000}]
    assert {"namespaceSelector": {"matchExpressions": [{"key": "kubeml.io/tenant", "operator": "Exists"}]}} in ingress["from"]
    assert {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kubeml-system"}}} in ingress["from"]
    # S3 over HTTPS, never the instance-metadata address; no database rule on SQLite.
    s3 = [rule for rule in egress if rule["ports"] == [{"protocol": "TCP", "port": 443}]]
    assert s3 == [{"to": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": ["169.254.169.254/32"]}}],
                   "ports": [{"protocol": "TCP", "port": 443}]}]
    assert not any(p["port"] == 5432 for rule in egress for p in rule["ports"])


def test_the_tracking_server_can_be_left_out(helm):
    by_kind = kinds(render(helm, "mlflow.enabled=false"))
    assert not [o for objects in by_kind.values() for o in objects if "mlflow" in o["metadata"]["name"]]
