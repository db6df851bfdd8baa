"""Fake nodes (managed by kwok) shaped like an EKS cluster's managed node groups.

kwok marks a node Ready and drives the pods bound to it to Running without running any
container, so the scheduler, taints, tolerations and resource accounting are all real while
a "p4d.24xlarge" costs a few KiB of etcd. Labels follow what EKS, Karpenter and the NVIDIA
device plugin put on real nodes, so node selectors written for EKS work unchanged.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["DEFAULT_NODE_GROUPS", "GPU_TAINT", "KWOK_ANNOTATION", "NodeGroup", "Taint"]

#: Annotation kwok is started to manage (``--manage-nodes-with-annotation-selector``).
KWOK_ANNOTATION = ("kwok.x-k8s.io/node", "fake")

_REGION = "us-east-1"
_ZONES = ("us-east-1a", "us-east-1b", "us-east-1c")


@dataclass(frozen=True)
class Taint:
    key: str
    value: str
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] = "NoSchedule"

    def to_dict(self) -> dict[str, str]:
        return {"key": self.key, "value": self.value, "effect": self.effect}


#: The taint EKS GPU node groups are usually created with, so only GPU workloads land there.
GPU_TAINT = Taint("nvidia.com/gpu", "present", "NoSchedule")


@dataclass(frozen=True)
class NodeGroup:
    """One EKS managed node group: ``count`` identical nodes of ``instance_type``."""

    name: str
    """Node group name; the ``eks.amazonaws.com/nodegroup`` label and the node name prefix."""
    instance_type: str
    """EC2 instance type, as the ``node.kubernetes.io/instance-type`` label."""
    count: int = 1
    cpu: str = "8"
    """Allocatable CPU (Kubernetes quantity). Capacity equals allocatable: no kubelet reserves."""
    memory: str = "32Gi"
    pods: int = 110
    """Max pods per node; 110 is the kubelet default (EKS computes it from ENIs)."""
    ephemeral_storage: str = "20Gi"
    """Node-local storage for pods (logs, emptyDirs, writable layers), as every kubelet reports
    it; 20 GiB is the root volume of an EKS managed node group by default."""
    gpus: int = 0
    """``nvidia.com/gpu`` capacity, as the NVIDIA device plugin would advertise it."""
    capacity_type: Literal["on-demand", "spot"] = "on-demand"
    """Karpenter-style ``karpenter.sh/capacity-type``; EKS's own label gets the upper-case form."""
    taints: tuple[Taint, ...] = ()
    labels: tuple[tuple[str, str], ...] = field(default=())
    """Extra labels, as ``(key, value)`` pairs (a tuple keeps the group hashable and frozen)."""

    def __post_init__(self) -> None:
        if self.count < 0:
            raise ValueError(f"node group {self.name!r}: count must be >= 0, got {self.count}")
        if self.gpus < 0:
            raise ValueError(f"node group {self.name!r}: gpus must be >= 0, got {self.gpus}")

    def node_names(self) -> list[str]:
        return [f"{self.name}-{i}" for i in range(self.count)]

    def manifests(self) -> list[dict[str, Any]]:
        """Node objects for this group, ready to POST (status included; kwok keeps it)."""
        resources = {"cpu": self.cpu, "memory": self.memory, "ephemeral-storage": self.ephemeral_storage,
                     "pods": str(self.pods)}
        if self.gpus:
            resources["nvidia.com/gpu"] = str(self.gpus)
        nodes = []
        for index, name in enumerate(self.node_names()):
            zone = _ZONES[index % len(_ZONES)]
            labels = {
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "node.kubernetes.io/instance-type": self.instance_type,
                "topology.kubernetes.io/region": _REGION,
                "topology.kubernetes.io/zone": zone,
                "eks.amazonaws.com/nodegroup": self.name,
                "eks.amazonaws.com/capacityType": self.capacity_type.replace("-", "_").upper(),
                "karpenter.sh/capacity-type": self.capacity_type,
                "type": "kwok",
            }
            if self.gpus:
                labels["nvidia.com/gpu.present"] = "true"
                labels["nvidia.com/gpu.count"] = str(self.gpus)
            labels.update(dict(self.labels))
            nodes.append(
                {
                    "apiVersion": "v1",
                    "kind": "Node",
                    "metadata": {
                        "name": name,
                        "labels": labels,
                        "annotations": {
                            KWOK_ANNOTATION[0]: KWOK_ANNOTATION[1],
                            "node.alpha.kubernetes.io/ttl": "0",
                        },
                    },
                    "spec": {
                        "providerID": f"aws:///{zone}/i-kwok{index:04d}{zlib.crc32(self.name.encode()) % 10**8:08d}",
                        "taints": [t.to_dict() for t in self.taints],
                    },
                    "status": {"capacity": resources, "allocatable": dict(resources)},
                }
            )
        return nodes


#: Two CPU nodes (m5.2xlarge), one on-demand and one spot p4d.24xlarge GPU node (8 A100s
#: each). Small on purpose: every node is a watch kwok keeps and a heartbeat every 20 s.
DEFAULT_NODE_GROUPS: tuple[NodeGroup, ...] = (
    NodeGroup("cpu", "m5.2xlarge", count=2, cpu="8", memory="32Gi"),
    NodeGroup(
        "gpu-p4d",
        "p4d.24xlarge",
        count=1,
        cpu="96",
        memory="1152Gi",
        pods=737,
        gpus=8,
        taints=(GPU_TAINT,),
        labels=(("k8s.amazonaws.com/accelerator", "nvidia-tesla-a100"),),
    ),
    NodeGroup(
        "gpu-p4d-spot",
        "p4d.24xlarge",
        count=1,
        cpu="96",
        memory="1152Gi",
        pods=737,
        gpus=8,
        capacity_type="spot",
        taints=(GPU_TAINT,),
        labels=(("k8s.amazonaws.com/accelerator", "nvidia-tesla-a100"),),
    ),
)
