"""`down` of a cluster with a real node leaves the host as it found it; one real node per machine.

Runs before the shared ``real_cluster`` starts (``pytest_collection_modifyitems`` in
conftest.py moves it there): only one real node can exist on a machine at a time.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from kubernetes.client import CoreV1Api

from kubeml.errors import ClusterError
from kubeml.testing.cluster import NETPOL_CHAIN, NETPOL_TABLE, NODE_IMAGES, Cluster, find_assets, preflight, real_node_pod_spec
from kubeml.testing.cluster import _host
from kubeml.testing.cluster.fixtures import wait_until

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.environ.get("KUBEML_TEST_CLUSTER") == "existing",
                       reason="exercises the local launcher itself"),
    pytest.mark.skipif(os.geteuid() != 0, reason="a real node needs root"),
]


_IPTABLES_NFT_TABLES = {f"{family} {table}" for family in ("ip", "ip6")
                        for table in ("filter", "nat", "mangle", "raw", "security")}


def _host_state(bin_dir: Path) -> dict[str, object]:
    """Everything a real node may change on the host, in comparable form."""
    own = re.compile(re.escape(str(bin_dir)) + r"/(kubelet|containerd|containerd-shim-runc-v2|kube-network-policies)\b")
    cgroups = sorted(str(m / "kubeml") for m in _host.cgroup_mounts() if (m / "kubeml").exists())
    return {
        "tunables": {name: _host.read_tunable(name) for name in _host.TUNABLES},
        "paths": {path: os.path.lexists(path) for path in _host.FIXED_PATHS},
        "links": sorted(_host.network_links()),
        "chains": _host.iptables_chains(),
        # iptables-nft's own tables (ip filter, ip nat...) are in "chains".
        "nft_tables": [t for t in _host.nft_tables() if t not in _IPTABLES_NFT_TABLES],
        "netns": sorted(os.listdir("/run/netns")) if os.path.isdir("/run/netns") else [],
        "mounts": sorted(_mount_points()),
        "cgroups": cgroups,
        "processes": _host.processes_matching(own),
        "claim": os.path.exists("/run/kubeml/real-node.json"),
    }


def test_down_leaves_the_host_as_it_was(tmp_path: Path) -> None:
    assets = find_assets(build=True)
    before = _host_state(assets.bin_dir)
    cluster = Cluster("lifecycle-node", state_dir=tmp_path / "state", node_groups=(), real_node=True)
    cluster.up(timeout_s=180)
    try:
        with cluster.api_client() as client:
            core = CoreV1Api(client)
            core.create_namespaced_pod("default", {
                "metadata": {"name": "sleeper"},
                "spec": real_node_pod_spec([{"name": "probe", "image": NODE_IMAGES["probe"],
                                             "imagePullPolicy": "Never", "args": ["serve"]}]),
            })
            wait_until(lambda: core.read_namespaced_pod("sleeper", "default").status.phase == "Running",
                       timeout_s=60, what="the pod Running")
        during = _host_state(assets.bin_dir)
        # The node really changed the host: otherwise the comparison below proves nothing.
        assert "kubeml0" in during["links"] and "kubeml0" not in before["links"]
        assert "KUBEML-NODE" in during["chains"]["filter"]
        # The enforcer's nftables table, or where the kernel cannot queue from nftables, the
        # node's iptables chain that queues for it.
        assert (NETPOL_TABLE in during["nft_tables"]) != (NETPOL_CHAIN in during["chains"]["filter"])
        assert NETPOL_TABLE not in before["nft_tables"]
        assert _host.read_tunable("net.bridge.bridge-nf-call-iptables") == "1"
        assert during["cgroups"] and during["processes"] and during["claim"]
        assert any(link.startswith("veth") for link in during["links"])
        assert any(p.startswith(str(tmp_path)) for p in _mount_points())
    finally:
        cluster.down()
    after = _host_state(assets.bin_dir)
    assert after == before
    assert not [p for p in _mount_points() if p.startswith(str(tmp_path))]
    assert not (tmp_path / "state").exists()


def _mount_points() -> list[str]:
    return [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]


def test_a_second_real_node_is_refused_and_leaves_nothing(tmp_path: Path) -> None:
    first = Cluster("first-node", state_dir=tmp_path / "first", node_groups=(), real_node=True)
    first.up(timeout_s=180)
    try:
        second = Cluster("second-node", state_dir=tmp_path / "second", node_groups=(), real_node=True)
        with pytest.raises(ClusterError, match=r"a real node already runs on this machine for cluster 'first-node'"):
            second.up(timeout_s=120)
        assert not second.status().running
        # The first cluster's node is untouched by the refused start.
        with first.api_client() as client:
            node = CoreV1Api(client).read_node("real-0")
            assert [c.status for c in node.status.conditions if c.type == "Ready"] == ["True"]
    finally:
        first.down()


def test_preflight_names_what_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assets = find_assets()
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing on PATH: no runc, no iptables
    problems = preflight(assets)
    assert "runc is not on PATH: install the runc package (`make cluster-assets` does it as root)" in problems
    assert any(p.startswith("iptables is not on PATH: install the iptables package") for p in problems)
    assert any(p.startswith("nft is not on PATH: install the nftables package") for p in problems)


def test_preflight_names_the_kernel_support_the_enforcer_needs(monkeypatch: pytest.MonkeyPatch,
                                                                tmp_path: Path) -> None:
    from kubeml.testing.cluster import _node

    monkeypatch.setattr(_node, "_NFQUEUE_PROC", tmp_path / "nfnetlink_queue")
    monkeypatch.setattr(_node, "_BRIDGE_NF", "net.bridge.no-such-tunable")
    problems = preflight(find_assets())
    assert any("no NFQUEUE" in p and "`modprobe nfnetlink_queue`" in p for p in problems), problems
    assert any("`modprobe br_netfilter`" in p for p in problems), problems
