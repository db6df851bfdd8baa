"""Fixtures for the tenancy tests: the platform chart installed with helm, the operator's own
credentials, and an in-process Tenant operator running with exactly the chart's RBAC.

Import the fixtures a module uses (``from tests.integration.tenancy_fixtures import ...``).
Set-up is idempotent (``helm upgrade --install``), so several modules may each ask for it.
"""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException

from kubeml.testing.cluster import find_assets
from kubeml.testing.cluster.fixtures import wait_until
from kubeml.operators import ObjectRef, OperatorConfig
from kubeml.testing.operators import running_operator

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "kubeml-platform"
RELEASE = "kubeml"
PLATFORM_NAMESPACE = "kubeml-system"
OPERATOR_SA = f"{RELEASE}-kubeml-platform"
TENANT_API = ("kubeml.io", "v1alpha1", "tenants")
# Short resync for tests: drift must be repaired within one resync, and the tests wait 3x that.
RESYNC_S = 2.0


def binary(name: str) -> str:
    return str(find_assets().binary(name))


def run_tool(cluster: Any, tool: str, *args: str, check: bool = True, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    argv = [binary(tool), f"--kubeconfig={cluster.admin_kubeconfig}", *args]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s)
    if check and result.returncode != 0:
        pytest.fail(f"`{tool} {' '.join(args)}` failed ({result.returncode}):\n{result.stderr}", pytrace=False)
    return result


def ensure_namespace(admin: Any, name: str) -> None:
    with contextlib.suppress(ApiException):
        k8s.CoreV1Api(admin).create_namespace({"metadata": {"name": name}})


@pytest.fixture(scope="session")
def platform(cluster: Any, admin: Any) -> str:
    """The chart installed as release ``kubeml`` in ``kubeml-system``; returns the namespace."""
    ensure_namespace(admin, "kubeflow")  # the dashboard links ConfigMap lives there
    run_tool(cluster, "helm", "upgrade", "--install", RELEASE, str(CHART), "--namespace", PLATFORM_NAMESPACE,
             "--create-namespace", "--set", "kubeflowDashboard.enabled=true", timeout_s=180)
    ext = k8s.ApiextensionsV1Api(admin)
    wait_until(lambda: any(c.type == "Established" and c.status == "True"
                           for c in (ext.read_custom_resource_definition("tenants.kubeml.io").status.conditions or [])),
               timeout_s=30, what="the Tenant CRD to be Established")
    return PLATFORM_NAMESPACE


def service_account_client(admin: Any, namespace: str, name: str) -> Any:
    """An ApiClient authenticated as a ServiceAccount, through a TokenRequest (1 h)."""
    token = k8s.CoreV1Api(admin).create_namespaced_service_account_token(
        name, namespace, {"spec": {"expirationSeconds": 3600}}).status.token
    base = admin.configuration
    configuration = k8s.Configuration()
    configuration.host = base.host
    configuration.ssl_ca_cert = base.ssl_ca_cert
    configuration.verify_ssl = True
    configuration.api_key = {"authorization": f"Bearer {token}"}
    configuration.connection_pool_maxsize = 32
    return k8s.ApiClient(configuration)


@pytest.fixture(scope="session")
def operator_client(admin: Any, platform: str) -> Iterator[Any]:
    """The operator's ServiceAccount credentials: the tests prove the chart's RBAC suffices."""
    with service_account_client(admin, platform, OPERATOR_SA) as api_client:
        yield api_client


@contextlib.contextmanager
def operator_running(operator_client: Any, **config: Any) -> Iterator[Any]:
    with running_operator(OperatorConfig(resync_s=RESYNC_S, **config), operator_client) as operator:
        yield operator


# --- Tenants ------------------------------------------------------------------------------------

def tenant_body(name: str, owners: list[str], members: list[dict[str, str]] | None = None, **spec: Any) -> dict:
    return {"apiVersion": "kubeml.io/v1alpha1", "kind": "Tenant", "metadata": {"name": name},
            "spec": {"owners": owners, "members": members or [], **spec}}


def create_tenant(admin: Any, body: dict) -> dict:
    return k8s.CustomObjectsApi(admin).create_cluster_custom_object(*TENANT_API, body)


def get_tenant(admin: Any, name: str) -> dict | None:
    try:
        return k8s.CustomObjectsApi(admin).get_cluster_custom_object(*TENANT_API, name)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


def ready_condition(tenant: dict | None) -> dict:
    for condition in ((tenant or {}).get("status") or {}).get("conditions") or []:
        if condition.get("type") == "Ready":
            return condition
    return {}


def wait_ready(admin: Any, name: str, *, status: str = "True", timeout_s: float = 60) -> dict:
    def check() -> dict | None:
        tenant = get_tenant(admin, name)
        condition = ready_condition(tenant)
        generation = (tenant or {}).get("metadata", {}).get("generation")
        if condition.get("status") == status and condition.get("observedGeneration") == generation:
            return tenant
        return None
    return wait_until(check, timeout_s=timeout_s, interval_s=0.2, what=f"tenant {name} Ready={status}")


def delete_tenant(admin: Any, name: str, *, wait: bool = True, timeout_s: float = 90) -> None:
    with contextlib.suppress(ApiException):
        k8s.CustomObjectsApi(admin).delete_cluster_custom_object(*TENANT_API, name)
    if wait:
        wait_until(lambda: get_tenant(admin, name) is None, timeout_s=timeout_s, what=f"tenant {name} to be deleted")


def children_of(api: Any, name: str, uid: str | None = None) -> list[ObjectRef]:
    """Objects a tenant called ``name`` (of ``uid``, if given) owns, found by listing, not by trust.

    Namespaced children are found by the tenant label inside the namespace; the Namespace and
    the Profile count only if their owner reference names the tenant (a foreign namespace
    of the same name is not a child).
    """
    def owned(obj: dict | None) -> bool:
        refs = (obj or {}).get("metadata", {}).get("ownerReferences") or []
        return any(r.get("kind") == "Tenant" and r.get("name") == name and (uid is None or r.get("uid") == uid)
                   for r in refs)

    found: list[ObjectRef] = []
    ns = api.get(ObjectRef("v1", "Namespace", name))
    if ns is not None:
        if owned(ns):
            found.append(ObjectRef("v1", "Namespace", name))
        for api_version, kind in (("v1", "ResourceQuota"), ("v1", "LimitRange"), ("v1", "ServiceAccount"),
                                  ("rbac.authorization.k8s.io/v1", "RoleBinding"),
                                  ("networking.k8s.io/v1", "NetworkPolicy")):
            for item in api.list(ObjectRef(api_version, kind, "", name), label_selector=f"kubeml.io/tenant={name}"):
                if owned(item):
                    found.append(ObjectRef(api_version, kind, item["metadata"]["name"], name))
    if owned(api.get(ObjectRef("kubeflow.org/v1", "Profile", name))):
        found.append(ObjectRef("kubeflow.org/v1", "Profile", name))
    return found


def resource_versions(api: Any, refs: list[ObjectRef]) -> dict[str, str]:
    return {str(ref): api.get(ref)["metadata"]["resourceVersion"] for ref in refs}


def now() -> float:
    return time.monotonic()
