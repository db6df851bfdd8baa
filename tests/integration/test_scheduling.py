"""The scheduler, taints and kwok nodes behave like an EKS cluster with a p4d GPU node group."""

from __future__ import annotations

import pytest
from kubernetes.client import AppsV1Api, CoreV1Api

from kubeml.testing.cluster.fixtures import wait_until

pytestmark = pytest.mark.integration

GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}


def _deployment(name: str, *, replicas: int, resources: dict, tolerations: list | None = None,
                node_selector: dict | None = None) -> dict:
    labels = {"app": name}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "containers": [{"name": "main", "image": "busybox:1.36", "resources": resources}],
                    "tolerations": tolerations or [],
                    "nodeSelector": node_selector or {},
                },
            },
        },
    }


def _running_pods(core: CoreV1Api, namespace: str, app: str, count: int):
    pods = core.list_namespaced_pod(namespace, label_selector=f"app={app}").items
    running = [p for p in pods if p.status.phase == "Running"]
    return running if len(running) == count else None


def _node(core: CoreV1Api, name: str):
    return core.read_node(name)


@pytest.fixture(scope="module")
def gpu_nodes(admin) -> set[str]:
    """Names of nodes advertising nvidia.com/gpu; skips the test on a cluster without any."""
    nodes = CoreV1Api(admin).list_node().items
    names = {n.metadata.name for n in nodes if int((n.status.allocatable or {}).get("nvidia.com/gpu", "0")) > 0}
    if not names:
        pytest.skip("the cluster has no node advertising nvidia.com/gpu")
    return names


def test_gpu_deployment_with_toleration_lands_on_gpu_node_and_runs(admin, namespace, gpu_nodes):
    apps, core = AppsV1Api(admin), CoreV1Api(admin)
    gpu = {"requests": {"cpu": "1", "nvidia.com/gpu": "8"}, "limits": {"nvidia.com/gpu": "8"}}
    apps.create_namespaced_deployment(
        namespace, _deployment("trainer", replicas=1, resources=gpu, tolerations=[GPU_TOLERATION]))

    pods = wait_until(lambda: _running_pods(core, namespace, "trainer", 1),
                      timeout_s=60, what="the GPU pod to reach Running")

    assert pods[0].spec.node_name in gpu_nodes
    assert _node(core, pods[0].spec.node_name).status.allocatable["nvidia.com/gpu"] == "8"
    assert pods[0].status.pod_ip  # kwok assigns one from the pod CIDR, as a CNI would
    wait_until(lambda: apps.read_namespaced_deployment(namespace=namespace, name="trainer").status.available_replicas == 1,
               timeout_s=30, what="the Deployment to report 1 available replica")


def test_deployment_without_toleration_never_lands_on_gpu_node(admin, namespace, gpu_nodes):
    apps, core = AppsV1Api(admin), CoreV1Api(admin)
    # Six small replicas: without the taint the scheduler's spreading would put some of
    # them on the two (much larger) GPU nodes.
    apps.create_namespaced_deployment(
        namespace, _deployment("web", replicas=6, resources={"requests": {"cpu": "100m"}}))

    pods = wait_until(lambda: _running_pods(core, namespace, "web", 6),
                      timeout_s=60, what="6 CPU pods to reach Running")

    assert not {p.spec.node_name for p in pods} & gpu_nodes


def test_gpu_pod_without_toleration_stays_pending_with_a_reason(admin, namespace, gpu_nodes):
    core = CoreV1Api(admin)
    core.create_namespaced_pod(namespace, {
        "metadata": {"name": "no-toleration"},
        "spec": {"containers": [{"name": "main", "image": "busybox:1.36",
                                 "resources": {"limits": {"nvidia.com/gpu": "1"}}}]},
    })

    def unschedulable():
        pod = core.read_namespaced_pod("no-toleration", namespace)
        for condition in pod.status.conditions or []:
            if condition.type == "PodScheduled" and condition.reason == "Unschedulable":
                return condition
        return None

    condition = wait_until(unschedulable, timeout_s=30, what="the scheduler to give up on the pod")
    assert "nvidia.com/gpu" in condition.message
    assert core.read_namespaced_pod("no-toleration", namespace).spec.node_name is None


def test_spot_node_selector_picks_the_spot_gpu_group(admin, namespace, gpu_nodes):
    apps, core = AppsV1Api(admin), CoreV1Api(admin)
    gpu = {"limits": {"nvidia.com/gpu": "1"}}
    apps.create_namespaced_deployment(namespace, _deployment(
        "spot", replicas=1, resources=gpu, tolerations=[GPU_TOLERATION],
        node_selector={"karpenter.sh/capacity-type": "spot"}))

    pods = wait_until(lambda: _running_pods(core, namespace, "spot", 1),
                      timeout_s=60, what="the spot GPU pod to reach Running")

    labels = _node(core, pods[0].spec.node_name).metadata.labels
    assert labels["eks.amazonaws.com/capacityType"] == "SPOT"
    assert labels["node.kubernetes.io/instance-type"] == "p4d.24xlarge"
