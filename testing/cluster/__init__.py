"""kubeml.testing.cluster: a real Kubernetes control plane on localhost, for integration tests.

etcd, kube-apiserver, kube-controller-manager and kube-scheduler are built from the upstream
Go modules (``hack/cluster/build.sh``); kwok provides fake nodes shaped like EKS node groups
(CPU, and p4d.24xlarge with ``nvidia.com/gpu: 8``), and the KServe, KubeRay, ACK SageMaker,
prometheus-operator and Kubeflow CRDs are installed. Start one with ``Cluster("name").up()``
or ``kubeml cluster up``; in tests use :func:`kubeml.testing.cluster.fixtures.cluster_fixture`.
"""

from kubeml.testing.cluster._assets import Assets, find_assets
from kubeml.testing.cluster._cluster import Cluster, ClusterStatus, ComponentStatus
from kubeml.errors import (
    AssetsMissing,
    ClusterAlreadyRunning,
    ClusterError,
    ComponentFailed,
    PortInUse,
)
from kubeml.testing.cluster._existing import ExistingCluster
from kubeml.testing.cluster._nodes import DEFAULT_NODE_GROUPS, GPU_TAINT, NodeGroup, Taint

__all__ = [
    "Assets",
    "AssetsMissing",
    "Cluster",
    "ClusterAlreadyRunning",
    "ClusterError",
    "ClusterStatus",
    "ComponentFailed",
    "ComponentStatus",
    "DEFAULT_NODE_GROUPS",
    "ExistingCluster",
    "GPU_TAINT",
    "NodeGroup",
    "PortInUse",
    "Taint",
    "find_assets",
]
