"""Tenant isolation, enforced by the real apiserver's RBAC and admission, acting as the member users.

Three tenants; every member asks the apiserver (SelfSubjectAccessReview, and real requests
for a sample) about {get, list, create, delete} x eight resource kinds in every tenant's
namespace. Own-tenant cells must match the member's role; every cross-tenant cell is denied.
Then what RBAC cannot say, which the chart's ValidatingAdmissionPolicies refuse: Services
with externalIPs or of type LoadBalancer/NodePort, ServiceMonitors, SageMaker TrainingJobs
with a role other than the tenant's; each next to the allowed counterpart.
"""

from __future__ import annotations

import json
import itertools
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException

from kubeml.testing.cluster.fixtures import wait_until
from tests.integration.tenancy_fixtures import (
    RESYNC_S,
    delete_tenant,
    create_tenant,
    operator_client,  # noqa: F401 (fixture)
    operator_running,
    platform,  # noqa: F401 (fixture)
    run_tool,
    tenant_body,
    wait_ready,
)

pytestmark = pytest.mark.integration

TEAM_A_ROLE = "arn:aws:iam::123456789012:role/team-a"
TENANTS = {
    "team-a": tenant_body("team-a", ["alice"], [{"name": "bob", "role": "editor"}, {"name": "vic", "role": "viewer"}],
                          costCenter="cc-100", iamRoleArn=TEAM_A_ROLE, deletionPolicy="Delete"),
    "team-b": tenant_body("team-b", ["carol"], deletionPolicy="Delete"),
    "team-c": tenant_body("team-c", ["dave"], [{"name": "erin", "role": "viewer"}], deletionPolicy="Delete",
                          quota={"cpu": "4", "memory": "8Gi", "nvidia.com/gpu": 8, "pods": 20}),
}
# user -> (tenant, role)
MEMBERSHIP = {"alice": ("team-a", "admin"), "bob": ("team-a", "editor"), "vic": ("team-a", "viewer"),
              "carol": ("team-b", "admin"), "dave": ("team-c", "admin"), "erin": ("team-c", "viewer")}
RESOURCES = {"pods": "", "secrets": "", "configmaps": "", "serviceaccounts": "",
             "rolebindings": "rbac.authorization.k8s.io", "inferenceservices": "serving.kserve.io",
             "rayjobs": "ray.io", "servicemonitors": "monitoring.coreos.com"}
VERBS = ("get", "list", "create", "delete")


def granted(role: str, verb: str, resource: str) -> bool:
    if resource == "servicemonitors":
        # Read-only for every role: the platform scrapes tenants, tenants do not shape it.
        return verb in ("get", "list")
    if role == "admin":
        return True
    if resource == "rolebindings":
        return False
    if role == "editor":
        return True
    return verb in ("get", "list") and resource != "secrets"


@pytest.fixture(scope="module")
def tenants(admin: Any, operator_client: Any) -> Iterator[Any]:  # noqa: F811
    with operator_running(operator_client) as operator:
        for body in TENANTS.values():
            create_tenant(admin, body)
        for name in TENANTS:
            wait_ready(admin, name)
        yield operator
        for name in TENANTS:
            delete_tenant(admin, name, wait=False)
        for name in TENANTS:
            delete_tenant(admin, name)


@pytest.fixture(scope="module")
def users(cluster: Any) -> Iterator[dict[str, Any]]:
    clients = {user: cluster.api_client(user) for user in MEMBERSHIP}
    yield clients
    for c in clients.values():
        c.close()


def allowed(user_client: Any, namespace: str, verb: str, resource: str) -> bool:
    review = k8s.AuthorizationV1Api(user_client).create_self_subject_access_review({
        "spec": {"resourceAttributes": {"namespace": namespace, "verb": verb, "group": RESOURCES[resource],
                                        "resource": resource}}})
    return bool(review.status.allowed)


def test_every_cross_tenant_cell_is_denied_and_every_granted_cell_allowed(tenants, users):
    wrong = []
    cells = 0
    for user, namespace, verb, resource in itertools.product(MEMBERSHIP, TENANTS, VERBS, RESOURCES):
        own_tenant, role = MEMBERSHIP[user]
        expected = namespace == own_tenant and granted(role, verb, resource)
        cells += 1
        if allowed(users[user], namespace, verb, resource) != expected:
            wrong.append(f"{user} ({role} of {own_tenant}) {verb} {resource} in {namespace}: expected "
                         f"{'allowed' if expected else 'denied'}")

    assert cells == len(MEMBERSHIP) * 3 * 4 * 8
    assert not wrong, "\n".join(wrong)


def test_real_requests_agree_with_the_access_reviews(tenants, users):
    for user, namespace in itertools.product(MEMBERSHIP, TENANTS):
        core = k8s.CoreV1Api(users[user])
        own = MEMBERSHIP[user][0] == namespace
        try:
            core.list_namespaced_pod(namespace)
            outcome = "allowed"
        except ApiException as exc:
            assert exc.status == 403, exc
            outcome = "denied"
        assert outcome == ("allowed" if own else "denied"), f"{user} list pods in {namespace}"


def test_kubectl_auth_can_i_as_alice(cluster, tenants):
    other = run_tool(cluster, "kubectl", "auth", "can-i", "list", "pods", "-n", "team-b", "--as", "alice", check=False)
    own = run_tool(cluster, "kubectl", "auth", "can-i", "list", "pods", "-n", "team-a", "--as", "alice", check=False)

    assert (other.stdout.strip(), other.returncode) == ("no", 1)
    assert (own.stdout.strip(), own.returncode) == ("yes", 0)


def test_a_tenant_member_can_run_a_restricted_pod_and_not_a_privileged_one(tenants, users):
    core = k8s.CoreV1Api(users["bob"])
    hardened = {"metadata": {"name": "train"}, "spec": {
        "serviceAccountName": "kubeml-workload",
        "securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [{"name": "main", "image": "python:3.11-slim",
                        "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}}]}}
    created = core.create_namespaced_pod("team-a", hardened)
    # The LimitRange filled in requests, so the ResourceQuota admitted the pod.
    assert created.spec.containers[0].resources.requests == {"cpu": "100m", "memory": "256Mi"}

    privileged = {"metadata": {"name": "root"}, "spec": {"containers": [
        {"name": "main", "image": "busybox:1.36", "securityContext": {"privileged": True}}]}}
    with pytest.raises(ApiException) as excinfo:
        core.create_namespaced_pod("team-a", privileged)
    assert excinfo.value.status == 403
    assert "violates PodSecurity" in excinfo.value.body


def _create_rbac(user_client: Any, kind: str, namespace: str, body: dict) -> int:
    rbac = k8s.RbacAuthorizationV1Api(user_client)
    try:
        if kind == "Role":
            rbac.create_namespaced_role(namespace, body)
        elif kind == "RoleBinding":
            rbac.create_namespaced_role_binding(namespace, body)
        else:
            rbac.create_cluster_role_binding(body)
        return 201
    except ApiException as exc:
        return exc.status


def _binding(name: str, role_kind: str, role: str, user: str) -> dict:
    return {"metadata": {"name": name},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": role_kind, "name": role},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}]}


@pytest.mark.parametrize("kind,body", [
    ("RoleBinding", _binding("grab-admin", "ClusterRole", "cluster-admin", "alice")),
    ("RoleBinding", _binding("grab-k8s-admin", "ClusterRole", "admin", "alice")),
    ("ClusterRoleBinding", _binding("grab-cluster", "ClusterRole", "cluster-admin", "alice")),
    ("Role", {"metadata": {"name": "escalator"}, "rules": [
        {"apiGroups": ["rbac.authorization.k8s.io"], "resources": ["roles"], "verbs": ["escalate", "bind"]}]}),
    ("Role", {"metadata": {"name": "impersonator"}, "rules": [
        {"apiGroups": [""], "resources": ["users", "groups"], "verbs": ["impersonate"]}]}),
    ("Role", {"metadata": {"name": "everything"}, "rules": [{"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]}]}),
], ids=["bind-cluster-admin", "bind-admin", "cluster-role-binding", "escalate-verbs", "impersonate", "wildcard"])
def test_a_tenant_admin_cannot_escalate(tenants, users, kind, body):
    assert _create_rbac(users["alice"], kind, "team-a", body) == 403


def test_a_tenant_admin_can_share_their_own_role_inside_their_namespace_only(tenants, users):
    share = _binding("share-with-frank", "ClusterRole", "kubeml-tenant-editor", "frank")

    assert _create_rbac(users["alice"], "RoleBinding", "team-a", share) == 201
    assert _create_rbac(users["alice"], "RoleBinding", "team-b", share) == 403


def test_a_managed_role_binding_edited_by_a_tenant_admin_is_repaired(tenants, users, admin):
    rbac_alice = k8s.RbacAuthorizationV1Api(users["alice"])
    rbac_alice.patch_namespaced_role_binding("kubeml-tenant-viewer", "team-a", {"subjects": [
        {"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "vic"},
        {"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "mallory"}]})

    def repaired() -> bool:
        live = k8s.RbacAuthorizationV1Api(admin).read_namespaced_role_binding("kubeml-tenant-viewer", "team-a")
        return [s.name for s in live.subjects or []] == ["vic"]

    wait_until(repaired, timeout_s=3 * RESYNC_S + 5, what="the viewer RoleBinding to be repaired")


# --- what RBAC cannot say: the admission policies ---------------------------------------------

def _service(name: str, **spec: Any) -> dict:
    return {"metadata": {"name": name}, "spec": {"selector": {"app": name}, "ports": [{"port": 8080}], **spec}}


def _denied(call: Any) -> str:
    """The apiserver's message for a request that must be refused with 403."""
    with pytest.raises(ApiException) as excinfo:
        call()
    assert excinfo.value.status == 403, excinfo.value.body
    return json.loads(excinfo.value.body)["message"]


@pytest.mark.parametrize("name,spec,policy,message", [
    ("hijack", {"externalIPs": ["10.0.0.10"]}, "kubeml-tenant-services", "may not set spec.externalIPs (CVE-2020-8554)"),
    ("lb", {"type": "LoadBalancer"}, "kubeml-tenant-services", "Services of type LoadBalancer are not allowed"),
    ("np", {"type": "NodePort"}, "kubeml-tenant-services", "Services of type NodePort are not allowed"),
], ids=["externalIPs", "LoadBalancer", "NodePort"])
def test_a_tenant_editor_cannot_expose_a_service_outside_the_gateway(tenants, users, name, spec, policy, message):
    core = k8s.CoreV1Api(users["bob"])

    body = _denied(lambda: core.create_namespaced_service("team-a", _service(name, **spec)))

    assert f"ValidatingAdmissionPolicy '{policy}'" in body and message in body


def test_a_tenant_editor_creates_a_cluster_ip_service_and_cannot_turn_it_into_a_node_port(tenants, users):
    core = k8s.CoreV1Api(users["bob"])
    created = core.create_namespaced_service("team-a", _service("predictor"))
    try:
        assert created.spec.type == "ClusterIP"
        body = _denied(lambda: core.patch_namespaced_service("predictor", "team-a", {"spec": {"type": "NodePort"}}))
        assert "Services of type NodePort are not allowed" in body
    finally:
        core.delete_namespaced_service("predictor", "team-a")


def test_the_service_policy_holds_only_in_tenant_namespaces(admin, tenants, namespace):
    created = k8s.CoreV1Api(admin).create_namespaced_service(namespace, _service("np", type="NodePort"),
                                                             dry_run="All")

    assert created.spec.type == "NodePort"


SERVICE_MONITOR = {"apiVersion": "monitoring.coreos.com/v1", "kind": "ServiceMonitor", "metadata": {"name": "forge"},
                   "spec": {"selector": {"matchLabels": {"app": "digits"}}, "endpoints": [{"port": "http"}]}}


def test_no_one_creates_a_service_monitor_in_a_tenant_namespace(tenants, users, admin):
    def create(client: Any) -> Any:
        return k8s.CustomObjectsApi(client).create_namespaced_custom_object(
            "monitoring.coreos.com", "v1", "team-a", "servicemonitors", SERVICE_MONITOR)

    # The tenant's own roles do not grant it (RBAC) ...
    assert 'cannot create resource "servicemonitors"' in _denied(lambda: create(users["alice"]))
    assert 'cannot create resource "servicemonitors"' in _denied(lambda: create(users["bob"]))
    # ... and the policy refuses it whoever asks, even a cluster administrator or a binding
    # that another system (the Kubeflow Profile) adds to the namespace.
    body = _denied(lambda: create(admin))
    assert "ValidatingAdmissionPolicy 'kubeml-tenant-monitoring'" in body
    assert "ServiceMonitor objects are not allowed in tenant namespaces" in body


def _training_job(name: str, role: str) -> dict:
    return {"apiVersion": "sagemaker.services.k8s.aws/v1alpha1", "kind": "TrainingJob", "metadata": {"name": name},
            "spec": {"trainingJobName": name, "roleARN": role,
                     "algorithmSpecification": {"trainingImage": "123456789012.dkr.ecr.us-east-1.amazonaws.com/t:1",
                                                "trainingInputMode": "File"},
                     "outputDataConfig": {"s3OutputPath": "s3://kubeml-artifacts/team-a/"},
                     "resourceConfig": {"instanceCount": 1, "instanceType": "ml.p4d.24xlarge", "volumeSizeInGB": 100},
                     "stoppingCondition": {"maxRuntimeInSeconds": 3600}}}


def _create_training_job(client: Any, namespace: str, body: dict) -> Any:
    return k8s.CustomObjectsApi(client).create_namespaced_custom_object(
        "sagemaker.services.k8s.aws", "v1alpha1", namespace, "trainingjobs", body)


def test_a_training_job_runs_only_as_the_tenants_own_role(tenants, users):
    custom = k8s.CustomObjectsApi(users["bob"])
    foreign = "arn:aws:iam::123456789012:role/platform-admin"

    body = _denied(lambda: _create_training_job(users["bob"], "team-a", _training_job("steal", foreign)))
    assert "ValidatingAdmissionPolicy 'kubeml-tenant-sagemaker-role'" in body
    assert f"TrainingJob spec.roleARN must be the tenant role {TEAM_A_ROLE}" in body

    created = _create_training_job(users["bob"], "team-a", _training_job("own", TEAM_A_ROLE))
    try:
        assert created["spec"]["roleARN"] == TEAM_A_ROLE
        body = _denied(lambda: custom.patch_namespaced_custom_object(
            "sagemaker.services.k8s.aws", "v1alpha1", "team-a", "trainingjobs", "own", {"spec": {"roleARN": foreign}}))
        assert "must be the tenant role" in body
    finally:
        custom.delete_namespaced_custom_object("sagemaker.services.k8s.aws", "v1alpha1", "team-a", "trainingjobs", "own")


def test_a_tenant_without_a_role_runs_no_training_job(tenants, users):
    body = _denied(lambda: _create_training_job(users["carol"], "team-b",
                                                _training_job("any", "arn:aws:iam::123456789012:role/team-a")))

    assert "tenant team-b has no IAM role" in body
