"""kubeml.testing.cluster: a real Kubernetes control plane on localhost, for integration tests.

etcd, kube-apiserver, kube-controller-manager and kube-scheduler are built from the upstream
Go modules (``hack/cluster/build.sh``); kwok provides fake nodes shaped like EKS node groups
(CPU, and p4d.24xlarge with ``nvidia.com/gpu: 8``), and the KServe, KubeRay, ACK SageMaker,
prometheus-operator and Kubeflow CRDs are installed. Start one with ``Cluster("name").up()``
or ``kubeml cluster up``; in tests use :func:`kubeml.testing.cluster.fixtures.cluster_fixture`.

With ``real_node=True`` a real node joins the kwok ones: a kubelet built from the same module,
containerd 2.x, runc and the CNI bridge, so pods that select it run in real containers.
"""

from kubeml.testing.cluster._assets import Assets, find_assets, image_archive
from kubeml.testing.cluster._cluster import Cluster, ClusterStatus, ComponentStatus
from kubeml.errors import (
    AssetsMissing,
    ClusterAlreadyRunning,
    ClusterError,
    ComponentFailed,
    PortInUse,
)
from kubeml.testing.cluster._existing import ExistingCluster
from kubeml.testing.cluster._node import (
    NETPOL_CHAIN,
    NETPOL_TABLE,
    NODE_IMAGES,
    POD_CIDR,
    REAL_NODE_LABEL,
    REAL_NODE_TAINT,
    RESTRICTED_CONTAINER,
    preflight,
    real_node_pod_spec,
)
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
    "NETPOL_CHAIN",
    "NETPOL_TABLE",
    "NODE_IMAGES",
    "NodeGroup",
    "POD_CIDR",
    "PortInUse",
    "REAL_NODE_LABEL",
    "REAL_NODE_TAINT",
    "RESTRICTED_CONTAINER",
    "Taint",
    "find_assets",
    "image_archive",
    "preflight",
    "real_node_pod_spec",
]
