"""Authentication, RBAC and admission (PodSecurity, ResourceQuota) are enforced for real."""

from __future__ import annotations

import json

import pytest
from kubernetes.client import CoreV1Api, RbacAuthorizationV1Api
from kubernetes.client.exceptions import ApiException

from kubeml.testing.cluster.fixtures import temporary_namespace, wait_until
from tests.integration.platform_pods import platform_pods

pytestmark = pytest.mark.integration


def _pod(name: str, security: dict | None = None, pod_security: dict | None = None) -> dict:
    container = {"name": "main", "image": "busybox:1.36"}
    if security:
        container["securityContext"] = security
    return {"metadata": {"name": name}, "spec": {"containers": [container], "securityContext": pod_security or {}}}


def _message(exc: ApiException) -> str:
    return json.loads(exc.body)["message"]


def test_user_without_bindings_gets_403(cluster, namespace):
    with cluster.api_client("mallory", ["team-x"]) as client:
        with pytest.raises(ApiException) as excinfo:
            CoreV1Api(client).list_namespaced_pod(namespace)

    assert excinfo.value.status == 403
    assert 'User "mallory" cannot list resource "pods"' in _message(excinfo.value)


def test_group_binding_grants_access_in_that_namespace_only(cluster, admin, namespace):
    RbacAuthorizationV1Api(admin).create_namespaced_role_binding(namespace, {
        "metadata": {"name": "team-a-edit"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "edit"},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": "team-a"}],
    })

    with cluster.api_client("alice", ["team-a"]) as client:
        core = CoreV1Api(client)
        # RBAC caches are updated from watches: the binding takes effect within moments.
        wait_until(lambda: _can_list(core, namespace), timeout_s=10, what="the RoleBinding to apply")
        with pytest.raises(ApiException) as excinfo:
            core.list_namespaced_pod("default")
    assert excinfo.value.status == 403


def _can_list(core: CoreV1Api, namespace: str) -> bool:
    try:
        core.list_namespaced_pod(namespace)
        return True
    except ApiException as exc:
        if exc.status != 403:
            raise
        return False


@pytest.fixture
def restricted_namespace(admin):
    labels = {"pod-security.kubernetes.io/enforce": "restricted",
              "pod-security.kubernetes.io/enforce-version": "latest"}
    with temporary_namespace(admin, prefix="restricted", labels=labels) as name:
        yield name


def test_privileged_pod_is_rejected_in_a_restricted_namespace(admin, restricted_namespace):
    with pytest.raises(ApiException) as excinfo:
        CoreV1Api(admin).create_namespaced_pod(restricted_namespace, _pod("root", {"privileged": True}))

    assert excinfo.value.status == 403
    assert 'violates PodSecurity "restricted:latest"' in _message(excinfo.value)
    assert "privileged" in _message(excinfo.value)


def test_restricted_compliant_pod_is_admitted_in_a_restricted_namespace(admin, restricted_namespace):
    hardened = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
    pod_security = {"runAsNonRoot": True, "runAsUser": 1000, "seccompProfile": {"type": "RuntimeDefault"}}

    created = CoreV1Api(admin).create_namespaced_pod(
        restricted_namespace, _pod("hardened", hardened, pod_security))

    assert created.metadata.uid


def test_privileged_pod_is_admitted_where_no_policy_is_enforced(admin, namespace):
    created = CoreV1Api(admin).create_namespaced_pod(namespace, _pod("root", {"privileged": True}))

    assert created.metadata.uid


def test_resource_quota_rejects_pods_beyond_the_gpu_quota(admin, namespace):
    core = CoreV1Api(admin)
    core.create_namespaced_resource_quota(namespace, {
        "metadata": {"name": "gpus"}, "spec": {"hard": {"requests.nvidia.com/gpu": "1"}}})
    # Until the quota controller has computed usage, admission refuses every pod it covers.
    wait_until(lambda: core.read_namespaced_resource_quota("gpus", namespace).status.hard,
               timeout_s=30, what="the quota controller to compute the quota's status")
    gpu = {"limits": {"nvidia.com/gpu": "1"}}
    first = _pod("gpu-1")
    first["spec"]["containers"][0]["resources"] = gpu
    core.create_namespaced_pod(namespace, first)

    second = _pod("gpu-2")
    second["spec"]["containers"][0]["resources"] = gpu
    with pytest.raises(ApiException) as excinfo:
        core.create_namespaced_pod(namespace, second)

    assert excinfo.value.status == 403
    assert "exceeded quota: gpus" in _message(excinfo.value)


# -- the platform's own pods pass the policy tenant namespaces enforce ------------------------

@pytest.mark.parametrize("kind", ["predictor", "ray-head", "ray-worker"])
def test_platform_pods_are_admitted_in_a_restricted_namespace(admin, restricted_namespace, kind):
    pod = platform_pods(restricted_namespace)[kind]
    created = CoreV1Api(admin).create_namespaced_pod(restricted_namespace, pod, dry_run="All")
    assert created.spec.security_context.run_as_non_root is True


def test_the_same_pod_without_its_security_context_is_rejected(admin, restricted_namespace):
    """The admission check above can fail: stripped of kubeml's settings, the pod is refused."""
    pod = platform_pods(restricted_namespace)["predictor"]
    pod["spec"].pop("securityContext")
    for container in pod["spec"]["containers"]:
        container.pop("securityContext")
    with pytest.raises(ApiException) as excinfo:
        CoreV1Api(admin).create_namespaced_pod(restricted_namespace, pod, dry_run="All")
    assert 'violates PodSecurity "restricted:latest"' in _message(excinfo.value)
