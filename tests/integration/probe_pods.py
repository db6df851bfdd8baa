"""Pods of the probe image (``hack/cluster/node/probe``) on the real node, and how to wait for them.

Shared by the real-node tests (``test_real_node.py``) and the platform tests that send
packets between Tenant namespaces (``test_platform_real_node.py``). Every probe pod runs as
Pod Security ``restricted`` asks.
"""

from __future__ import annotations

from kubernetes.client import CoreV1Api

from kubeml.testing.cluster import NODE_IMAGES, RESTRICTED_CONTAINER, real_node_pod_spec
from kubeml.testing.cluster.fixtures import wait_until

__all__ = ["phase", "probe", "run_to_end", "server"]


def probe(name: str, args: list[str], **container: object) -> dict:
    """A probe pod running ``args`` (``echo``, ``serve``, ``fetch``, ``alloc``, ``sleep``)."""
    return {
        "metadata": {"name": name, "labels": {"app": name}},
        "spec": real_node_pod_spec([{
            "name": "probe",
            "image": NODE_IMAGES["probe"],
            "imagePullPolicy": "Never",
            "args": args,
            "securityContext": RESTRICTED_CONTAINER,
            **container,
        }]),
    }


def phase(core: CoreV1Api, ns: str, name: str, phases: tuple[str, ...], timeout_s: float = 60) -> object:
    """The pod, once its phase is one of ``phases``."""
    def check() -> object:
        pod = core.read_namespaced_pod(name, ns)
        return pod if pod.status.phase in phases else None

    return wait_until(check, timeout_s=timeout_s, what=f"pod {ns}/{name} in {'/'.join(phases)}")


def run_to_end(core: CoreV1Api, ns: str, name: str, args: list[str]) -> tuple[str, str]:
    """Run a probe pod to its end: its final phase and its log."""
    core.create_namespaced_pod(ns, probe(name, args))
    pod = phase(core, ns, name, ("Succeeded", "Failed"))
    return pod.status.phase, core.read_namespaced_pod_log(name, ns)


def server(core: CoreV1Api, ns: str, name: str) -> str:
    """Start an HTTP probe server on port 8080; its pod IP once it listens."""
    core.create_namespaced_pod(ns, probe(name, ["serve", "-addr", ":8080"]))
    ip = phase(core, ns, name, ("Running",)).status.pod_ip
    wait_until(lambda: "serving on" in core.read_namespaced_pod_log(name, ns), what=f"{name} listening")
    return ip
