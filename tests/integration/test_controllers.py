"""kube-controller-manager runs for real: namespace deletion and garbage collection."""

from __future__ import annotations

import secrets

import pytest
from kubernetes.client import AppsV1Api, CoreV1Api, CustomObjectsApi
from kubernetes.client.exceptions import ApiException

from kubeml.testing.cluster.fixtures import wait_until

pytestmark = pytest.mark.integration


def _gone(read) -> bool:
    try:
        read()
    except ApiException as exc:
        if exc.status == 404:
            return True
        raise
    return False


def test_deleting_a_namespace_removes_everything_in_it(admin):
    core, apps, custom = CoreV1Api(admin), AppsV1Api(admin), CustomObjectsApi(admin)
    name = f"doomed-{secrets.token_hex(3)}"
    core.create_namespace({"metadata": {"name": name}})
    wait_until(lambda: not _gone(lambda: core.read_namespaced_service_account("default", name)),
               what="the default ServiceAccount")
    core.create_namespaced_config_map(name, {"metadata": {"name": "settings"}, "data": {"k": "v"}})
    apps.create_namespaced_deployment(name, {
        "metadata": {"name": "web"},
        "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "web"}},
                 "template": {"metadata": {"labels": {"app": "web"}},
                              "spec": {"containers": [{"name": "main", "image": "busybox:1.36"}]}}},
    })
    custom.create_namespaced_custom_object("monitoring.coreos.com", "v1", name, "servicemonitors", {
        "apiVersion": "monitoring.coreos.com/v1", "kind": "ServiceMonitor", "metadata": {"name": "web"},
        "spec": {"selector": {"matchLabels": {"app": "web"}}, "endpoints": [{"port": "metrics"}]},
    })
    wait_until(lambda: len(core.list_namespaced_pod(name).items) == 2, what="the Deployment's pods")

    core.delete_namespace(name)

    wait_until(lambda: _gone(lambda: core.read_namespace(name)), timeout_s=90,
               what="the namespace controller to finish deleting the namespace")
    assert _gone(lambda: core.read_namespaced_config_map("settings", name))
    assert core.list_pod_for_all_namespaces(field_selector=f"metadata.namespace={name}").items == []
    assert custom.list_cluster_custom_object("monitoring.coreos.com", "v1", "servicemonitors",
                                             field_selector=f"metadata.namespace={name}")["items"] == []


def test_deleting_a_deployment_garbage_collects_its_replicasets_and_pods(admin, namespace):
    core, apps = CoreV1Api(admin), AppsV1Api(admin)
    apps.create_namespaced_deployment(namespace, {
        "metadata": {"name": "api"},
        "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "api"}},
                 "template": {"metadata": {"labels": {"app": "api"}},
                              "spec": {"containers": [{"name": "main", "image": "busybox:1.36"}]}}},
    })
    wait_until(lambda: len(core.list_namespaced_pod(namespace).items) == 2, what="2 pods")

    apps.delete_namespaced_deployment("api", namespace, propagation_policy="Background")

    wait_until(lambda: not apps.list_namespaced_replica_set(namespace).items, timeout_s=60,
               what="the garbage collector to delete the ReplicaSet")
    wait_until(lambda: not core.list_namespaced_pod(namespace).items, timeout_s=60,
               what="the garbage collector to delete the pods")
