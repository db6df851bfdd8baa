"""Tenant isolation, enforced by the real apiserver's RBAC, acting as the member users.

Three tenants; every member asks the apiserver (SelfSubjectAccessReview, and real requests
for a sample) about {get, list, create, delete} x seven resource kinds in every tenant's
namespace. Own-tenant cells must match the member's role; every cross-tenant cell is denied.
"""

from __future__ import annotations

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

TENANTS = {
    "team-a": tenant_body("team-a", ["alice"], [{"name": "bob", "role": "editor"}, {"name": "vic", "role": "viewer"}],
                          costCenter="cc-100", iamRoleArn="arn:aws:iam::123456789012:role/team-a"),
    "team-b": tenant_body("team-b", ["carol"]),
    "team-c": tenant_body("team-c", ["dave"], [{"name": "erin", "role": "viewer"}],
                          quota={"cpu": "4", "memory": "8Gi", "nvidia.com/gpu": 8, "pods": 20}),
}
# user -> (tenant, role)
MEMBERSHIP = {"alice": ("team-a", "admin"), "bob": ("team-a", "editor"), "vic": ("team-a", "viewer"),
              "carol": ("team-b", "admin"), "dave": ("team-c", "admin"), "erin": ("team-c", "viewer")}
RESOURCES = {"pods": "", "secrets": "", "configmaps": "", "serviceaccounts": "",
             "rolebindings": "rbac.authorization.k8s.io", "inferenceservices": "serving.kserve.io",
             "rayjobs": "ray.io"}
VERBS = ("get", "list", "create", "delete")


def granted(role: str, verb: str, resource: str) -> bool:
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

    assert cells == len(MEMBERSHIP) * 3 * 4 * 7
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
